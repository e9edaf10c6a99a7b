"""``beam``: the top-k decoder of the models that write an item as several tokens."""

from __future__ import annotations

import torch

from itemgen.models.recommender import Recommender
from itemgen.topk.exact import check_k


class BeamTopK:
    """Trie-constrained beam search for models that write items as token sequences (titles,
    semantic IDs; generative.py): ``query`` is the prompt batch their ``encode`` returns."""

    name = "beam"
    cutoff = 20  # evaluate_decoder asks for at most this many items: Recall/NDCG@<=20 stay exact

    def __init__(self, model: Recommender, num_beams: int | None = None, **_):
        if not hasattr(model, "beam_topk"):
            raise ValueError(f"decoder 'beam' needs a model that generates items token by token "
                             f"(title, semantic_id), not {model.name!r}")
        self.model, self.num_beams = model, num_beams

    @torch.inference_mode()
    def topk(self, query, k: int, exclude=None, histories=None) -> tuple[torch.Tensor, torch.Tensor]:
        # histories: unused, models written token by token have no repeat bias (config)
        check_k(k, self.model.n_items)
        return self.model.beam_topk(query, k, exclude, self.num_beams)
