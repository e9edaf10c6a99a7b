"""Level 1 of a two-level head fitted to its own level 2, after training (heads/softmax.ClusterCorrection).

A two-level model ranks by log P(t | h) = log P(c | h) + h . e_t - log Z_c(h). Trained by the
likelihood, level 1 is linear (h . e_c) and cannot follow log Z_c(h), so the exact ranking loses
against the model's own joint scores h . (e_c + e_t) (docs/quality_notes.md section 5, "Level 1 fitted to level 2").
Here g(h) learns log Z_c(h) of every cluster by regression at hidden states of training prefixes
(each distinct prefix once, fit_prefixes),
and level 1 becomes h . e_c + g_c(h): P(c | h) is then each cluster's mass under the joint scores,
and the model is still a two-level softmax (Structure stays exact, nothing of size |I| a query).
Cost: at most STATES forward passes and STATES x |I| dot products once, then STEPS small MLP steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from itemgen.data.dataset import training_sequences
from itemgen.data.load import load_dataset
from itemgen.evaluation.evaluate import rank_examples, subsample
from itemgen.evaluation.metrics import ranking_metrics
from itemgen.heads.softmax import ClusterCorrection, TwoLevelHead
from itemgen.models.checkpoint import load_checkpoint, save_checkpoint
from itemgen.topk.ann import training_states
from itemgen.topk.l2d import training_prefixes

# at most this many training prefixes, each once, whose log Z_c are the regression targets. Until
# commit 7667bfb the fit drew 20,000 prefixes with replacement, which reached 11,502 of office's
# 34,746 distinct histories; g's error at validation states (RMSE) was 0.287 then, 0.251 with every
# prefix (benchmarks/results/level1_fit_states.json)
STATES = 100_000
STEPS = 4000  # Adam steps of BATCH states each
BATCH = 256
LR = 1e-3
OBJECTIVES = ("mse", "kl")  # fit_to_targets' objectives


@torch.no_grad()
def log_normalizers(model, states: torch.Tensor, prefixes: list, chunk: int = 1024) -> torch.Tensor:
    """states (n, H) of ``prefixes`` -> (n, C) log Z_c of every cluster's level-2 logits as the
    model ranks with them: h . e_t plus, with a repeat bias, its value at the prefix's own items
    (a two-level head adds it inside level 2: TwoLevelHead.with_item_bias). Level 1 learns, under
    the likelihood, to lower clusters whose members the bias lowers; targets without it undo that."""
    head, out = model.head, []
    for a in range(0, len(states), chunk):
        logits = (states[a:a + chunk] @ head.item_out.T).float()  # (c, I)
        if getattr(model, "repeat", None) is not None:
            logits = model.repeat.add_histories(logits, prefixes[a:a + chunk])
        out.append(head.cluster_log_normalizers(states[a:a + chunk], logits))
    return torch.cat(out)


def fit_prefixes(ds, max_history: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """Each prefix s[:k] (1 <= k < len(s)) of each training sequence once (topk/l2d.training_prefixes,
    which never reaches a valid/test target; users who share a history give it as often as they
    do), cut to their last ``max_history`` items. When there are more than ``n``, a random ``n`` of
    them, none twice (deterministic for a seed)."""
    hist, _ = training_prefixes(ds.split.train, max_history)
    if not hist:
        raise ValueError("no training sequences with at least 2 items to estimate log Z_c on")
    if len(hist) > n:
        hist = [hist[j] for j in np.sort(np.random.default_rng(seed).choice(len(hist), size=n, replace=False))]
    return hist


def fit_cluster_correction(model, ds, max_history: int, *, states: int | None = None, steps: int | None = None,
                           seed: int = 0, objective: str = "mse") -> dict:
    """Fit ``model.head.correction`` (a TwoLevelHead built with correction > 0) to log Z_c at
    at most ``states`` distinct training prefixes (fit_prefixes) with ``objective`` (fit_to_targets);
    deterministic for a seed. Returns what it did: states, steps,
    mean squared error (per state and cluster) before (g = 0) and after, and seconds."""
    head = model.head
    states, steps = states or STATES, steps or STEPS
    if not isinstance(head, TwoLevelHead) or head.correction is None:
        raise ValueError("fit_cluster_correction needs a two-level head with itemlm.cluster_correction > 0")
    t0 = time.perf_counter()
    with torch.no_grad():
        prefixes = fit_prefixes(ds, max_history, states, seed)
        x = training_states(model, ds, max_history, prefixes=prefixes).to(head.item_out)  # (n, H)
        target = log_normalizers(model, x, prefixes).float()  # (n, C)
    fit = fit_to_targets(head, x, target, steps=steps, seed=seed, objective=objective)
    return {**fit, "seconds": round(time.perf_counter() - t0, 1)}


def fit_to_targets(head: TwoLevelHead, x: torch.Tensor, target: torch.Tensor, *, steps: int = STEPS,
                   seed: int = 0, objective: str = "mse") -> dict:
    """Fit ``head.correction`` to log Z_c targets (n, C) at states x (n, H), in place. ``objective``:
    mse, the squared error of g against log Z_c (the default: what training does); kl, the
    cross-entropy of level 1's cluster distribution against the joint scores' (softmax of h . e_c +
    log Z_c), which weighs each cluster by its mass (benchmarks/level1_diagnosis.py --probes: on
    validation it gains on four of the five cells probed and loses on office frequency; not the
    default, which every `-level1` row was run with; its g estimates log Z_c only up to a shift shared
    by a query's clusters, so refine_checkpoint refuses it). Returns states, steps, width and the squared errors."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be mse or kl, not {objective!r}")
    g = head.correction
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = ClusterCorrection(x.shape[1], head.n_clusters, g.inner.out_features).to(x.device)
        gen = torch.Generator(device=x.device).manual_seed(seed)
    with torch.no_grad():
        fresh.outer.bias.copy_(target.mean(0))  # each cluster's mean log Z: a start the MLP corrects
        linear = (x @ head.centroids.T).float()  # (n, C) level 1 as trained: only the kl objective reads it
    opt = torch.optim.Adam(fresh.parameters(), lr=LR)
    with torch.enable_grad():
        for _ in range(steps):
            b = torch.randint(0, len(x), (BATCH,), generator=gen, device=x.device)
            if objective == "mse":
                loss = (fresh(x[b]) - target[b]).square().mean()
            else:
                joint = torch.softmax(linear[b] + target[b], 1)  # (BATCH, C) each cluster's mass
                loss = -(joint * torch.log_softmax(linear[b] + fresh(x[b]), 1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        g.load_state_dict(fresh.state_dict())
        after = float((g(x) - target).square().mean())
    return {"states": len(x), "steps": steps, "width": g.inner.out_features, "objective": objective,
            "mse_at_zero": round(float(target.square().mean()), 4),
            "mse_at_cluster_mean": round(float((target - target.mean(0)).square().mean()), 4),
            "mse": round(after, 4)}


def clear_cluster_correction(head: TwoLevelHead) -> None:
    """g back to zero: level 1 as the likelihood trained it."""
    with torch.no_grad():
        head.correction.outer.weight.zero_()
        head.correction.outer.bias.zero_()


def fit_and_keep(model, ds, max_history: int, *, seed: int, before: float, validate: Callable[[], dict],
                 then: Callable[[], dict] | None = None, objective: str = "mse") -> tuple[dict, dict]:
    """Fit g (fit_cluster_correction), then keep it only if ``validate()``'s NDCG@10 beats
    ``before`` (the figure without it), else clear it. ``then()``: a step after the fit that trains
    other weights too (fit_checkpoint's second stage), recorded as the fit's "stage"; kept or
    undone with the fit (undone: every weight back as it was). -> (the fit's record with both
    figures and whether it was kept, validate()'s metrics with g)."""
    source = {k: v.clone() for k, v in model.state_dict().items()} if then is not None else None
    fit = fit_cluster_correction(model, ds, max_history, seed=seed, objective=objective)
    if then is not None:
        fit["stage"] = then()
    metrics = validate()
    fit.update({"valid_ndcg@10_before": before, "valid_ndcg@10": metrics["ndcg@10"],
                "kept": metrics["ndcg@10"] > before})
    if not fit["kept"]:
        if source is not None:
            model.load_state_dict(source)  # g's output layer was zero there too
        else:
            clear_cluster_correction(model.head)
    return fit, metrics


STAGE_LR = 1e-4  # the second stage's learning rate, every weight but g (decays to 0, cosine)


def second_stage(model, ds, cfg, *, epochs: float, lr: float = STAGE_LR, train_g: bool = False,
                 seed: int = 1) -> float:
    """Train a two-level model on with the likelihood after its level 1 was fitted, g frozen (or
    trained too, ``train_g``): level 2 and the backbone adapt to the corrected level 1 h . e_c + g(h)
    (docs/quality_notes.md section 5). Adam at ``lr`` for every trainable weight, cosine to 0 over
    ``epochs`` passes over the training sequences, the config's batch size and gradient clip;
    deterministic for a seed. Returns seconds."""
    t0 = time.perf_counter()
    g = getattr(model.head, "correction", None)  # None: a full-softmax model trains the same way
    if g is not None:
        g.requires_grad_(train_g)
    seqs = training_sequences(ds, cfg.data.max_history)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    total = max(1, int(math.ceil(len(seqs) / cfg.train.batch_size) * epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng, step = np.random.default_rng(seed), 0
    torch.manual_seed(seed)  # dropout
    model.train()
    while step < total:
        perm = rng.permutation(len(seqs))
        for a in range(0, len(perm), cfg.train.batch_size):
            if step == total:
                break
            batch = [seqs[i] for i in perm[a:a + cfg.train.batch_size]]
            loss = model(model.to_device(model.train_batch(batch, rng))) / max(model.n_labels(batch), 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
    model.eval()
    if g is not None:
        g.requires_grad_(False)
    return round(time.perf_counter() - t0, 1)


def _load_source(checkpoint: str | Path, out: str | Path, what: str):
    """-> (model, config) of a checkpoint that a post-training step (``what``) rewrites to
    ``out``, never over itself."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out {out} is the checkpoint itself: {what} writes a new checkpoint beside it")
    model, cfg, _ = load_checkpoint(checkpoint)
    return model, cfg


def _dataset(cfg, data: str | Path | None):
    return load_dataset(replace(cfg, data=replace(cfg.data, path=str(data))) if data else cfg)


def _validator(model, cfg, ds) -> Callable[[], dict]:
    """validate() -> the model's metrics on the validation users training validated on, ranked
    as training ranked them (train.eval_exclude_history)."""
    opts = dict(max_history=cfg.data.max_history, batch_size=cfg.train.eval_batch_size,
                exclude_history=cfg.train.eval_exclude_history)
    valid = subsample(ds.split.valid, cfg.train.eval_users, cfg.train.seed)
    return lambda: ranking_metrics(rank_examples(model, valid, **opts))


def fit_checkpoint(checkpoint: str | Path, out: str | Path, width: int, *, data: str | Path | None = None,
                   stage_epochs: float = 0.0, stage_lr: float = STAGE_LR, objective: str = "mse") -> dict:
    """The fit on a trained two-level checkpoint that has no correction yet: what training with
    ``itemlm.cluster_correction=width`` would have written (the likelihood trains the same weights
    with or without it: tests/test_two_level.py), saved to ``out`` with its validation figures
    before and after. The correction is kept only if validation gains, else ``out`` holds g = 0.
    ``stage_epochs`` > 0: after the fit, a second_stage of that many epochs at ``stage_lr``, and the
    fit and the stage are kept together only if validation gains over the source, else ``out`` holds
    the source's weights with g = 0. ``objective``: the fit's (fit_to_targets: mse or kl)."""
    model, cfg = _load_source(checkpoint, out, "the fit")
    head = getattr(model, "head", None)
    if not isinstance(head, TwoLevelHead):
        raise ValueError(f"{checkpoint}: not a two-level checkpoint (itemlm.head=two_level)")
    if head.correction is not None:
        raise ValueError(f"{checkpoint}: level 1 already has a correction (itemlm.cluster_correction="
                         f"{cfg.itemlm.cluster_correction})")
    if width < 1:
        raise ValueError("width must be >= 1")
    if objective not in OBJECTIVES:  # before any work (fit_to_targets checks it too)
        raise ValueError(f"the fit's objective must be mse or kl, not {objective!r}")
    if not (stage_epochs >= 0 and math.isfinite(stage_epochs)) or not (stage_lr > 0 and math.isfinite(stage_lr)):
        raise ValueError(f"stage epochs must be >= 0 and its learning rate > 0 (got {stage_epochs}, {stage_lr})")
    cfg = replace(cfg, itemlm=replace(cfg.itemlm, cluster_correction=width))
    ds = _dataset(cfg, data)
    head.correction = ClusterCorrection.frozen(head.item_out.shape[1], head.n_clusters, width).to(head.item_out.device)
    validate = _validator(model, cfg, ds)
    before = validate()

    # with a stage: the fit, then the stage, kept or undone together (fit_and_keep's ``then``)
    stage = (lambda: {"epochs": stage_epochs, "lr": stage_lr,
                      "seconds": second_stage(model, ds, cfg, epochs=stage_epochs, lr=stage_lr)}) if stage_epochs else None
    fit, after = fit_and_keep(model, ds, cfg.data.max_history, seed=cfg.train.seed, before=before["ndcg@10"],
                              validate=validate, then=stage, objective=objective)
    fit["from"] = str(checkpoint)
    chosen = {**(after if fit["kept"] else before), "level1_fit": fit}
    save_checkpoint(out, model, cfg, ds.items, dataset=ds.manifest(), metrics={"valid": chosen})
    return fit


def refine_grid(n_clusters: int) -> list[int]:
    """The values of TwoLevelHead.refine that refine_checkpoint tries: 0 (off) to ceil(sqrt(C)),
    so that the exact clusters cost at most about |I| / sqrt(C) dot products a query (sub-linear:
    about |I|^(3/4) with C = sqrt(|I|))."""
    return list(range(0, math.ceil(math.sqrt(n_clusters)) + 1))


def refine_checkpoint(checkpoint: str | Path, out: str | Path, *, grid: list[int] | None = None,
                      data: str | Path | None = None) -> dict:
    """Choose ``itemlm.cluster_refine`` (TwoLevelHead.refine) for a two-level checkpoint whose
    level 1 has a fitted correction, by validation NDCG@10 over ``grid`` (default refine_grid;
    0 keeps it off), and save the checkpoint with the chosen value to ``out``. Nothing is trained.
    Returns each value's validation NDCG@10 and the choice (ties: the smaller, cheaper value)."""
    model, cfg = _load_source(checkpoint, out, "the choice")
    head = getattr(model, "head", None)
    if not isinstance(head, TwoLevelHead) or head.correction is None:
        raise ValueError(f"{checkpoint}: refining needs a two-level checkpoint whose level 1 has a correction "
                         "(itemlm.cluster_correction > 0: `itemgen clusters fit-level1`)")
    metrics = Path(checkpoint) / "metrics.json"
    fit = (json.loads(metrics.read_text()).get("valid") or {}).get("level1_fit") or {} if metrics.is_file() else {}
    if fit.get("objective", "mse") != "mse":
        # the kl fit matches level 1's softmax, which ignores a shift of g shared by a query's
        # clusters: g is then no estimate of log Z_c itself, and exact log Z_c cannot stand beside it
        raise ValueError(f"{checkpoint}: refining needs g fitted to log Z_c itself (objective mse); this level 1 "
                         f"was fitted with objective {fit['objective']}")
    grid = refine_grid(head.n_clusters) if grid is None else sorted(set(grid))
    if not grid or min(grid) < 0 or max(grid) > head.n_clusters:
        raise ValueError(f"refine values must be between 0 and the {head.n_clusters} clusters, got {grid}")
    ds = _dataset(cfg, data)
    validate = _validator(model, cfg, ds)
    t0 = time.perf_counter()
    tried = {}
    for m in grid:
        head.refine = m
        tried[m] = validate()
    chosen = max(grid, key=lambda m: (tried[m]["ndcg@10"], -m))
    head.refine = chosen
    cfg = replace(cfg, itemlm=replace(cfg.itemlm, cluster_refine=chosen))
    record = {"from": str(checkpoint), "grid": grid, "valid_ndcg@10": {m: tried[m]["ndcg@10"] for m in grid},
              "chosen": chosen, "seconds": round(time.perf_counter() - t0, 1)}
    save_checkpoint(out, model, cfg, ds.items, dataset=ds.manifest(),
                    metrics={"valid": {**tried[chosen], **({"level1_fit": fit} if fit else {}), "level1_refine": record}})
    return record
