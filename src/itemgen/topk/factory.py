"""Every top-k decoder by name: ``make_decoder(name, model, **kwargs)`` (``--decode NAME``)."""

from __future__ import annotations

from itemgen.models.recommender import Recommender
from itemgen.topk.ann import AnnTopK
from itemgen.topk.beam import BeamTopK
from itemgen.topk.exact import ExactTopK
from itemgen.topk.l2d import L2DTopK
from itemgen.topk.structure import StructureTopK

DECODERS = {"exact": ExactTopK, "beam": BeamTopK, "structure": StructureTopK, "ann": AnnTopK}


def _l2d(kind: str):
    def make(model: Recommender, **kwargs):
        return L2DTopK(model, kind=kind, **kwargs)
    return make


DECODERS.update(l2d_global=_l2d("global"), l2d_local=_l2d("local"))  # latent-space decoding (l2d.py)


def make_decoder(name: str, model: Recommender, **kwargs):
    if name not in DECODERS:
        raise ValueError(f"decoder {name!r} is not available for this model (available: {', '.join(DECODERS)})")
    return DECODERS[name](model, **kwargs)
