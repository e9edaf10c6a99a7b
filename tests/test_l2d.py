"""L2D latent-space decoding: hand-computed global and local rankings on a toy memory, FAISS
local search against the brute-force reference, memory building and saving beside a checkpoint,
``evaluate --decode l2d_global`` end to end."""

import numpy as np
import pytest
import torch

from itemgen.data.synthetic import make_dataset
from itemgen.models.recommender import Recommender
from itemgen.models.registry import build_model
from itemgen.topk.factory import make_decoder
from itemgen.topk.l2d import Memory, build_memory, training_prefixes


class Stub(Recommender):
    """A 'model' whose encode output is the query state itself."""
    name = "stub"

    def __init__(self, n_items):
        super().__init__()
        self.n_items = n_items


def toy_memory():
    # item 0: (0,0) and (10,0) -> global (5,0); item 1: (4,1); item 2: never a target; item 3: (20,20)
    states = torch.tensor([[0.0, 0.0], [10.0, 0.0], [4.0, 1.0], [20.0, 20.0]])
    return Memory(states, torch.tensor([0, 0, 1, 3]), 4, {})


H = torch.tensor([[0.0, 1.0]])


def test_global_ranking_by_hand():
    dec = make_decoder("l2d_global", Stub(4), memory=toy_memory())
    scores, ids = dec.topk(H, 4)
    # squared distances to (5,0), (4,1), -, (20,20): 26, 16, cold, 761
    assert ids.tolist() == [[1, 0, 3, 2]]
    assert scores[0, :3].tolist() == pytest.approx([-16.0, -26.0, -761.0]) and scores[0, 3] == float("-inf")


@pytest.mark.parametrize("m,want_ids,want_scores", [
    # M=1: the nearest state is (0,0) (item 0) -> item 0 at distance 1; the rest in global order below
    (1, [0, 1, 3, 2], [-1.0, -2.0, -747.0]),
    # M=2: (0,0) and (4,1) -> item 0 at (0,0), item 1 at (4,1); item 3 below in global order
    (2, [0, 1, 3, 2], [-1.0, -16.0, -762.0]),
    # M=4: every state -> the local means are the global means
    (4, [1, 0, 3, 2], [-16.0, -26.0, -761.0]),
])
def test_local_ranking_by_hand(m, want_ids, want_scores):
    dec = make_decoder("l2d_local", Stub(4), memory=toy_memory(), m=m)
    scores, ids = dec.topk(H, 4)
    assert ids.tolist() == [want_ids]
    assert scores[0, :3].tolist() == pytest.approx(want_scores) and scores[0, 3] == float("-inf")  # cold last


def test_faiss_local_search_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    n_items, N, D = 50, 600, 16
    mem = Memory(torch.randn(N, D, generator=g), torch.randint(0, n_items - 5, (N,), generator=g), n_items, {})
    dec = make_decoder("l2d_local", Stub(n_items), memory=mem, m=25)
    h = torch.randn(8, D, generator=g)
    d = torch.cdist(h, mem.states.float())  # (B, N) exact distances over the float16 states
    ref = dec.local_scores(h, neighbours=torch.topk(d, 25, largest=False).indices.numpy())
    fast = dec.local_scores(h)
    assert torch.allclose(fast, ref, atol=1e-4)
    assert (fast[:, -5:] == float("-inf")).all()  # cold items
    s, ids = dec.topk(h, 10, exclude=[np.array([int(ids0)]) for ids0 in torch.argmax(ref, 1)])
    assert not any(int(torch.argmax(ref[b])) in ids[b].tolist() for b in range(8))  # exclusion works


def test_torch_search_matches_faiss():
    from itemgen.topk.l2d import exact_neighbours

    g = torch.Generator().manual_seed(1)
    states = torch.randn(700, 12, generator=g).half()  # float16, as in a memory
    h = torch.randn(5, 12, generator=g)
    mem = Memory(states, torch.zeros(700, dtype=torch.long), 3, {})
    _, ref = mem.index().search(h.numpy(), 20)
    got = exact_neighbours(states, h, 20, chunk=256)  # several chunks merged
    assert (got == ref).all()
    short = exact_neighbours(states[:7], h, 10)  # fewer states than m: -1 padding, as FAISS does
    assert (short[:, 7:] == -1).all() and sorted(short[0, :7].tolist()) == list(range(7))


def test_training_prefixes_and_bad_inputs():
    hist, tgt = training_prefixes([np.array([1, 2, 3]), np.array([4])], max_history=1)
    assert [h.tolist() for h in hist] == [[1], [2]] and tgt.tolist() == [2, 3]
    hist, tgt = training_prefixes([np.array([1, 2, 3, 4])], max_history=5, per_sequence=2)
    assert [h.tolist() for h in hist] == [[1, 2], [1, 2, 3]] and tgt.tolist() == [3, 4]
    with pytest.raises(ValueError, match="outside 0..3"):
        Memory(torch.zeros(2, 2), torch.tensor([0, 4]), 4, {})
    with pytest.raises(ValueError, match="needs a memory"):
        make_decoder("l2d_global", Stub(4))
    with pytest.raises(ValueError, match="M >= 1"):
        make_decoder("l2d_local", Stub(4), memory=toy_memory(), m=0)
    with pytest.raises(ValueError, match="covers 4 items, the model 5"):
        make_decoder("l2d_global", Stub(5), memory=toy_memory())


def test_memory_beside_checkpoint_and_evaluate(tmp_path):
    from itemgen.api import evaluate_checkpoint
    from itemgen.core.config import from_dict
    from itemgen.data.dataset import training_sequences
    from itemgen.data.load import load_dataset
    from itemgen.models.checkpoint import load_checkpoint
    from itemgen.topk.l2d import MEMORY_DIR, MEMORY_FILE
    from itemgen.training.loop import train

    cfg = from_dict({"model": "sasrec", "sasrec": {"hidden": 32, "dropout": 0.0},
                     "data": {"path": "synthetic", "max_history": 6, "synthetic_users": 150, "synthetic_items": 20},
                     "train": {"out": str(tmp_path / "run"), "lr": 5e-3, "batch_size": 32, "max_steps": 40,
                               "eval_every": 40, "warmup_steps": 5, "progress": False}})
    result = train(cfg)
    report = evaluate_checkpoint(result.best, decode="l2d_global")
    mem = Memory.load(result.best / MEMORY_DIR / MEMORY_FILE)
    ds = load_dataset(cfg)
    seqs = training_sequences(ds, cfg.data.max_history)
    assert mem.states.dtype == torch.float16 and len(mem.targets) == sum(len(s) - 1 for s in seqs)
    # the saved memory is exactly what building it again gives
    model, _, _ = load_checkpoint(result.best)
    again = build_memory(model, seqs, max_history=cfg.data.max_history)
    assert torch.equal(again.targets, mem.targets) and torch.allclose(again.states.float(), mem.states.float(),
                                                                      atol=1e-2)
    # the synthetic rule (noise 0.1) is learnable: latent-space decoding finds it too
    assert report["metrics"]["recall@10"] > 0.5, report["metrics"]
    local = evaluate_checkpoint(result.best, decode="l2d_local")
    assert local["metrics"]["users"] == report["metrics"]["users"]


def test_generative_model_states_and_decoding():
    """A title model's encode() returns its prompt batch: L2D reads the LM's last hidden state."""
    from itemgen.core.config import from_dict
    from itemgen.topk.l2d import query_states

    ds = make_dataset(n_users=30, n_items=20, seed=2)
    cfg = from_dict({"model": "title", "title": {"backbone": "tiny", "prompt": "compact", "max_title_tokens": 8,
                                                 "max_field_tokens": 2}, "data": {"path": "x", "max_history": 3}})
    model = build_model(cfg, ds.items).eval()
    hist = [np.array([1, 2]), np.array([3])]
    batch = model.query_batch(hist)
    with torch.inference_mode():
        h = model.decoder(input_ids=batch["tokens"], attention_mask=batch["attention_mask"],
                          position_ids=batch["position_ids"]).last_hidden_state[:, -1]
    assert torch.allclose(query_states(model, model.encode(batch)), h.float())
    mem = build_memory(model, [s[:-2] for s in ds.sequences], max_history=3)
    scores, ids = make_decoder("l2d_global", model, memory=mem).topk(model.encode(batch), 5)
    warm = set(mem.targets.tolist())
    assert ids.shape == (2, 5) and set(ids.flatten().tolist()) <= warm and torch.isfinite(scores).all()
