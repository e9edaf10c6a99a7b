"""A deterministic synthetic catalog with a known next-item rule, for the quickstart and tests.

Every item has one successor (a fixed random permutation): a user starts anywhere and walks the
permutation; with probability ``noise`` a step jumps to a random item instead. A model that
learns the rule reaches Recall@1 = 1 - noise on noiseless-history targets. Items carry titles,
brands, prices and categories that are informative: item i belongs to group i % 10, which its
title's adjective names, and its category names its successor's group ("group 3"). So text
alone says which tenth of the catalog comes next, which is how a text model can rank an item it
never saw in training (the quickstart's new items), and the text path of the training paradigm
is exercised too. The data is made up: no real product, user or purchase.
"""

from __future__ import annotations

import numpy as np

from itemgen.data.dataset import ItemTable, SequenceDataset

_ADJ = ["red", "blue", "green", "steel", "paper", "smart", "mini", "pro", "eco", "classic"]
_NOUN = ["stapler", "pen", "notebook", "lamp", "cable", "folder", "clip", "desk", "chair", "marker"]
_BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne"]


GROUPS = len(_ADJ)  # item i's group: i % GROUPS, named by its title's adjective


def item_id(i: int) -> str:
    return f"I{i:05d}"


def item_fields(i: int, next_group: int) -> dict[str, str]:
    """Item i's text: its title's adjective names its group (i % GROUPS), its category the group
    of the item that follows it (``next_group``)."""
    return {"title": f"{_ADJ[i % GROUPS]} {_NOUN[(i // GROUPS) % len(_NOUN)]} {i}",
            "brand": _BRANDS[i % len(_BRANDS)], "price": f"${(i % 50) + 0.99:.2f}",
            "category": f"group {next_group}"}


def make_dataset(n_users: int = 2000, n_items: int = 200, *, min_len: int = 4, max_len: int = 12,
                 noise: float = 0.0, seed: int = 0, name: str = "synthetic") -> SequenceDataset:
    if n_items < 2 or n_users < 1 or not (2 <= min_len <= max_len):
        raise ValueError("synthetic dataset needs n_items >= 2, n_users >= 1, 2 <= min_len <= max_len")
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items)
    # make the permutation a single cycle so walks never get stuck in a short loop
    order = rng.permutation(n_items)
    successor[order] = np.roll(order, -1)
    ids = [item_id(i) for i in range(n_items)]
    rows = [item_fields(i, int(successor[i]) % GROUPS) for i in range(n_items)]
    fields = {name: [r[name] for r in rows] for name in ("title", "brand", "price", "category")}
    users, seqs = [], []
    for u in range(n_users):
        length = int(rng.integers(min_len, max_len + 1))
        seq = [int(rng.integers(n_items))]
        for _ in range(length - 1):
            seq.append(int(rng.integers(n_items)) if rng.random() < noise else int(successor[seq[-1]]))
        users.append(f"U{u:06d}")
        seqs.append(np.asarray(seq, dtype=np.int64))
    source = {"loader": "synthetic", "n_users": n_users, "n_items": n_items, "noise": noise, "seed": seed}
    return SequenceDataset(name, ItemTable(ids, fields), users, seqs, source)
