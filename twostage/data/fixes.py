"""Label fixes: a YAML file of per-image relabel / drop rules applied every time annotations are
read (the data itself is never edited), and what they change: which samples a command works on
and which annotations a sample has."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..classes import CLASSES
from ..errors import TwostageError
from ..io.readers import read_yaml
from .annotations import Annotation, read_annotations
from .layout import Sample, find_samples

log = logging.getLogger(__name__)

_IMAGE_KEYS = {"relabel", "drop", "drop_image"}
_RELABEL_KEYS = {"id", "index", "from", "to"}
_DROP_KEYS = {"id", "index", "label"}


def _image_key(key: str) -> str:
    """Normalised fixes key: posix path without a .png/.json suffix."""
    key = key.replace("\\", "/").strip("/")
    return key[: -len(Path(key).suffix)] if Path(key).suffix.lower() in (".png", ".json") else key


@dataclass(frozen=True)
class _Rule:
    kind: str  # "relabel" or "drop"
    id: str | None = None
    index: int | None = None
    label: str | None = None  # "from" for relabel, "label" for drop
    to: str | None = None

    def matches(self, k: int, a: Annotation) -> bool:
        return ((self.id is None or a.id == self.id) and (self.index is None or k == self.index)
                and (self.label is None or a.label == self.label))

    def describe(self) -> str:
        parts = [f"{n}={v}" for n, v in (("id", self.id), ("index", self.index),
                                         ("label", self.label), ("to", self.to)) if v is not None]
        return f"{self.kind}({', '.join(parts)})"


class Fixes:
    """Per-image label fixes from a YAML file: relabel / drop annotations / drop images.

    Format (every key optional; unknown keys and unknown target labels are errors)::

        # Label fixes, applied every time annotations are read; the data itself is never edited.
        # Keys are image basenames or paths relative to DCM/ (".png"/".json" optional).
        image1661130828152_R.png:
          relabel:                          # first matching rule wins; rules see the ORIGINAL labels,
            - {id: "id-0012", to: Pisiform} #   so swapping two labels is two rules
            - {index: 3, to: finger-3}      # index = position in the JSON "annotations" list (0-based)
            - {from: Trapezium, to: Trapezoid}   # every annotation labelled Trapezium
            - {id: "id-0007", from: Hamate, to: Capitate}  # both must match
          drop:
            - {id: "id-0031"}               # e.g. a sesamoid drawn as finger-3
            - {label: ring}                 # every annotation with this label
        ID007/image1661144206667_L.png:
          drop_image: true                  # leave this image out of training and scoring

    Drop rules are applied before relabel rules; a rule that matches nothing in its image is
    logged (the fixes file may be stale), and `twostage check --fixes` lists it.
    """

    def __init__(self, entries: dict[str, dict], source: str = "<fixes>") -> None:
        self.source = source
        self._raw: dict[str, str] = {}  # image key -> its parsed entry, canonical JSON
        self._rules: dict[str, list[_Rule]] = {}
        self._drop_image: set[str] = set()
        for key, entry in entries.items():
            self._add(str(key), entry)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Fixes":
        """Read and validate a fixes YAML file (TwostageError naming the file and the key)."""
        path = Path(path)
        obj = read_yaml(path, "fixes file")
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            raise TwostageError(f"{path}: expected a mapping of image name -> fixes, got {type(obj).__name__}")
        return cls(obj, str(path))

    def _add(self, key: str, entry: object) -> None:
        where = f"{self.source}: {key}"
        if not isinstance(entry, dict):
            raise TwostageError(f"{where}: expected a mapping with relabel/drop/drop_image")
        unknown = set(entry) - _IMAGE_KEYS
        if unknown:
            raise TwostageError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; "
                                f"valid: {sorted(_IMAGE_KEYS)}")
        norm = _image_key(key)
        if norm in self._raw:
            raise TwostageError(f"{where}: image listed twice")
        rules = []
        for kind, valid in (("drop", _DROP_KEYS), ("relabel", _RELABEL_KEYS)):
            items = entry.get(kind) or []
            if not isinstance(items, list):
                raise TwostageError(f"{where}.{kind}: expected a list of rules")
            for n, r in enumerate(items):
                rules.append(self._rule(f"{where}.{kind}[{n}]", kind, r, valid))
        drop_image = entry.get("drop_image", False)
        if not isinstance(drop_image, bool):
            raise TwostageError(f"{where}.drop_image: expected true or false, got {drop_image!r}")
        if drop_image:
            self._drop_image.add(norm)
        # the entry as parsed (not as written: YAML may hold any value, even a self-referencing one)
        self._raw[norm] = json.dumps([drop_image, [astuple(r) for r in rules]])
        self._rules[norm] = rules

    @staticmethod
    def _rule(where: str, kind: str, r: object, valid: set[str]) -> _Rule:
        if not isinstance(r, dict) or not r:
            raise TwostageError(f"{where}: expected a mapping like {{id: ..., to: ...}}")
        unknown = set(r) - valid
        if unknown:
            raise TwostageError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; valid: {sorted(valid)}")
        index = r.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise TwostageError(f"{where}.index: expected an integer >= 0, got {index!r}")
        label = r.get("from" if kind == "relabel" else "label")
        rule = _Rule(kind, None if r.get("id") is None else str(r["id"]), index,
                     None if label is None else str(label),
                     None if r.get("to") is None else str(r["to"]))
        if kind == "relabel":
            if rule.to is None:
                raise TwostageError(f"{where}: relabel needs 'to'")
            if rule.to not in CLASSES:
                raise TwostageError(f"{where}.to: unknown label {rule.to!r}; valid: {', '.join(CLASSES)}")
        if rule.id is None and rule.index is None and rule.label is None:
            raise TwostageError(f"{where}: say which annotation (id, index or "
                                f"{'from' if kind == 'relabel' else 'label'})")
        return rule

    def _key_for(self, sample: Sample) -> str | None:
        for key in (_image_key(sample.rel), _image_key(sample.name)):
            if key in self._raw:
                return key
        return None

    def keys(self) -> list[str]:
        """The (normalised) image keys in the file."""
        return list(self._raw)

    def unmatched_keys(self, samples: Iterable[Sample]) -> list[str]:
        """Keys naming no image among `samples` (a typo or a stale fixes file)."""
        used = {self._key_for(s) for s in samples}
        return [k for k in self._raw if k not in used]

    def drops(self, sample: Sample) -> bool:
        """True if the fixes file leaves this image out (`drop_image: true`)."""
        return self._key_for(sample) in self._drop_image

    def keep(self, samples: Iterable[Sample]) -> list[Sample]:
        """`samples` without the dropped images."""
        return [s for s in samples if not self.drops(s)]

    def digest(self, sample: Sample) -> str:
        """Hash of this image's entry ("" if none): part of the mask-cache key."""
        key = self._key_for(sample)
        if key is None:
            return ""
        return hashlib.sha256(self._raw[key].encode()).hexdigest()

    def resolve(self, sample: Sample, annotations: Sequence[Annotation]) -> tuple[list[Annotation], list[str]]:
        """Apply this image's rules to annotations as read from its JSON (file order).

        Returns the fixed annotations and a description of each rule that matched nothing.
        """
        key = self._key_for(sample)
        rules = self._rules.get(key, []) if key is not None else []
        if not rules:
            return list(annotations), []
        used: set[_Rule] = set()
        out = []
        for k, a in enumerate(annotations):
            drop = next((r for r in rules if r.kind == "drop" and r.matches(k, a)), None)
            if drop is not None:
                used.add(drop)
                continue
            relabel = next((r for r in rules if r.kind == "relabel" and r.matches(k, a)), None)
            if relabel is not None:
                used.add(relabel)
                a = Annotation(relabel.to, a.points, a.id)
            out.append(a)
        return out, [r.describe() for r in rules if r not in used]

    def apply(self, sample: Sample, annotations: Sequence[Annotation]) -> list[Annotation]:
        """The fixed annotations; rules that matched nothing are logged as warnings."""
        out, unused = self.resolve(sample, annotations)
        for r in unused:
            log.warning("%s: fix %s for %s matched no annotation", self.source, r, sample.rel)
        return out


def select_samples(root: str | os.PathLike, split: str | None = None, fixes: "Fixes | str | os.PathLike | None" = None,
                   images: Iterable[str] | None = None) -> tuple[list[Sample], "Fixes | None"]:
    """The samples a command works on: `find_samples`, less the images the fixes drop, restricted
    to `images` (basenames or stems; an unknown one is an error). Returns them with the loaded fixes."""
    if fixes is not None and not isinstance(fixes, Fixes):
        fixes = Fixes.load(fixes)
    samples = find_samples(root, split)
    if fixes is not None:
        samples = fixes.keep(samples)
    if images:
        wanted = set(images)
        unknown = sorted(wanted - {s.name for s in samples} - {s.image_path.stem for s in samples})
        if unknown:
            raise TwostageError(f"{root}: no image named {', '.join(unknown)}")
        samples = [s for s in samples if s.name in wanted or s.image_path.stem in wanted]
    return samples, fixes


def load_annotations(sample: Sample, fixes: Fixes | None = None) -> list[Annotation]:
    """The annotations of a training sample with the label fixes applied.

    A test image (no JSON) or an image the fixes drop is a TwostageError: filter samples
    with `fixes.keep(samples)` first.
    """
    if sample.json_path is None:
        raise TwostageError(f"{sample.image_path}: no annotation JSON (test image?)")
    if fixes is not None and fixes.drops(sample):
        raise TwostageError(f"{sample.rel}: dropped by {fixes.source}; filter samples with fixes.keep()")
    annotations = read_annotations(sample.json_path)
    return fixes.apply(sample, annotations) if fixes is not None else annotations
