"""Why the exact two-level model ranks below its own joint scores, and what the level-1 fit
recovers (docs/quality_notes.md section 5, "Level 1 fitted to level 2"). For trained two-level
checkpoints (benchmarks/quality.py's `two-level-M` rows), NDCG@10 of the same item scores with five
level-1 logits: the trained linear one (h . e_c), h . e_c + g(h) with g fitted as training does
(targets with the repeat bias), g fitted to targets without the bias, and the exact log Z_c
(an oracle, |I| dot products a query); plus the joint scores h . (e_c + e_t) themselves. History
masked, validation users (and test users where --splits says so: a diagnosis, no choice), with
where the fitted level 1 loses against the exact one. --probes adds, for the cells it names, other
fits and a second training stage (probes()); --reference ROW the same stage on a full-softmax row.
--refine-probes and --fit-states run only refine_probes() or fit_states_probe() on `-level1` rows.

    python benchmarks/level1_diagnosis.py --work /work/runs/recipe --splits valid,test --probes office/frequency

    python benchmarks/level1_diagnosis.py --work /work/runs/recipe --splits valid,test \
        --fit-states office/frequency,office/random --results benchmarks/results/level1_fit_states.json

Writes benchmarks/results/level1_diagnosis.json (or --results).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from itemgen.api import run_info  # noqa: E402
from itemgen.core.io import atomic_write_text  # noqa: E402
from itemgen.data.dataset import SequenceDataset  # noqa: E402
from itemgen.evaluation.evaluate import rank_examples  # noqa: E402
from itemgen.evaluation.metrics import ndcg_gains, ranking_metrics  # noqa: E402
from itemgen.heads.softmax import ClusterCorrection  # noqa: E402
from itemgen.models.checkpoint import load_checkpoint  # noqa: E402
from itemgen.topk.ann import training_prefixes  # noqa: E402
from itemgen.training.level1_fit import (STATES, fit_cluster_correction, fit_prefixes, fit_to_targets,  # noqa: E402
                                        log_normalizers, refine_grid, second_stage)

RESULTS = ROOT / "benchmarks" / "results" / "level1_diagnosis.json"


class QueryTerms:
    """A two-level model's terms at the query states of ``examples`` (histories cut to
    ``max_history``): q (n, H), il (n, I) level-2 logits with the repeat bias, lz (n, C) the exact
    log Z_c (the bias included, as the model ranks), cl (n, C) the linear level 1 h . e_c, and the
    targets (n,)."""

    @torch.no_grad()
    def __init__(self, model, examples, max_history: int = 50):
        head = self.head = model.head
        self.examples = examples
        self.hist = [e.history[-max_history:] for e in examples]
        self.q = torch.cat([model.encode_histories(self.hist[s:s + 256]) for s in range(0, len(self.hist), 256)]).float()
        self.lz = log_normalizers(model, self.q, self.hist)  # (n, C)
        il = self.q @ head.item_out.T
        self.il = model.repeat.add_histories(il, self.hist) if model.repeat is not None else il  # (n, I)
        self.cl = self.q @ head.centroids.T  # (n, C)
        self.targets = torch.tensor([e.target for e in examples])

    def gains(self, scores: torch.Tensor) -> np.ndarray:
        """(n, I) item scores -> each user's NDCG@10 gain, history masked."""
        s = scores.clone()
        for j, e in enumerate(self.examples):
            s[j, torch.as_tensor(e.history)] = float("-inf")
        return ndcg_gains((s > s.gather(1, self.targets[:, None])).sum(1).numpy() + 1)

    def exact(self, level1: torch.Tensor) -> torch.Tensor:
        """(n, C) level-1 logits -> (n, I) the two-level log P with them and the exact level 2."""
        return torch.log_softmax(level1, 1)[:, self.head.assign] + self.il - self.lz[:, self.head.assign]


@torch.no_grad()
def figures(model, examples, popularity: np.ndarray | None = None) -> dict:
    """NDCG@10 (history masked) of each level 1 over ``examples``; g as the head holds it. With
    ``popularity`` (C,) (each cluster's mean training count): where the fitted level 1 loses
    against the exact log Z_c, by the quartile of the target's cluster, and g's mean error at each
    user's highest-mass cluster under the joint scores."""
    head = model.head
    t = QueryTerms(model, examples)
    q, lz, il, cl, targets = t.q, t.lz, t.il, t.cl, t.targets
    gains, exact = t.gains, t.exact

    g = head.correction(q)
    fitted, oracle = gains(exact(cl + g)), gains(exact(cl + lz))
    out = {"linear": round(float(gains(exact(cl)).mean()), 4), "fitted": round(float(fitted.mean()), 4),
           "oracle": round(float(oracle.mean()), 4), "joint": round(float(gains(il + cl[:, head.assign]).mean()), 4),
           "g_mse": round(float((g - lz).square().mean()), 4),
           "log_z_std_about_cluster_mean": round(float((lz - lz.mean(0)).std()), 3), "users": len(examples)}
    if popularity is not None:
        quartile = np.searchsorted(np.quantile(popularity, [0.25, 0.5, 0.75]), popularity[head.assign[targets].numpy()])
        out["by_target_cluster_popularity"] = [
            {"quartile": k, "users": int((quartile == k).sum()),
             "fitted": round(float(fitted[quartile == k].mean()), 4), "oracle": round(float(oracle[quartile == k].mean()), 4),
             # this quartile's share of the gap, in NDCG@10 over all users
             "gap": round(float((oracle - fitted)[quartile == k].sum() / len(examples)), 5)} for k in range(4)]
        top = (cl + lz).argmax(1, keepdim=True)  # (n, 1) each user's highest-mass cluster
        out["g_error_at_top_mass_cluster"] = round(float((g - lz).gather(1, top).mean()), 3)
    return out


@torch.no_grad()
def states(model, prefixes: list, dropout: bool) -> torch.Tensor:
    """(n, H) query states at ``prefixes``, with the model's dropout on or off."""
    model.train(dropout)
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))  # little padding
    out = torch.empty(len(prefixes), model.head.item_out.shape[1])
    for a in range(0, len(order), 64):
        idx = order[a:a + 64]
        out[torch.as_tensor(idx)] = model.encode(model.to_device(model.query_batch([prefixes[i] for i in idx]))).float()
    model.eval()
    return out


def skipped_prefixes(ds, max_history: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` training prefixes s[:k] followed by s[k + 1] (s[k] skipped): inputs the backbone never
    trained on that end with an item of the same user, as a test query ends with the validation item."""
    rng = np.random.default_rng([seed, 1])
    seqs = [s for s in ds.split.train if len(s) >= 3]
    out = []
    for i in rng.choice(len(seqs), size=n):
        s = seqs[i]
        k = int(rng.integers(1, len(s) - 1))
        out.append(np.concatenate([s[:k], s[k + 1:k + 2]])[-max_history:])
    return out


def probes(checkpoint: Path, width: int, splits: list[str]) -> dict:
    """Other ways to fit or train level 1, each from the same checkpoint, each scored on ``splits``
    (docs/quality_notes.md section 5): the kl objective; states drawn with dropout on (two draws
    of the same prefixes); the default states plus half as many skipped_prefixes; a second training stage after the fit, g frozen (2 epochs at 1e-4, then g
    fitted again) or trained by the likelihood too (1 epoch); g's error on the states it was fitted
    on and on validation and test states."""
    def load():
        model, cfg, _ = load_checkpoint(checkpoint)
        model.head.correction = ClusterCorrection.frozen(model.head.item_out.shape[1], model.head.n_clusters, width)
        return model.eval(), cfg

    model, cfg = load()
    ds = SequenceDataset.load(cfg.data.path)
    seed, mh = cfg.train.seed, cfg.data.max_history
    scored = lambda m: {split: {k: v for k, v in figures(m, ds.examples(split)).items()  # noqa: E731
                                if k in ("fitted", "g_mse")} for split in splits}
    prefixes = fit_prefixes(ds, mh, STATES, seed)  # the default fit's states (fit_cluster_correction)
    x = states(model, prefixes, dropout=False)
    target = log_normalizers(model, x, prefixes).float()
    out = {}
    fit_to_targets(model.head, x, target, seed=seed, objective="kl")
    out["kl_objective"] = scored(model)
    torch.manual_seed(seed)  # the dropout masks (runs before this seed differed by up to 0.0014)
    drawn = [states(model, prefixes, dropout=True) for _ in range(2)]
    fit_to_targets(model.head, torch.cat(drawn), torch.cat([log_normalizers(model, d, prefixes).float() for d in drawn]),
                   seed=seed)
    out["states_with_dropout"] = scored(model)
    novel = skipped_prefixes(ds, mh, STATES // 2, seed)
    xn = states(model, novel, dropout=False)
    fit_to_targets(model.head, torch.cat([x, xn]), torch.cat([target, log_normalizers(model, xn, novel).float()]),
                   seed=seed)
    out["plus_skipped_prefixes"] = scored(model)
    fit_to_targets(model.head, x, target, seed=seed)  # the default fit again
    # (until 7667bfb the fit drew its prefixes and this also held out 5,000 others, as
    # "other_training_prefixes"; it now fits every one: fit_prefixes)
    out["g_rmse"] = {"training_states_fitted": round(float((model.head.correction(x) - target).square().mean().sqrt()), 3),
                     **{split: round(figures(model, ds.examples(split))["g_mse"] ** 0.5, 3) for split in splits}}
    seconds = second_stage(model, ds, cfg, epochs=2, lr=1e-4, train_g=False)
    out["second_stage_g_frozen"] = {"seconds": seconds, **scored(model)}
    fit_cluster_correction(model, ds, mh, seed=seed)
    out["second_stage_g_frozen_then_refit"] = scored(model)
    model, cfg = load()
    fit_cluster_correction(model, ds, mh, seed=seed)
    seconds = second_stage(model, ds, cfg, epochs=1, lr=1e-4, train_g=True)
    out["second_stage_g_trained"] = {"seconds": seconds, **scored(model)}
    return out


def top_mask(score: torch.Tensor, m: int) -> torch.Tensor:
    """(n, C) scores -> (n, C) bool, True at each row's ``m`` highest."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, torch.topk(score, m, 1).indices, True) if m else mask


@torch.no_grad()
def refine_probes(checkpoint: Path, splits: list[str], ms: list[int], fits: int = 4) -> dict:
    """On a `-level1` checkpoint (g fitted), what the refinement (TwoLevelHead.refine) reaches and
    four other ways to spend or correct it, NDCG@10 (history masked) at each M in ``ms``:
    - `g`: the refinement as the head does it (g's M highest clusters exact), with the share of
      users whose target's cluster is refined and the gap to the exact level 1 (`oracle`) split
      between those users and the others (summed over all users, in NDCG@10);
    - `plus_history_clusters`: the clusters of the history items exact too;
    - `shift_<l>`: the other clusters moved by l times the mean residual log Z_c - g over the
      refined ones (the residual's mean: `refined_residual`);
    - `mean_of_fits`: g as the mean of ``fits`` fits (seeds 0..fits-1; the checkpoint's is seed 0);
    - `joint_max_selection`: the M clusters refined chosen by their best joint score
      h . (e_c + e_t) instead of by level 1;
    and g's root mean square error against log Z_c for the checkpoint's fit and the mean of fits."""
    model, cfg, _ = load_checkpoint(checkpoint)
    model.eval()
    head = model.head
    head.refine = 0
    ds = SequenceDataset.load(cfg.data.path)
    gs = [copy.deepcopy(head.correction)]  # the checkpoint's fit (seed 0)
    for k in range(1, fits):
        fit_cluster_correction(model, ds, cfg.data.max_history, seed=k)  # into head.correction
        gs.append(copy.deepcopy(head.correction))
    head.correction.load_state_dict(gs[0].state_dict())
    out = {}
    for split in splits:
        t = QueryTerms(model, ds.examples(split), cfg.data.max_history)
        q, lz, il, cl = t.q, t.lz, t.il, t.cl
        target_cluster = head.assign[t.targets]
        in_history = torch.zeros_like(lz, dtype=torch.bool)
        for j, h in enumerate(t.hist):
            in_history[j, head.assign[torch.as_tensor(h)]] = True
        joint_max = torch.full_like(lz, float("-inf")).scatter_reduce(
            1, head.assign.expand(len(q), -1), il + cl[:, head.assign], "amax")  # (n, C)

        def gains(level1: torch.Tensor) -> np.ndarray:
            return t.gains(t.exact(level1))

        g_own, g_mean = gs[0](q), torch.stack([g(q) for g in gs]).mean(0)
        oracle = gains(cl + lz)
        row = {"users": len(t.examples), "oracle": round(float(oracle.mean()), 4),
               "g_rmse": round(float((g_own - lz).square().mean().sqrt()), 3),
               "mean_of_fits_rmse": round(float((g_mean - lz).square().mean().sqrt()), 3)}
        for m in ms:
            level1 = cl + g_own
            refined = top_mask(level1, m)
            got = gains(torch.where(refined, cl + lz, level1))
            hit = refined.gather(1, target_cluster[:, None]).squeeze(1).numpy()
            residual = (lz - g_own).masked_fill(~refined, 0).sum(1, keepdim=True) / max(m, 1)  # (n, 1)
            mean_level1 = cl + g_mean
            row[f"M{m}"] = {
                "g": round(float(got.mean()), 4),
                "target_cluster_refined": round(float(hit.mean()), 3),
                "gap_to_oracle_target_refined": round(float((oracle - got)[hit].sum() / len(t.examples)), 5),
                "gap_to_oracle_target_not_refined": round(float((oracle - got)[~hit].sum() / len(t.examples)), 5),
                "plus_history_clusters": round(float(gains(torch.where(refined | in_history, cl + lz, level1)).mean()), 4),
                "refined_residual": round(float(residual.mean()), 3) if m else None,
                **{f"shift_{lam}": round(float(gains(torch.where(refined, cl + lz, level1 + lam * residual)).mean()), 4)
                   for lam in (0.25, 0.5, 1.0) if m},
                "mean_of_fits": round(float(gains(torch.where(top_mask(mean_level1, m), cl + lz, mean_level1)).mean()), 4),
                "joint_max_selection": round(float(gains(torch.where(top_mask(joint_max, m), cl + lz, level1)).mean()), 4),
            }
        out[split] = row
    return out


DRAWN_BEFORE = 20000  # the fit's states until 7667bfb: training prefixes drawn with replacement


@torch.no_grad()
def fit_states_probe(checkpoint: Path, splits: list[str], ms: list[int]) -> dict:
    """On a `-level1` checkpoint, g fitted (seed 0, the default steps) at two sets of states: the
    DRAWN_BEFORE training prefixes drawn with replacement that the fit used until 7667bfb, and every
    distinct training prefix (fit_prefixes, the fit since). For each: its states (and how many are
    distinct), the fit's training error, g's root mean square error against log Z_c at the
    ``splits``' query states (states it was not fitted on: a label-free criterion), and NDCG@10
    (history masked) with level 1 refined at each M in ``ms`` (M = 0: g alone)."""
    model, cfg, _ = load_checkpoint(checkpoint)
    model.eval()
    head = model.head
    ds = SequenceDataset.load(cfg.data.path)
    seed, mh = cfg.train.seed, cfg.data.max_history
    terms = {split: QueryTerms(model, ds.examples(split), mh) for split in splits}
    sets = {"drawn_with_replacement": training_prefixes(ds, mh, DRAWN_BEFORE, seed),
            "every_distinct_prefix": fit_prefixes(ds, mh, STATES, seed)}
    out = {}
    for name, prefixes in sets.items():
        x = states(model, prefixes, dropout=False)
        fit = fit_to_targets(head, x, log_normalizers(model, x, prefixes).float(), seed=seed)
        row = {"states": len(prefixes), "distinct": len({(len(p), p.tobytes()) for p in prefixes}),
               "fit_mse": fit["mse"]}
        for split, t in terms.items():
            level1 = t.cl + head.correction(t.q)
            row[split] = {"g_rmse": round(float((level1 - t.cl - t.lz).square().mean().sqrt()), 3),
                          **{f"M{m}": round(float(t.gains(t.exact(torch.where(top_mask(level1, m), t.cl + t.lz,
                                                                               level1))).mean()), 4) for m in ms}}
        out[name] = row
    return out


def reference_stage(checkpoint: Path, splits: list[str]) -> dict:
    """The same second stage (2 epochs at 1e-4) on a full-softmax checkpoint, NDCG@10 (history
    masked) before and after: what the extra training gives a model without a level 1 to correct."""
    model, cfg, _ = load_checkpoint(checkpoint)
    model.eval()
    ds = SequenceDataset.load(cfg.data.path)

    def scored() -> dict:
        return {split: round(float(ranking_metrics(rank_examples(
            model, ds.examples(split), max_history=cfg.data.max_history, exclude_history=True))["ndcg@10"]), 4)
            for split in splits}

    before = scored()
    seconds = second_stage(model, ds, cfg, epochs=2, lr=1e-4, train_g=False)
    return {"checkpoint": str(checkpoint), "before": before, "after": scored(), "seconds": seconds}


def probe_level1_rows(args, name: str, cells: str, probe) -> None:
    """Only ``probe(checkpoint, splits, ms)`` on each cell's `two-level-CLUSTERS-level1` checkpoint
    (DATASET/CLUSTERS,...), M over refine_grid (0 to ceil(sqrt(C))), written to --results under ``name``."""
    out = {}
    for cell in cells.split(","):
        dname, method = cell.split("/")
        ckpt = args.work / dname / f"two-level-{method}-level1" / "best"
        out[cell] = probe(ckpt, args.splits.split(","), refine_grid(load_checkpoint(ckpt)[0].head.n_clusters))
        print(json.dumps({cell: out[cell]}), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, json.dumps({**run_info(), "command": " ".join(["python", *sys.argv]),
                                                "profile": "cpu (2 layers), history masked", name: out}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="benchmarks/quality.py's --work")
    ap.add_argument("--cells", default="office/frequency,office/random,instruments/random", help="DATASET/CLUSTERS,...")
    ap.add_argument("--splits", default="valid", help="valid[,test]")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--probes", default="", help="DATASET/CLUSTERS,... of --cells that also get probes()")
    ap.add_argument("--reference", default="", help="a full-softmax row (itemlm) whose second stage "
                    "(reference_stage) is measured beside the probes, once per probed dataset")
    ap.add_argument("--refine-probes", default="", help="DATASET/CLUSTERS,...: only refine_probes() on their "
                    "`two-level-CLUSTERS-level1` checkpoints, at M = 0 to ceil(sqrt(C)) (pair with --results)")
    ap.add_argument("--fit-states", default="", help="DATASET/CLUSTERS,...: only fit_states_probe() on their "
                    "`two-level-CLUSTERS-level1` checkpoints, at M = 0 to ceil(sqrt(C)) (pair with --results)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, cells, probe in (("fit_states", args.fit_states, fit_states_probe),
                               ("refine_probes", args.refine_probes, refine_probes)):
        if cells:
            probe_level1_rows(args, name, cells, probe)
            return
    rows = []
    for cell in args.cells.split(","):
        dname, method = cell.split("/")
        t0 = time.time()
        model, cfg, _ = load_checkpoint(args.work / dname / f"two-level-{method}" / "best")
        model.eval()
        ds = SequenceDataset.load(cfg.data.path)
        head = model.head
        head.correction = ClusterCorrection.frozen(head.item_out.shape[1], head.n_clusters, args.width)
        row = {"dataset": dname, "clusters": method, "checkpoint": f"two-level-{method}", "width": args.width}
        fit = fit_cluster_correction(model, ds, cfg.data.max_history, seed=cfg.train.seed)
        row["fit"] = fit
        counts = np.bincount(np.concatenate(ds.split.train), minlength=ds.n_items)
        popularity = np.array([counts[head.members(c).numpy()].mean() for c in range(head.n_clusters)])
        for split in args.splits.split(","):
            row[split] = figures(model, ds.examples(split), popularity)
        # the same fit with targets that leave the repeat bias out
        plain = types.SimpleNamespace(head=head, repeat=None, encode=model.encode, query_batch=model.query_batch,
                                      to_device=model.to_device, eval=model.eval)
        fit_cluster_correction(plain, ds, cfg.data.max_history, seed=cfg.train.seed)
        row["valid"]["fitted_without_bias_in_targets"] = figures(model, ds.examples("valid"))["fitted"]
        if cell in args.probes.split(","):
            row["probes"] = probes(args.work / dname / f"two-level-{method}" / "best", args.width,
                                   args.splits.split(","))
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {**run_info(), "command": " ".join(["python", *sys.argv]), "profile": "cpu (2 layers), history masked",
           "rows": rows}
    if args.reference:
        out["reference_second_stage"] = {
            dname: reference_stage(args.work / dname / args.reference / "best", args.splits.split(","))
            for dname in dict.fromkeys(cell.split("/")[0] for cell in args.probes.split(",") if cell)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
