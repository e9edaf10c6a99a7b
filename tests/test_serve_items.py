"""``POST /v1/items``: new items added to the SERVED model in memory, vectorised from their text as
``itemgen items add`` does, recommendable from the next request, known to ``GET /v1/items``,
followed by the ANN index; every bad input is a clear 4xx that leaves the catalog unchanged."""

import asyncio
import re
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from itemgen.api import Predictor
from itemgen.core.config import from_dict
from itemgen.data.dataset import ItemTable
from itemgen.models.checkpoint import save_checkpoint
from itemgen.models.new_items import add_items
from itemgen.models.text_view import item_texts
from itemgen.serving import engine as engine_module
from itemgen.serving.server import ServeSettings, create_app
from itemgen.topk.ann import AnnIndex
from itemgen.training.loop import train
# the tiny synthetic catalog with titles, its trained SASRec + text checkpoint, and the helpers of
# the offline `items add` tests (module-scoped fixtures: this module gets its own instances)
from test_items_add import MEMBERS, _FAMILIES, cfg_for, families, sasrec_text, write_jsonl  # noqa: F401
from test_serve import ckpt, data, error_of  # noqa: F401  (ckpt: a tiny ID-only ItemLM)

KEY = "items-key"
N_OLD = len(_FAMILIES) * MEMBERS
NEW = [{"id": "NEW-stapler", "title": "red stapler model 5", "brand": "Acme", "category": "office staplers"},
       {"id": "NEW-lamp", "title": "blue lamp model 5", "brand": "Globex", "category": "office lamps"}]
AUTH = {"X-API-Key": KEY}


def serve(ckpt, key: str = "", **settings):
    pred = Predictor.load(ckpt)  # its own model: adds never leak into other tests
    app = create_app(ServeSettings(checkpoint=str(ckpt), **settings), predictor=pred, api_key=key)
    return TestClient(app, raise_server_exceptions=False), pred


def top(c, history, k=3, headers=None, **extra):
    r = c.post("/v1/recommend", json={"history": history, "k": k, **extra}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def catalog_state(c, pred, headers=None):
    return (c.get("/readyz", headers=headers).json()["items"], pred.model.n_items, list(pred.items.ids))


def test_round_trip_over_http_equals_the_offline_items_add(sasrec_text, tmp_path):
    client, pred = serve(sasrec_text, key=KEY)
    with client as c:
        assert pred.model.n_items == N_OLD and c.app.state.itemgen.engine.text_encoder is None  # loaded lazily
        error_of(c.get("/v1/items/NEW-lamp", headers=AUTH), 404)
        r = c.post("/v1/items", json={"items": NEW}, headers=AUTH)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["added"] == ["NEW-stapler", "NEW-lamp"] and body["items"] == N_OLD + 2
        assert body["ann_index"] is None  # this checkpoint has no index
        assert c.get("/v1/items/NEW-lamp", headers=AUTH).json() == {"id": "NEW-lamp", "title": "blue lamp model 5"}
        ready = c.get("/readyz", headers=AUTH).json()
        assert ready["items"] == N_OLD + 2 and ready["added_items"] == 2
        # recommendable by the very next request, by their text
        for history, new_id, other in ((["F0M0", "F0M1", "F0M2"], "NEW-stapler", "NEW-lamp"),
                                       (["F1M3", "F1M0", "F1M1"], "NEW-lamp", "NEW-stapler")):
            got = [x["id"] for x in top(c, history, headers=AUTH)]
            assert new_id in got and other not in got, (history, got)
        # a history holding a new item, and k up to the grown catalog
        assert len(top(c, ["NEW-stapler"], k=N_OLD + 1, headers=AUTH)) == N_OLD + 1
        served = top(c, ["F0M0", "F0M1", "NEW-lamp"], k=10, headers=AUTH)
    # the same items through `itemgen items add` (the persistent path) give the same answers
    offline = Predictor.load(add_items(sasrec_text, write_jsonl(tmp_path / "new.jsonl", NEW), tmp_path / "out").out)
    want = offline.recommend([["F0M0", "F0M1", "NEW-lamp"]], k=10)[0]
    assert [x["id"] for x in served] == [x["id"] for x in want]
    np.testing.assert_allclose([x["score"] for x in served], [x["score"] for x in want], atol=1e-5)


@pytest.mark.parametrize("case", ["duplicate", "in_catalog", "no_text", "empty", "too_many", "no_id", "blank_id",
                                  "unknown_field", "not_a_string", "no_key", "wrong_key"])
def test_bad_input_is_a_clear_4xx_and_leaves_the_catalog_unchanged(sasrec_text, case):
    items = {"duplicate": [{"id": "A", "title": "x"}, {"id": "B", "title": "y"}, {"id": "A", "title": "z"}],
             "in_catalog": [{"id": "A", "title": "x"}, {"id": "F3M1", "title": "steel chair"}],
             # description is not among this checkpoint's text fields (title, brand, category)
             "no_text": [{"id": "A", "title": "x"}, {"id": "B", "title": "  ", "description": "a pen"}],
             "empty": [], "too_many": [{"id": f"A{i}", "title": "x"} for i in range(4)],
             "no_id": [{"title": "x"}], "blank_id": [{"id": " ", "title": "x"}],
             "unknown_field": [{"id": "A", "titel": "x"}], "not_a_string": [{"id": "A", "title": 5}],
             "no_key": NEW, "wrong_key": NEW}[case]
    status, words = {"duplicate": (422, "id 'A' repeats row 1"), "in_catalog": (422, "already in the catalog: F3M1"),
                     "no_text": (422, "1 item has no text in title, brand, category.*: B"),
                     "empty": (422, "items"), "too_many": (422, "4 items in one request.*at most 3.*--max-new-items"),
                     "no_id": (422, "items.0.id"), "blank_id": (422, "row 1: empty or missing 'id'"),
                     "unknown_field": (422, "titel"), "not_a_string": (422, "items.0.title"),
                     "no_key": (401, "API key"), "wrong_key": (401, "API key")}[case]
    headers = {"no_key": {}, "wrong_key": {"X-API-Key": KEY + "x"}}.get(case, AUTH)
    client, pred = serve(sasrec_text, key=KEY, max_new_items=3)
    with client as c:
        before = catalog_state(c, pred, AUTH)
        scores = pred.model.scores([np.array([0, 1])]).clone()
        body = error_of(c.post("/v1/items", json={"items": items}, headers=headers), status)
        assert re.search(words, body["error"]), body["error"]
        if status == 422 and case not in ("empty", "no_id", "unknown_field", "not_a_string"):
            assert "nothing was added" in body["error"]
        assert catalog_state(c, pred, AUTH) == before
        assert torch.equal(pred.model.scores([np.array([0, 1])]), scores)
        error_of(c.get("/v1/items/A", headers=AUTH), 404)
        # and the server still adds good items afterwards
        assert c.post("/v1/items", json={"items": NEW[:1]}, headers=AUTH).status_code == 201


def test_a_model_without_a_text_view_is_a_409_saying_so(ckpt, data):
    client, pred = serve(ckpt)
    with client as c:
        body = error_of(c.post("/v1/items", json={"items": NEW}), 409)
        assert "cannot take new items" in body["error"] and "no item text view" in body["error"]
        assert pred.model.n_items == len(data.items)


def test_several_worker_processes_and_a_zero_limit_refuse_adds(sasrec_text):
    for settings, status, words in (({"sessions_enabled": False}, 501, "--workers 1"),
                                    ({"max_new_items": 0}, 409, "turned off")):
        client, pred = serve(sasrec_text, **settings)
        with client as c:
            assert words in error_of(c.post("/v1/items", json={"items": NEW}), status)["error"]
            assert pred.model.n_items == N_OLD


def test_a_text_encoder_that_cannot_load_is_a_503_and_changes_nothing(sasrec_text, monkeypatch):
    def broken(name, **_):
        raise OSError("/secret/server/path: no such file")

    monkeypatch.setattr(engine_module, "load_text_encoder", broken)
    client, pred = serve(sasrec_text)
    with client as c:
        body = error_of(c.post("/v1/items", json={"items": NEW}), 503)
        assert "text encoder 'tiny' could not be loaded" in body["error"] and "/secret" not in body["error"]
        assert pred.model.n_items == N_OLD and "NEW-lamp" not in pred.items.index
        monkeypatch.undo()  # the next add loads it (a failure is not remembered)
        assert c.post("/v1/items", json={"items": NEW}).status_code == 201


def test_concurrent_recommendations_during_an_add_never_fail(sasrec_text, monkeypatch):
    """Adds run alone in the model worker: requests queued meanwhile wait and then see the whole
    grown catalog, never a half-updated one (a slowed encoder keeps the add running a while)."""
    slow = threading.Event()
    real = engine_module.encode_new_items

    def slow_encode(*args):
        slow.set()
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(engine_module, "encode_new_items", slow_encode)
    pred = Predictor.load(sasrec_text)
    app = create_app(ServeSettings(checkpoint=str(sasrec_text)), predictor=pred, api_key="")
    many = [{"id": f"NEW{i}", "title": f"{adj} {noun} model {i + 9}", "brand": b}
            for i, (adj, noun, b) in enumerate(_FAMILIES)]

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                async def recommend(i):
                    await asyncio.sleep(0.01 * i)
                    return await c.post("/v1/recommend", json={"history": [f"F{i % 10}M0", f"F{i % 10}M1"],
                                                               "k": 5})
                add = asyncio.ensure_future(c.post("/v1/items", json={"items": many}))
                recs = await asyncio.gather(*[recommend(i) for i in range(40)])
                return await add, recs

    added, recs = asyncio.run(run())
    assert slow.is_set() and added.status_code == 201 and added.json()["items"] == N_OLD + len(many)
    assert all(r.status_code == 200 for r in recs), [r.text for r in recs if r.status_code != 200]
    known = set(pred.items.ids)
    saw_new = 0
    for r in recs:
        got = [x["id"] for x in r.json()["items"]]
        assert len(got) == 5 and set(got) <= known
        saw_new += any(x.startswith("NEW") for x in got)
    assert saw_new > 0  # some requests were answered from the grown catalog


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_the_ann_index_follows_the_added_items(sasrec_text, tmp_path, kind):
    """An index built for the old catalog is extended in place (exact: the old items' vectors
    are unchanged, checked by fingerprint), so decode=ann ranks the new items too."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sasrec_text, ckpt)
    pred = Predictor.load(ckpt)
    AnnIndex.build(pred.model, kind, ef_search=256).save(ckpt)
    client, pred = serve(ckpt)
    with client as c:
        r = c.post("/v1/items", json={"items": NEW})
        assert r.status_code == 201 and r.json()["ann_index"] in ("extended", "rebuilt")
        index = pred.decoder("ann").index
        assert index.n_items == N_OLD + 2 == index.params["n_items"]
        for history in (["F0M0", "F0M1", "F0M2"], ["F1M3", "F1M0"], ["NEW-lamp", "F5M1"]):
            ann = [x["id"] for x in top(c, history, k=8, decode="ann")]
            exact = [x["id"] for x in top(c, history, k=8)]
            assert ann == exact, (history, ann, exact)
        assert "NEW-stapler" in [x["id"] for x in top(c, ["F0M0", "F0M1", "F0M2"], decode="ann")]


def test_ann_extend_is_exact_and_rebuilds_when_old_vectors_changed(sasrec_text):
    model = Predictor.load(sasrec_text).model
    index = AnnIndex.build(model, "flat")
    view = torch.nn.functional.normalize(torch.randn(3, model.items.text_view.shape[1]), dim=-1)
    model.append_items(view)
    assert index.extend(model) == "extended"
    q = torch.randn(4, model.item_vectors().shape[1])
    fresh = AnnIndex.build(model, "flat")
    s1, i1 = index.search(model, q, 10)
    s2, i2 = fresh.search(model, q, 10)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5) and index.fingerprint == fresh.fingerprint
    # old items' vectors changed since the build (other weights): extending would mix two models
    with torch.no_grad():
        model.items.text_proj.weight.mul_(1.5)
    model.append_items(view[:1])
    assert index.extend(model) == "rebuilt"
    s3, i3 = index.search(model, q, 10)
    s4, i4 = AnnIndex.build(model, "flat").search(model, q, 10)
    assert torch.equal(i3, i4) and torch.allclose(s3, s4, atol=1e-5)


def test_itemlm_in_memory_add_equals_the_saved_and_reloaded_checkpoint(families, tmp_path):
    cfg = cfg_for(tmp_path / "run", "itemlm", {"input": "text+id", "output": "text+id", "id_dropout": 0.3}, steps=2)
    ckpt = train(cfg, dataset=families).out / "last"
    client, pred = serve(ckpt)
    with client as c:
        assert c.post("/v1/items", json={"items": NEW}).status_code == 201
        served = top(c, ["F0M0", "NEW-stapler"], k=6)
    offline = Predictor.load(add_items(ckpt, write_jsonl(tmp_path / "new.jsonl", NEW), tmp_path / "out").out)
    want = offline.recommend([["F0M0", "NEW-stapler"]], k=6)[0]
    assert [x["id"] for x in served] == [x["id"] for x in want]
    np.testing.assert_allclose([x["score"] for x in served], [x["score"] for x in want], atol=1e-4)


def test_l2d_decoders_are_refused_after_an_add_saying_why(sasrec_text, families, tmp_path):
    """An L2D memory holds hidden states of training prefixes: it can never rank an added item,
    so after an add decode=l2d_* is a 422 saying so (before it, it served)."""
    from itemgen.topk import l2d

    ckpt = tmp_path / "ckpt"
    shutil.copytree(sasrec_text, ckpt)
    pred = Predictor.load(ckpt)
    mem = l2d.build_memory(pred.model, families.sequences[:50], max_history=pred.cfg.data.max_history,
                           per_sequence=1, meta={"weights": l2d.weights_digest(ckpt)})
    mem.save(ckpt / l2d.MEMORY_DIR)
    client, pred = serve(ckpt)
    with client as c:
        assert len(top(c, ["F0M0", "F0M1"], decode="l2d_global")) == 3
        assert c.post("/v1/items", json={"items": NEW}).status_code == 201
        for name in ("l2d_global", "l2d_local"):
            body = error_of(c.post("/v1/recommend", json={"history": ["F0M0"], "decode": name}), 422)
            assert "items were added" in body["error"] and "can never rank them" in body["error"]
        assert "NEW-stapler" in [x["id"] for x in top(c, ["F0M0", "F0M1", "F0M2"])]  # exact still serves


def test_a_gated_text_match_model_serves_added_items_as_the_offline_add(families, tmp_path):
    """items.text_gate: a new item added over HTTP is in the closed bucket; exact and ANN answers,
    and the saved `items add` checkpoint, agree (item vectors [v ; g t ; c], queries [h ; M q ; 1])."""
    cfg = text_match_cfg(tmp_path / "run", text_gate=[3])
    ckpt = train(cfg, dataset=families).out / "last"
    pred0 = Predictor.load(ckpt)
    assert pred0.model.items.gate.weights()["closed"] != (1.0, 0.0)  # the closed bucket trained
    AnnIndex.build(pred0.model, "flat").save(ckpt)
    served_equals_offline(ckpt, tmp_path)


def test_a_lexical_view_model_serves_added_items_as_the_offline_add(families, tmp_path):
    """items.lexical: a new item added over HTTP gets its words' vector from the checkpoint's own
    vocabulary and basis; exact and ANN answers, and the saved `items add` checkpoint, agree (item
    vectors [v ; t ; c ; w(b) u], queries [h ; M q ; 1 ; q])."""
    cfg = text_match_cfg(tmp_path / "run", lexical=8)
    pred0 = Predictor.load(train(cfg, dataset=families).out / "last")
    pred0.model.items.lexical.set_weights([8.0, 4.0, 2.0], [0.0, 0.0, 0.0])  # the words weigh, whatever validation chose
    ckpt = tmp_path / "weighted"
    save_checkpoint(ckpt, pred0.model, pred0.cfg, pred0.items)
    AnnIndex.build(pred0.model, "flat").save(ckpt)
    offline = served_equals_offline(ckpt, tmp_path)
    lex = offline.model.items.lexical
    new = ItemTable([x["id"] for x in NEW], {f: [x[f] for x in NEW] for f in ("title", "brand", "category")})
    texts = item_texts(new, tuple(offline.cfg.items.text_fields))
    torch.testing.assert_close(lex.vectors[-2:], lex.encode(texts))
    assert lex.vectors[-2:].any()  # their words are in the catalog's vocabulary


def text_match_cfg(out, **items):
    """A tiny ItemLM with the text-match path (and ``items`` on top) for the families catalog."""
    return from_dict({"model": "itemlm", "data": {"path": "x", "max_history": 6},
                      "itemlm": {"backbone": "tiny", "prompt": "ids", "item_dim": 16, "id_only_share": 1.0,
                                 "text_vocab_in_softmax": False},
                      "items": {"text_encoder": "tiny", "text_match": 3, "id_dropout": 0.3, **items},
                      "train": {"out": str(out), "max_steps": 20, "eval_every": 20, "eval_users": 50,
                                "progress": False, "batch_size": 32, "warmup_steps": 0, "lr": 1e-2}})


def served_equals_offline(ckpt, tmp_path) -> Predictor:
    """Add NEW over HTTP to a server of ``ckpt`` (with a flat ANN index saved there): the ANN index
    follows, exact and ANN answers agree, and both equal the saved ``items add`` checkpoint's,
    which is returned."""
    client, pred = serve(ckpt)
    history = ["F0M0", "F0M1", "NEW-lamp"]
    with client as c:
        assert c.post("/v1/items", json={"items": NEW}).status_code == 201
        assert pred.decoder("ann").index.n_items == N_OLD + 2
        served = top(c, history, k=8)
        ann = top(c, history, k=8, decode="ann")
    assert [x["id"] for x in ann] == [x["id"] for x in served]
    offline = Predictor.load(add_items(ckpt, write_jsonl(tmp_path / "new.jsonl", NEW), tmp_path / "out").out)
    want = offline.recommend([history], k=8)[0]
    assert [x["id"] for x in served] == [x["id"] for x in want]
    np.testing.assert_allclose([x["score"] for x in served], [x["score"] for x in want], atol=1e-4)
    return offline
