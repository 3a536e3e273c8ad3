"""The cross-validation split: every person ID in one fold, written once to a split file and reused."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import TwostageError
from ..io.files import write_json_atomic
from ..io.readers import read_json

log = logging.getLogger(__name__)

SPLIT_FORMAT = "twostage-split-1"


def make_split(ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Assign each person ID to a fold (GroupKFold-like, deterministic): IDs in a seeded
    order, biggest groups first, each to the fold with the fewest images so far."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    order = sorted(counts)
    rng = np.random.default_rng(seed)
    order = [order[k] for k in rng.permutation(len(order))]
    order.sort(key=lambda i: -counts[i])  # stable: seeded order within equal sizes
    load = [0] * folds
    assign = {}
    for i in order:
        f = min(range(folds), key=lambda k: (load[k], k))
        assign[i] = f
        load[f] += counts[i]
    return dict(sorted(assign.items()))


def _fold(value: object) -> int:
    """A fold number or count of a split file: a JSON integer (not a bool, a float or a string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    return value


def load_or_create_split(path: Path, ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """The split file at `path` (created on first use, then reused); every ID must be in it."""
    if path.is_file():
        obj = read_json(path, "split file")
        try:
            assign = {str(k): _fold(v) for k, v in obj["folds"].items()}
            n = _fold(obj["n_folds"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TwostageError(f"{path}: not a readable split file ({type(e).__name__}: {e})") from None
        if n != folds:
            raise TwostageError(f"{path}: made for {n} folds, config data.folds={folds} "
                                "(use another data.split_file or the same folds)")
        missing = sorted(set(ids) - set(assign))
        if missing:
            raise TwostageError(f"{path}: IDs {missing[:5]} ({len(missing)} in all) are not in the split file; "
                                "delete it to re-create it or point data.split_file elsewhere")
        return assign
    assign = make_split(ids, folds, seed)
    write_json_atomic(path, {"format": SPLIT_FORMAT, "n_folds": folds, "seed": seed, "folds": assign})
    log.info("wrote split file %s (%d IDs, %d folds)", path, len(assign), folds)
    return assign
