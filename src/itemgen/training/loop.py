"""One training loop for every recommender, on Hugging Face Accelerate: the same code runs on
one CPU, one GPU, or several processes under ``accelerate launch``.

Batches are planned globally and deterministically from (seed, epoch): every process builds the
same plan and takes its shard, and the loss is the sum over the shard divided by the GLOBAL
label count (times the world size, which DDP's gradient averaging undoes), so N processes take
exactly the optimizer step one process would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from itemgen.core.config import Config, ConfigError, TextKNNConfig
from itemgen.core.io import atomic_write_text, clear_stale_temps
from itemgen.core.progress import Progress
from itemgen.data.dataset import SequenceDataset, training_sequences
from itemgen.data.load import load_dataset
from itemgen.evaluation.closed_prior import best_prior, prior_grid, probe_items, ranks_by_prior
from itemgen.evaluation.score_search import ranks_at, score_parts, search, search_metrics
from itemgen.evaluation.evaluate import rank_examples, subsample
from itemgen.evaluation.metrics import ranking_metrics
from itemgen.heads.softmax import TwoLevelHead
from itemgen.models.checkpoint import load_checkpoint, load_trainer_state, load_weights, save_checkpoint
from itemgen.models.recommender import Recommender
from itemgen.models.registry import build_model
from itemgen.models.text_knn import TextKNN
from itemgen.training.distill import attach_distillation
from itemgen.training.item_init import init_items
from itemgen.training.level1_fit import fit_and_keep
from itemgen.training.losses import attach_loss, item_counts

BUCKET = 50  # batches per length-sorting window: similar lengths together, still shuffled


@dataclass
class TrainResult:
    out: Path
    best: Path
    step: int
    best_valid: dict
    train_seconds: float
    stopped: str  # max_steps | early_stopping | time_limit | paused | nothing_to_train
    epochs: float = 0.0  # passes over the training sequences (steps / batches per epoch)
    best_step: int = 0  # the step of the best validation (what best/ holds)


def plan_epoch(seqs: list[np.ndarray], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Deterministic batches of indices into seqs: shuffle, sort by length within windows of
    BUCKET batches (less padding), then shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(seqs))
    batches = []
    window = batch_size * BUCKET
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort([len(seqs[i]) for i in chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def budget(t, batches_per_epoch: int) -> tuple[int, int]:
    """-> (step budget, steps between validations): train.max_steps, or fewer when
    train.max_epochs ends the run first; eval_every_epochs converted to steps."""
    max_steps = t.max_steps
    if t.max_epochs is not None:
        max_steps = min(max_steps, max(1, math.ceil(t.max_epochs * batches_per_epoch)))
    eval_every = t.eval_every
    if t.eval_every_epochs is not None:
        eval_every = max(1, round(t.eval_every_epochs * batches_per_epoch))
    return max_steps, eval_every


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_history(path: Path, step: int) -> None:
    """Keep the rows of history.jsonl up to ``step`` (a run resumed from its last checkpoint
    repeats the steps logged after it), so its steps keep increasing."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def check_out(out: Path) -> None:
    """train.out must be a folder, or a path where one can be made: say so before any work."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is a file" if p == out else f"is under {p}, which is a file"
                raise ConfigError(f"train.out={out} {what}, not a folder: choose another train.out")
            return


def make_optimizer(model: Recommender, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embedding tables; optional backbone lr."""
    t = cfg.train
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower() or "emb" in name.lower()
        is_backbone = name.startswith("backbone.")
        groups.setdefault((no_decay, is_backbone), []).append(p)
    params = [{"params": ps, "weight_decay": 0.0 if nd else t.weight_decay,
               "lr": (t.backbone_lr or t.lr) if bb else t.lr} for (nd, bb), ps in groups.items()]
    # fused: one kernel over all parameters (CPU and CUDA); the default on CPU is a Python loop
    return torch.optim.AdamW(params, lr=t.lr, fused=True)


def save_untrained(model: Recommender, cfg: Config, ds: SequenceDataset, write: bool = True,
                   started: float | None = None) -> TrainResult:
    """A model with nothing to train (``trainable = False``, e.g. text_knn): validated as a trained
    one would be, then written to OUT/best (no OUT/last: there is nothing to resume) by the main
    process (``write``). Its seconds count from ``started`` (perf_counter before the model was
    built: building is its training, e.g. encoding every item's text)."""
    t, out = cfg.train, Path(cfg.train.out)
    t0 = time.perf_counter() if started is None else started
    valid = subsample(ds.split.valid, t.eval_users, t.seed)
    metrics = ranking_metrics(rank_examples(model, valid, max_history=cfg.data.max_history,
                                            batch_size=t.eval_batch_size, exclude_history=t.eval_exclude_history))
    seconds = time.perf_counter() - t0
    if not write:
        return TrainResult(out, out / "best", 0, metrics, seconds, "nothing_to_train")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json() + "\n")
    append_jsonl(out / "log.jsonl", {"step": 0, "epoch": 0.0, "loss": None, "valid": metrics, "seconds": seconds})
    n_params = sum(b.numel() for b in model.buffers())
    save_checkpoint(out / "best", model, cfg, ds.items, dataset=ds.manifest(),
                    metrics={"valid": metrics, "step": 0, "params": n_params, "trainable_params": 0})
    return TrainResult(out, out / "best", 0, metrics, seconds, "nothing_to_train")


def train(cfg: Config, *, resume: bool = False, dataset: SequenceDataset | None = None) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    t = cfg.train
    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    out = Path(t.out)
    check_out(out)
    acc = Accelerator(mixed_precision=mp)
    set_seed(t.seed)
    ds = dataset if dataset is not None else load_dataset(cfg)
    best_dir, last_dir = out / "best", out / "last"
    t_build = time.perf_counter()
    model = build_model(cfg, ds.items)
    if not getattr(model, "trainable", True):  # nothing to train (text_knn): validate and save it as built
        return save_untrained(model, cfg, ds, write=acc.is_main_process, started=t_build)
    if not resume:
        init_items(model, cfg, ds)
    seqs = training_sequences(ds, cfg.data.max_history)
    if not seqs:
        raise ValueError("no training sequences with at least 2 items")
    batches_per_epoch = math.ceil(len(seqs) / t.batch_size)
    max_steps, eval_every = budget(t, batches_per_epoch)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, max_steps, t.lr_schedule))

    step, best_score, bad_evals, best_valid, elapsed, best_step = 0, -1.0, 0, {}, 0.0, 0
    if resume:
        if acc.is_main_process:  # a save killed midway left a hidden .last.XXXXXXXX/ (maybe a whole model)
            for d in (best_dir, last_dir):
                clear_stale_temps(d)
        if not (last_dir / "trainer" / "state.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {last_dir}")
        load_weights(model, last_dir, f"{cfg.model} model")  # checksum, shapes, finite values; an older layout renamed
        state = load_trainer_state(last_dir, optimizer)
        step, best_score, bad_evals = state["step"], state["best_score"], state["bad_evals"]
        best_valid, elapsed = state.get("best_valid", {}), state.get("train_seconds", 0.0)
        best_step = state.get("best_step", 0)
        scheduler.load_state_dict(state["scheduler"])

    model, optimizer = acc.prepare(model, optimizer)
    core: Recommender = acc.unwrap_model(model)
    # sampled losses (the popularity proposal counts the training split), loss.exclude_history
    attach_loss(core, cfg.loss, item_counts(ds.split.train, ds.n_items) if cfg.loss.kind != "full" else None)
    teacher = attach_distillation(core, cfg, ds, seqs)  # None unless distill.teacher is set
    valid = subsample(ds.split.valid, t.eval_users, t.seed)
    world, rank = acc.num_processes, acc.process_index
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json() + "\n")
    n_params = sum(p.numel() for p in core.parameters())
    n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log_path, history_path = out / "log.jsonl", out / "history.jsonl"
    if acc.is_main_process:  # a fresh run in a used folder starts both logs anew; a resumed one keeps its past
        trim_history(history_path, step)
        trim_history(log_path, step)

    def log(record: dict) -> None:
        if acc.is_main_process:
            append_jsonl(log_path, record)

    def history(record: dict) -> None:  # history.jsonl: a row every log_every steps and at every validation
        if acc.is_main_process:
            append_jsonl(history_path, record)

    grid = probe = absent = None
    lexical = getattr(getattr(core, "items", None), "lexical", None)  # its weights: chosen at every validation
    if cfg.items.closed_prior_search > 0:  # the closed-item prior, chosen at every validation (closed_prior.py)
        grid = prior_grid(cfg.items.closed_prior_search)
        probe = probe_items(core.items.id_known, cfg.items.closed_prior_probe, t.seed)  # stand-ins for new items
    if (grid is not None or lexical is not None) and ds.cold_items is not None:
        # a cold split's new items do not exist yet at validation time
        absent = torch.zeros(ds.n_items, dtype=torch.bool)
        absent[torch.from_numpy(ds.cold_items)] = True
    floor = floor_ranks = None
    if lexical is not None and cfg.items.closed_prior_rule == "warm_floor":
        floor = cfg.items.closed_prior_warm_floor
        source = cfg.items.closed_prior_floor_from
        if source != "self":  # the reference model ranks the same validation examples once
            ref_dir = cfg.items.init_from if source == "init" else source
            ref_model, _, _ = load_checkpoint(ref_dir, core.device)
            if ref_model.n_items != ds.n_items:
                raise ValueError(f"items.closed_prior_floor_from: {ref_dir} scores {ref_model.n_items} items, "
                                 f"the dataset has {ds.n_items}")
            floor_ranks = rank_examples(ref_model, valid[rank::world], max_history=cfg.data.max_history,
                                        batch_size=t.eval_batch_size, exclude_history=t.eval_exclude_history,
                                        absent=absent)
            del ref_model
    tail_ranks = None
    if lexical is not None and cfg.items.lexical_rule == "tail_floor":
        # the tail floor's reference: TF-IDF text-kNN over the same words and last items, once
        knn_cfg = TextKNNConfig(encoder="tfidf", last_n=cfg.items.text_match, fields=tuple(cfg.items.text_fields))
        tail_ranks = rank_examples(TextKNN.build(replace(cfg, text_knn=knn_cfg), ds.items), valid[rank::world],
                                   max_history=cfg.data.max_history, batch_size=t.eval_batch_size,
                                   exclude_history=t.eval_exclude_history, absent=absent)

    def validate() -> dict:
        shard = valid[rank::world]
        opts = dict(max_history=cfg.data.max_history, batch_size=t.eval_batch_size,
                    exclude_history=t.eval_exclude_history)
        if lexical is not None:  # w, beta per bucket (and the prior): evaluation/score_search.py
            parts = score_parts(core, shard, absent=absent, **opts)
            probed = score_parts(core, shard, probe=probe, absent=absent, **opts) if probe is not None else None
            total = (lambda x: np.sum(gather_object([x]), 0)) if world > 1 else (lambda x: x)
            chosen, ranks = search(parts, probed, grid, float(core.items.closed_prior), reduce=total, warm_floor=floor,
                                   reference=floor_ranks, tail_floor=tail_ranks is not None, tail_reference=tail_ranks)
            all_ranks = np.concatenate(gather_object([ranks])) if world > 1 else ranks
            if grid is not None:
                core.items.set_closed_prior(chosen["prior"])
            lexical.set_weights(chosen["weight"], chosen["bias"])
            metrics = search_metrics(chosen, all_ranks)
            if probed is not None:  # the figure on validation as it is, without the probe
                plain = ranks_at(parts, chosen["weight"], chosen["bias"], chosen["prior"])
                plain = np.concatenate(gather_object([plain])) if world > 1 else plain
                metrics["ndcg@10_unprobed"] = ranking_metrics(plain)["ndcg@10"]
            return metrics
        if grid is not None:  # validation NDCG@10 with the probe closed, at the best prior of the grid
            by = ranks_by_prior(core, shard, grid, probe=probe, absent=absent, **opts)  # (G, n_shard)
            by = np.concatenate(gather_object([by]), 1) if world > 1 else by
            value, metrics = best_prior(by, grid)  # the same on every process: the same ranks
            core.items.set_closed_prior(value)
            return metrics
        ranks = rank_examples(core, shard, **opts)
        all_ranks = gather_object(list(ranks)) if world > 1 else list(ranks)
        return ranking_metrics(all_ranks)

    def checkpoint(directory: Path, metrics: dict, with_trainer: bool) -> None:
        if not acc.is_main_process:
            return
        state = None
        if with_trainer:
            state = {"step": step, "best_score": best_score, "bad_evals": bad_evals, "best_valid": best_valid,
                     "best_step": best_step, "train_seconds": elapsed + (time.perf_counter() - t0), "scheduler": scheduler.state_dict()}
        save_checkpoint(directory, core, cfg, ds.items, dataset=ds.manifest(), trainer_state=state,
                        optimizer=optimizer if with_trainer else None,
                        metrics={**metrics, "step": step, "params": n_params, "trainable_params": n_train})

    # a bar on a terminal, else a line every log_every steps; bounded by steps and/or train.max_minutes
    progress = Progress(f"train {cfg.model}", max_steps, unit="step", initial=step, elapsed_s=elapsed,
                        time_budget_s=None if t.max_minutes is None else 60 * t.max_minutes,
                        every=t.log_every, every_s=None,
                        quiet=True if not (t.progress and acc.is_main_process) else None,
                        format="json" if t.log_format == "json" else None)
    t0 = time.perf_counter()
    stopped, seen, loss_ema = "max_steps", 0, None

    def history_row() -> dict:  # this step's figures (the loop's variables as they are now)
        return {"step": step, "epoch": epoch_done, "loss": loss_ema, "batch_loss": lv, "lr": lrs,
                "examples_per_s": round(rate, 2), "seconds": round(elapsed + time.perf_counter() - t0, 3),
                "time": round(time.time(), 3)}

    model.train()
    plan, plan_epoch_no = None, -1
    while step < max_steps:
        epoch, pos = divmod(step, batches_per_epoch)
        if epoch != plan_epoch_no:
            plan, plan_epoch_no = plan_epoch(seqs, t.batch_size, t.seed, epoch), epoch
        batch_idx = plan[pos]
        global_seqs = [seqs[i] for i in batch_idx]
        shard = global_seqs[rank::world]
        n_global = core.n_labels(global_seqs)
        rng = np.random.default_rng([t.seed, step, rank])
        batch = core.to_device(core.train_batch(shard, rng)) if shard else None
        if batch is None:  # an uneven last batch can leave a process without examples
            raise ValueError(f"batch of {len(global_seqs)} examples cannot be split over {world} processes")
        if teacher is not None:  # (N, I) the teacher's scores at the same labels
            batch["teacher_scores"] = teacher.scores(shard, rng).to(core.device)
        with acc.autocast():
            loss_sum = model(batch)
        loss = loss_sum * (world / max(n_global, 1))
        lv = loss.item() / world
        acc.backward(loss)
        # the norm of the all-reduced gradients is the same on every process, so all of them stop
        # together (a process raising on its own loss would leave the others waiting forever);
        # max_norm=inf measures without clipping
        norm = float(acc.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")))
        if not math.isfinite(norm):  # stop before the optimizer writes NaN into every weight
            raise FloatingPointError(
                f"non-finite gradients at step {step + 1} (loss {lv}, mixed_precision={mp}); the checkpoints "
                f"written so far are intact: lower train.lr, or set train.mixed_precision=no")
        lrs = [float(g["lr"]) for g in optimizer.param_groups]  # what this step uses, per parameter group
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += len(global_seqs)
        loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        epoch_done = round(step / batches_per_epoch, 3)
        out_of_time = t.max_minutes is not None and (elapsed + time.perf_counter() - t0) > 60 * t.max_minutes
        paused = t.stop_at is not None and step >= t.stop_at
        validating = step % eval_every == 0 or step == max_steps or out_of_time or paused
        progress.update(1, line=not validating, epoch=epoch_done, loss=loss_ema, examples_per_s=rate)
        logged = step % t.log_every == 0
        if validating:
            metrics = validate()
            log({"step": step, "epoch": round(step / batches_per_epoch, 3), "loss": loss_ema, "valid": metrics, "seconds": elapsed + time.perf_counter() - t0})
            score = metrics["ndcg@10"]
            if score > best_score:
                best_score, best_valid, bad_evals, best_step = score, metrics, 0, step
                checkpoint(best_dir, {"valid": metrics}, with_trainer=False)
            else:
                bad_evals += 1
            checkpoint(last_dir, {"valid": metrics}, with_trainer=True)
            history({**history_row(), "valid": metrics, "best_ndcg@10": best_score})
            logged = False
            progress.log(f"valid ndcg@10 {score:.4f}  recall@10 {metrics['recall@10']:.4f}  (best {best_score:.4f})",
                         valid=metrics, best_ndcg10=best_score)
            if bad_evals >= t.patience:
                stopped = "early_stopping"
                break
            if out_of_time:
                stopped = "time_limit"
                break
            if paused:
                stopped = "paused"
                break
        if logged:
            history(history_row())
    acc.wait_for_everyone()
    head = getattr(core, "head", None)
    if isinstance(head, TwoLevelHead) and head.correction is not None and best_valid:
        # level 1 fitted to the best checkpoint's level 2 (training/level1_fit.py); kept only if
        # validation gains. Every process fits the same g (same weights, states and seed).
        load_weights(core, best_dir)
        fit, metrics = fit_and_keep(core, ds, cfg.data.max_history, seed=t.seed, before=best_score, validate=validate)
        if fit["kept"]:
            best_score, best_valid = metrics["ndcg@10"], {**metrics, "level1_fit": fit}
            checkpoint(best_dir, {"valid": best_valid, "best_step": best_step}, with_trainer=False)
        history({"step": step, "level1_fit": fit, "best_ndcg@10": best_score})
        progress.log(f"level 1 fitted: valid ndcg@10 {fit['valid_ndcg@10_before']:.4f} -> {fit['valid_ndcg@10']:.4f} "
                     f"({'kept' if fit['kept'] else 'dropped'})", level1_fit=fit)
    progress.close(f"stopped: {stopped}")
    total = elapsed + time.perf_counter() - t0
    return TrainResult(out, best_dir, step, best_valid, total, stopped, round(step / batches_per_epoch, 3),
                       best_step)
