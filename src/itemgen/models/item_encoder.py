"""LoRA adapters for ItemLM's frozen-LLM mode (``itemlm.freeze_backbone`` + ``itemlm.lora_r``):
the backbone stays as pretrained and only adapters, the item representation (item_repr.py: ID,
text or fused item vectors, the ILM idea of arXiv 2406.02844) and the head train.
"""

from __future__ import annotations

from contextlib import contextmanager


def add_lora(backbone, r: int) -> None:
    """LoRA adapters of rank r on the backbone's attention (peft's default targets for the
    architecture), in place; base weights stay frozen, only the adapters train."""
    from peft import LoraConfig, inject_adapter_in_model  # the peft extra

    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0), backbone)
    except ValueError as e:
        raise ValueError(f"itemlm.lora_r={r}: peft cannot place LoRA adapters on this backbone: {e}") from None


@contextmanager
def adapters_disabled(backbone):
    """Run the backbone as it was before LoRA (for checking its text generation)."""
    layers = [m for m in backbone.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield backbone
    finally:
        for m in layers:
            m.enable_adapters(True)
