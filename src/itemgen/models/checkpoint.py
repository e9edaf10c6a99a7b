"""Self-describing checkpoints, written atomically and read without pickle.

    CKPT/model.safetensors      every weight of the recommender
    CKPT/config.json            the full Config it was trained with
    CKPT/items.json             item vocabulary: external ids (index order), titles, dataset hash
    CKPT/metrics.json           validation metrics and training progress
    CKPT/backbone/              HF config + tokenizer of the LM backbone (ItemLM only)
    CKPT/trainer/               optimizer/scheduler/RNG state for --resume (last checkpoint only)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model

from itemgen.core.config import Config, ConfigError, from_dict
from itemgen.core.io import replace_dir
from itemgen.data.dataset import ItemTable
from itemgen.models.recommender import Recommender
from itemgen.models.registry import build_model


class CheckpointError(ValueError):
    pass


def save_checkpoint(directory: str | Path, model: Recommender, cfg: Config, items: ItemTable, *,
                    metrics: dict | None = None, dataset: dict | None = None,
                    trainer_state: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"model": model.name})
        (tmp / "config.json").write_text(cfg.to_json() + "\n")
        titles = items.fields.get("title")
        (tmp / "items.json").write_text(json.dumps(
            {"ids": items.ids, "titles": titles, "dataset": dataset or {}}) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=2) + "\n")
        if hasattr(model, "save_architecture"):
            model.save_architecture(tmp)
        if trainer_state is not None:
            (tmp / "trainer").mkdir()
            tensors, meta = _flatten_optimizer(optimizer) if optimizer is not None else ({}, {})
            tensors["torch_rng"] = torch.get_rng_state()
            save_file(tensors, str(tmp / "trainer" / "state.safetensors"))
            (tmp / "trainer" / "state.json").write_text(json.dumps({**trainer_state, "optimizer": meta}) + "\n")
        for name, blob in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(blob)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> Config:
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an itemgen checkpoint (no config.json)")
    try:
        return from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_items(directory: str | Path) -> tuple[ItemTable, dict]:
    path = Path(directory) / "items.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: missing items.json")
    try:
        blob = json.loads(path.read_text())
        fields = {"title": blob["titles"]} if blob.get("titles") is not None else {}
        return ItemTable(blob["ids"], fields), blob.get("dataset", {})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is corrupt (not the JSON object of item ids a checkpoint holds): "
                              f"{type(e).__name__}: {e}") from None


def verify_checkpoint(directory: str | Path) -> None:
    """Check, without building the model, that ``directory`` holds a readable checkpoint:
    config.json, items.json, and a model.safetensors whose header parses and whose size fits it
    (a truncated or foreign file fails here). Raises CheckpointError naming the file."""
    directory = Path(directory)
    read_config(directory)
    read_items(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing model.safetensors")
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise CheckpointError(f"{weights} holds no tensors")
    except (SafetensorError, OSError) as e:  # a header that does not parse, a short file
        raise CheckpointError(f"{weights} is corrupt: {error_line(e)}") from None


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Recommender, Config, ItemTable]:
    directory = Path(directory)
    cfg = read_config(directory)
    items, _ = read_items(directory)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing model.safetensors")
    model = build_model(cfg, items, checkpoint_dir=directory)
    try:
        missing, unexpected = load_weights(model, weights)
    except SafetensorError as e:
        raise CheckpointError(f"{weights} is corrupt: {error_line(e)}") from None
    except RuntimeError as e:  # shape mismatch, e.g. clusters.json with another cluster count
        raise CheckpointError(f"{weights} does not fit the {cfg.model} model described by {directory} "
                              f"(config, items.json, clusters.json): {str(e).strip().splitlines()[-1]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match a {cfg.model} model for {len(items)} items: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval(), cfg, items


def load_weights(model: Recommender, weights: Path) -> tuple[list[str], list[str]]:
    """Load model.safetensors into ``model`` -> (missing, unexpected) keys. Tensors under names
    of an older layout are renamed first (``model.upgrade_state_dict``: the item representation's
    old keys); a tensor the file left out because it shares storage with one it holds (a tied LM
    head) is not missing."""
    state = load_file(str(weights))
    if hasattr(model, "upgrade_state_dict"):
        state = model.upgrade_state_dict(state)
    own = model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own}
    return [k for k in missing if own[k].data_ptr() not in loaded or own[k].numel() == 0], list(unexpected)


def load_trainer_state(directory: str | Path, optimizer: torch.optim.Optimizer | None) -> dict:
    directory = Path(directory) / "trainer"
    state = json.loads((directory / "state.json").read_text())
    tensors = load_file(str(directory / "state.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    return state


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}
