"""The one exception type for user mistakes: the CLI prints its message on one line."""
from __future__ import annotations

from typing import Sequence


class TwostageError(Exception):
    """A problem the user can fix (bad input, missing file, wrong config); never a bug."""


def first_few(names: Sequence[str], k: int = 5) -> str:
    """'a, b, c, … (12 in all)': the first few names and the count, so a message stays one short line."""
    shown = ", ".join(names[:k])
    return f"{shown}, … ({len(names)} in all)" if len(names) > k else shown
