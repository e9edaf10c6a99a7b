"""The item text view: item texts from metadata, a frozen encoder's normalised mean-pooled rows."""

from __future__ import annotations

import pytest
import torch

from itemgen.data.dataset import ItemTable
from itemgen.models.backbones import BackboneError
from itemgen.models.text_view import encode_items, item_text, item_texts, load_text_encoder


def _items() -> ItemTable:
    return ItemTable(ids=["a", "b", "c", "d"], fields={
        "title": ["Red pen", "Red pen", None, "Stapler"],
        "brand": ["Bic", "Bic", None, None],
        "category": ["Office > Pens", "Office > Pens", None, "Office > Staplers"]})


def test_item_text_known_answer():
    items = _items()
    assert item_text(items, 0) == "Red pen. Brand: Bic. Category: Office > Pens"
    assert item_text(items, 3) == "Stapler. Category: Office > Staplers"
    assert item_text(items, 2) == ""  # no field at all
    assert item_text(items, 0, ("brand",)) == "Brand: Bic"
    assert item_texts(items, ("title", "description")) == ["Red pen", "Red pen", "", "Stapler"]  # absent field skipped


def test_encode_items_tiny_backbone_rows_are_unit_or_zero():
    view, missing = encode_items(_items(), "tiny")
    assert view.shape == (4, 64) and view.dtype == torch.float32 and missing == 1
    norms = view.norm(dim=1)
    assert torch.allclose(norms[[0, 1, 3]], torch.ones(3), atol=1e-5)
    assert norms[2] == 0  # no text: zero row, never a vector of padding
    assert torch.allclose(view[0], view[1], atol=1e-6)  # same text, same vector
    assert not torch.allclose(view[0], view[3])
    again, _ = encode_items(_items(), "tiny")
    assert torch.equal(view, again)  # deterministic


def test_encode_is_independent_of_batching():
    enc = load_text_encoder("tiny")
    texts = item_texts(_items()) + ["a much longer text that pads the others " * 3]
    one = enc.encode(texts, batch_size=1)
    many = enc.encode(texts, batch_size=8)
    assert torch.allclose(one, many, atol=1e-5)  # padding never leaks into a pooled row


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(BackboneError, match="text encoder name"):
        load_text_encoder("  ")
    with pytest.raises(BackboneError):
        load_text_encoder("./no/such/folder")
