"""The 29 bone classes: the one place their names and order are defined.

The order is the competition CSV order and the channel order of every mask and model.
"""
from __future__ import annotations

FINGERS: tuple[str, ...] = tuple(f"finger-{i}" for i in range(1, 20))
"""finger-1..3: thumb (distal, proximal, metacarpal); 4..7, 8..11, 12..15, 16..19: the
other fingers from tip to metacarpal."""

PALM_CLASSES: tuple[str, ...] = (
    "Trapezium", "Trapezoid", "Capitate", "Hamate",
    "Scaphoid", "Lunate", "Triquetrum", "Pisiform",
)
"""The 8 carpals: what the palm model re-segments."""

FOREARM: tuple[str, ...] = ("Radius", "Ulna")

CLASSES: tuple[str, ...] = FINGERS + PALM_CLASSES + FOREARM

FINGER_CHAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("thumb", FINGERS[0:3]), ("index", FINGERS[3:7]), ("middle", FINGERS[7:11]),
    ("ring", FINGERS[11:15]), ("little", FINGERS[15:19]),
)
"""Each digit's bones, tip to metacarpal."""

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = FINGER_CHAINS + (("carpals", PALM_CLASSES), ("forearm", FOREARM))
"""The anatomical groups of CLASSES, in CLASSES order."""
NUM_CLASSES = len(CLASSES)
CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}
PALM_INDICES: tuple[int, ...] = tuple(CLASS_TO_INDEX[c] for c in PALM_CLASSES)


def class_indices(names: list[str] | tuple[str, ...]) -> list[int]:
    """Indices into CLASSES for a list of class names, in the given order."""
    from .errors import TwostageError

    unknown = [n for n in names if n not in CLASS_TO_INDEX]
    if unknown:
        raise TwostageError(f"unknown class name(s) {unknown}; valid names: {', '.join(CLASSES)}")
    return [CLASS_TO_INDEX[n] for n in names]
