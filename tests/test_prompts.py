import numpy as np
import pytest
import torch

from itemgen.data.dataset import ItemTable
from itemgen.data.prompts import PromptBuilder, collate
from itemgen.models.backbones import tiny_backbone


@pytest.fixture(scope="module")
def tok():
    return tiny_backbone()[1]


@pytest.fixture(scope="module")
def items():
    n = 10
    return ItemTable([f"i{i}" for i in range(n)],
                     {"title": [f"title {i}" for i in range(n)], "brand": [f"b{i}" if i % 2 else None for i in range(n)]})


def slots(enc):
    return enc.items[enc.items >= 0].tolist()


def test_inference_prompt_is_id_only(tok, items):
    pb = PromptBuilder(tok, items, ("title", "brand"))
    enc = pb.inference_prompt([3, 4, 5])
    assert slots(enc) == [3, 4, 5]
    assert (enc.labels < 0).all()
    text = tok.decode([t for t in enc.tokens if t >= 0])
    assert "title" not in text
    assert text.endswith("Which item will the user interact with next? id:")
    assert text.startswith("The user has interacted with the following items in chronological order:")


def test_training_labels(tok, items):
    pb = PromptBuilder(tok, items, ("title",))
    enc = pb.encode(np.array([1, 2, 3]), 7, None, supervise="all")
    # every history slot after the first and the target are labels, each on the position just before its slot
    lab = np.flatnonzero(enc.labels >= 0)
    assert enc.labels[lab].tolist() == [2, 3, 7]
    assert [enc.items[p + 1] for p in lab] == [2, 3, 7]
    last = pb.encode(np.array([1, 2, 3]), 7, None, supervise="last")
    assert last.labels[last.labels >= 0].tolist() == [7]
    # the target's slot comes last and no item slot precedes its own label position
    assert enc.items[-1] == 7


def test_id_only_share_and_field_sampling(tok, items):
    pb = PromptBuilder(tok, items, ("title", "brand", "price"))  # price absent in the data -> ignored
    assert pb.fields == ("title", "brand")
    rng = np.random.default_rng(0)
    n, id_only, title_kept, title_total = 2000, 0, 0, 0
    for _ in range(n):
        enc = pb.training_example(np.array([1, 3, 5, 2]), rng, id_only_share=0.25, field_keep_prob=0.5, supervise="all")
        text = tok.decode([t for t in enc.tokens if t >= 0])
        k = text.count("title:")
        id_only += (k == 0 and text.count("brand:") == 0)
        if k or text.count("brand:"):
            title_kept += k
            title_total += 3  # history items get fields; the label's fields follow the final slot
    # P(no field shown | text example) = 0.5^(3 titles + 2 brands) is small; share is ~0.25
    assert abs(id_only / n - 0.25 - 0.75 * 0.5 ** 5) < 0.03
    assert abs(title_kept / title_total - 0.5) < 0.03


def test_field_tokens_are_truncated(tok):
    long = ItemTable(["x"], {"title": ["word " * 100]})
    pb = PromptBuilder(tok, long, ("title",), max_field_tokens=5)
    assert len(pb.field_tokens["title"][0]) == len(tok(" title:", add_special_tokens=False)["input_ids"]) + 5


def test_collate_left_pads(tok, items):
    pb = PromptBuilder(tok, items, ())
    a, b = pb.inference_prompt([1]), pb.inference_prompt([1, 2, 3])
    batch = collate([a, b], pad_token=0)
    L = len(b)
    assert batch["tokens"].shape == (2, L)
    assert batch["attention_mask"][0].tolist() == [0] * (L - len(a)) + [1] * len(a)
    assert batch["position_ids"][0, -1].item() == len(a) - 1
    assert batch["position_ids"][1].tolist() == list(range(L))
    assert (batch["items"][0, : L - len(a)] == -1).all()


def test_compact_prompt_is_shorter(tok, items):
    d = PromptBuilder(tok, items, (), style="default").inference_prompt(list(range(8)))
    c = PromptBuilder(tok, items, (), style="compact").inference_prompt(list(range(8)))
    assert len(c) < len(d) and slots(c) == slots(d)
    with pytest.raises(ValueError, match="prompt style"):
        PromptBuilder(tok, items, (), style="weird")


def test_collate_right_pads_and_the_training_loss_does_not_depend_on_the_side():
    from itemgen.core.config import from_dict
    from itemgen.data.synthetic import make_dataset
    from itemgen.models.registry import build_model

    ds = make_dataset(n_users=20, n_items=15, min_len=2, max_len=9, noise=0.0, seed=0)
    for name in ("itemlm", "title"):
        cfg = from_dict({"model": name, "data": {"path": "synthetic-inline"}, name: {"backbone": "tiny"}})
        torch.manual_seed(0)
        model = build_model(cfg, ds.items).eval()
        rng = np.random.default_rng(0)
        seqs = [s for s in ds.split.train if len(s) >= 2][:6]
        right = model.train_batch(seqs, rng)
        L = right["tokens"].shape[1]
        n = right["attention_mask"].sum(1)
        assert (right["attention_mask"][:, 0] == 1).all() and n.min() < L  # padding at the end only
        assert right["position_ids"][0, : int(n[0])].tolist() == list(range(int(n[0])))
        enc = [model.prompts.training_example(s, np.random.default_rng(0), 1.0, 0.5, "all") for s in seqs] \
            if name == "itemlm" else [model.encode_prompt(s[:-1], int(s[-1])) for s in seqs]
        pad = model.pad_token
        with torch.no_grad():
            assert model.loss(collate(enc, pad, side="left")).item() == pytest.approx(
                model.loss(collate(enc, pad, side="right")).item(), rel=1e-5)
    with pytest.raises(ValueError, match="side"):
        collate(enc, 0, side="middle")


def test_ids_prompt_reads_every_label_at_an_item_slot(tok, items):
    """prompt=ids: the target is read where every other label is (the previous item's slot),
    and the inference query is the last history item's slot, as in SASRec."""
    pb = PromptBuilder(tok, items, style="ids")
    enc = pb.training_example([3, 4, 5, 6], np.random.default_rng(0), 1.0, 0.5, "all")
    at = np.flatnonzero(enc.labels >= 0)
    assert enc.labels[at].tolist() == [4, 5, 6]
    assert (enc.items[at] >= 0).all() and enc.items[at].tolist() == [3, 4, 5]  # read at the previous item's slot
    inf = pb.inference_prompt([3, 4, 5])
    assert inf.items[-1] == 5 and len(inf) == len(pb.prefix) + 3  # ends at the last item: no question tokens
