"""A procedural hand-radiograph phantom in the docs/DESIGN.md §1 layout: the embedded default data.

Every bone is a jittered polygon in a hand frame measured in centimetres (x towards the
thumb, y towards the fingertips); one global pose (scale, rotation, translation, finger
spread) maps it into the image. The picture is rendered from exactly the polygons written
to JSON, so the masks match the pixels: soft tissue from a blurred silhouette of hand and
forearm, bones as attenuation with a bright cortical rim over a dimmer medulla, overlaps
adding up, then system blur and noise. Carpals are small, overlapping and of low contrast
to each other, so a global model at a reduced input size loses them and a palm crop at
higher resolution recovers them — the effect the product exists for.

A `PhantomStyle` holds the knobs a real dataset changes (carpal size and packing, bone
contrast, noise and blur, hand rotation and scale); `VARIANTS` names a few styles, each
changing one family. The default style is the phantom as it always was: same random draws,
same bytes.

Deterministic by seed: the same arguments give byte-identical files.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..classes import CLASSES, FINGER_CHAINS, FOREARM, PALM_CLASSES
from ..errors import TwostageError
from ..io.files import write_png_atomic, write_text_atomic
from .annotations import Annotation, write_annotations
from .layout import IMAGE_DIR, JSON_DIR

log = logging.getLogger(__name__)

MIN_SIZE = 64
"""Smallest image side (px) at which every bone still rasterises to a few pixels."""

CARPAL_FRACTION = (0.21, 0.29)
"""Range of the carpal box side (max of width, height) as a fraction of the image side,
drawn per image before the hand is shrunk to fit (real 2048² radiographs: about 20–30%)."""

FAKE_METADATA_SIZE = 2048
"""Real JSON files carry wrong metadata sizes; the phantom imitates that on purpose."""

# Finger chains: (labels tip→metacarpal, metacarpal base (cm), angle from the long axis
# (deg, + towards the thumb), bone lengths metacarpal→tip (cm), width factor).
_FINGERS = tuple((labels, *geometry) for (_, labels), geometry in zip(FINGER_CHAINS, (
    ((2.75, 1.05), 36.0, (4.4, 3.0, 2.3), 1.1),              # thumb
    ((1.25, 1.55), 9.0, (6.4, 3.9, 2.2, 1.6), 0.97),         # index
    ((0.05, 1.65), 0.0, (6.2, 4.4, 2.7, 1.75), 1.0),         # middle
    ((-0.9, 1.45), -8.0, (5.7, 4.1, 2.6, 1.7), 0.93),        # ring
    ((-1.75, 1.2), -16.0, (5.2, 3.3, 1.85, 1.5), 0.85),      # little
)))

# Half-widths (cm) at base, shaft, head and cap depths (fraction of the end half-width;
# negative = concave) per bone kind, in chain order metacarpal, proximal, middle, distal.
_LONG_SHAPES = {
    "metacarpal": ((0.6, 0.42, 0.6), (0.35, 0.9)),
    "proximal": ((0.55, 0.38, 0.46), (-0.15, 0.6)),
    "middle": ((0.48, 0.33, 0.4), (-0.15, 0.6)),
    "distal": ((0.42, 0.24, 0.33), (-0.1, 0.8)),
}

# Carpals: centre (cm), axis angle (deg from +y, + towards the thumb), length of the
# straight part (cm), half-widths (proximal end, waist, distal end), cap depths (proximal,
# distal). Packed like a real wrist: joint spaces of about a millimetre, the pisiform over
# the triquetrum, scaphoid and lunate on the radius, capitate/hamate under the metacarpals.
_CARPALS = {
    "Scaphoid": ((1.15, -0.45), 42.0, 1.1, (0.6, 0.47, 0.56), (0.9, 0.9)),
    "Lunate": ((0.1, -0.85), 0.0, 0.5, (0.62, 0.72, 0.74), (0.9, 0.25)),
    "Triquetrum": ((-1.15, -0.5), -60.0, 0.55, (0.55, 0.5, 0.42), (0.8, 0.8)),
    "Pisiform": ((-1.45, -0.35), 20.0, 0.15, (0.46, 0.46, 0.44), (1.0, 1.0)),
    "Capitate": ((0.05, 0.45), 0.0, 1.35, (0.64, 0.58, 0.72), (1.0, 0.3)),
    "Hamate": ((-1.2, 0.5), -10.0, 0.9, (0.45, 0.65, 0.72), (0.9, 0.3)),
    "Trapezoid": ((1.27, 0.85), 5.0, 0.45, (0.5, 0.52, 0.55), (0.6, 0.5)),
    "Trapezium": ((2.25, 0.45), 40.0, 0.55, (0.62, 0.6, 0.6), (0.6, 0.7)),
}

_CARPAL_BOX_CM = 5.3
"""Nominal side (cm) of the carpal box in the hand frame: turns CARPAL_FRACTION into a scale."""

_CARPAL_CENTROID = np.mean([c[0] for c in _CARPALS.values()], axis=0)
"""Mean of the nominal carpal centres (cm): the point `PhantomStyle` packs them towards."""


@dataclass(frozen=True)
class PhantomStyle:
    """What a dataset changes, as factors on the phantom's built-in ranges (defaults: none).

    carpal_scale: factor on every carpal's widths and length.
    carpal_pack: factor on the carpal centres' distances from their centroid, on top of
        `carpal_scale` (offsets scale by carpal_scale × carpal_pack): below 1 the carpals
        are packed closer than a uniformly shrunk wrist and overlap more.
    bone_gain: factor on the bone attenuation gain range (0.85, 1.1): below 1, less bone
        contrast against soft tissue.
    noise: factor on the noise standard-deviation range (2.0, 4.5 grey levels).
    blur: factor on the system blur (σ = 0.0012 × image side; none below 0.3 px).
    rotation: the hand's rotation is drawn in ±`rotation` degrees.
    carpal_fraction: range of the nominal carpal box side as a fraction of the image side
        (the hand's scale in the picture; default CARPAL_FRACTION).
    """

    carpal_scale: float = 1.0
    carpal_pack: float = 1.0
    bone_gain: float = 1.0
    noise: float = 1.0
    blur: float = 1.0
    rotation: float = 12.0
    carpal_fraction: tuple[float, float] = CARPAL_FRACTION

    def __post_init__(self) -> None:
        for name in ("carpal_scale", "carpal_pack", "bone_gain", "blur"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v <= 10:
                raise TwostageError(f"phantom style {name}={v!r}: must be a number in (0, 10]")
        if not isinstance(self.noise, (int, float)) or not 0 <= self.noise <= 10:
            raise TwostageError(f"phantom style noise={self.noise!r}: must be a number in [0, 10]")
        if not isinstance(self.rotation, (int, float)) or not 0 <= self.rotation <= 180:
            raise TwostageError(f"phantom style rotation={self.rotation!r}: must be in [0, 180] degrees")
        try:
            lo, hi = (float(v) for v in self.carpal_fraction)
        except (TypeError, ValueError):
            lo = hi = -1.0
        if not 0 < lo <= hi < 1:
            raise TwostageError(f"phantom style carpal_fraction={self.carpal_fraction!r}: need 0 < low <= high < 1")

    def changes(self) -> dict:
        """The fields that differ from the default style, {name: value}."""
        base = PhantomStyle()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)}


VARIANTS: dict[str, PhantomStyle] = {
    "default": PhantomStyle(),
    # Smaller carpals packed closer (a child's or a small adult's wrist, or a wider field of
    # view): 0.8× the size, centres 15 % closer than that scale alone, so neighbours overlap.
    "small-carpals": PhantomStyle(carpal_scale=0.8, carpal_pack=0.85),
    # Another detector or exposure: 0.6× bone contrast, 2.5× the noise, 1.5× the blur.
    "low-contrast": PhantomStyle(bone_gain=0.6, noise=2.5, blur=1.5),
    # Hands placed less carefully and at other magnifications: ±35° rotation, carpal box
    # 15–33 % of the image side (default ±12°, 21–29 %).
    "pose": PhantomStyle(rotation=35.0, carpal_fraction=(0.15, 0.33)),
}
"""Named phantom styles: the default and variants that each change one family of knobs."""


def resolve_style(style: "PhantomStyle | str | None") -> PhantomStyle:
    """A PhantomStyle from a style, a VARIANTS name or None (the default)."""
    if style is None:
        return VARIANTS["default"]
    if isinstance(style, PhantomStyle):
        return style
    if isinstance(style, str) and style in VARIANTS:
        return VARIANTS[style]
    raise TwostageError(f"phantom variant {style!r}: unknown; choose one of {', '.join(VARIANTS)}")


def style_name(style: PhantomStyle) -> str:
    """The VARIANTS name of a style, or its changed fields for a custom one."""
    for name, s in VARIANTS.items():
        if s == style:
            return name
    return "custom " + ", ".join(f"{k}={v}" for k, v in style.changes().items())


@dataclass
class _Bone:
    label: str
    outline: np.ndarray  # (N, 2) float, hand frame (cm)
    half_width: float  # cm, shaft half-width: sets the medulla depth
    cortex: float  # cm, cortical thickness
    density: float  # relative attenuation


def _profile(t: np.ndarray, widths: tuple[float, float, float],
             flare: tuple[float, float] = (0.45, 0.45)) -> np.ndarray:
    """Half-width along a bone (t in [0, 1]): ends flaring smoothly into a narrower waist
    over the first and last `flare` fractions of the length."""
    base, waist, head = widths
    lo = base + (waist - base) * (1 - np.cos(np.pi * np.clip(t / flare[0], 0, 1))) / 2
    hi = waist + (head - waist) * (1 - np.cos(np.pi * np.clip((t - 1 + flare[1]) / flare[1], 0, 1))) / 2
    return np.where(t < flare[0], lo, np.where(t > 1 - flare[1], hi, waist))


def _outline(length: float, widths: tuple[float, float, float], caps: tuple[float, float],
             n: int, rng: np.random.Generator, jitter: float = 0.04, tilt: float = 0.0,
             flare: tuple[float, float] = (0.45, 0.45)) -> np.ndarray:
    """A closed bone contour of `n` vertices in its own frame (axis +y from 0 to `length`).

    Sides follow the width profile; both ends are elliptic caps (concave when the depth is
    negative); `tilt` slants the distal end (a styloid). Vertices are spaced evenly along
    the contour and pushed along the normal by smooth random harmonics.
    """
    t = np.linspace(0.0, 1.0, 80)
    hw = _profile(t, widths, flare)
    ang = np.linspace(0.0, np.pi, 24)[1:-1]
    right = np.stack([hw, t * length], 1)
    top = np.stack([widths[2] * np.cos(ang), length + caps[1] * widths[2] * np.sin(ang)
                    + tilt * widths[2] * np.cos(ang)], 1)
    left = np.stack([-hw[::-1], t[::-1] * length], 1)
    bottom = np.stack([widths[0] * np.cos(ang + np.pi), -caps[0] * widths[0] * np.sin(ang)], 1)
    right[-1, 1] += tilt * widths[2]
    left[0, 1] -= tilt * widths[2]
    dense = np.concatenate([right, top, left, bottom])
    seg = np.linalg.norm(np.diff(dense, axis=0, append=dense[:1]), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    closed = np.concatenate([dense, dense[:1]])
    s = np.arange(n) * arc[-1] / n
    pts = np.stack([np.interp(s, arc, closed[:, 0]), np.interp(s, arc, closed[:, 1])], 1)
    tangent = np.roll(pts, -1, 0) - np.roll(pts, 1, 0)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], 1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    phase = 2 * np.pi * s / arc[-1]
    k = np.arange(2, 6)
    amp = rng.normal(0.0, jitter, k.size) / k
    off = rng.uniform(0, 2 * np.pi, k.size)
    bump = (amp[None] * np.cos(k[None] * phase[:, None] + off[None])).sum(1)
    return pts + normal * (bump * np.mean(widths))[:, None]


def _place(pts: np.ndarray, origin: tuple[float, float], angle_deg: float) -> np.ndarray:
    """Rotate a local contour (axis +y) by `angle_deg` towards the thumb and move it to `origin`."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return pts @ rot + np.asarray(origin)


def _vertex_count(length_px: float) -> int:
    """24–64 vertices: enough to look smooth, growing with the bone's size in pixels."""
    return int(np.clip(round(length_px / 6), 24, 64))


def _hand_bones(rng: np.random.Generator, px_per_cm: float,
                style: PhantomStyle = VARIANTS["default"]) -> tuple[list[_Bone], dict]:
    """All 29 bones of one right hand in the hand frame, with per-bone shape jitter."""
    bones: list[_Bone] = []
    size = rng.uniform(0.92, 1.08)  # person's bone length factor
    thick = rng.uniform(0.9, 1.12)  # bone thickness factor
    spread = rng.uniform(0.8, 1.35)
    density = rng.uniform(0.85, 1.15)
    tips = []
    chains = []
    for labels, base, angle, lengths, wf in _FINGERS:
        angle = (angle + rng.uniform(-6.0, 10.0) if labels is FINGER_CHAINS[0][1] else angle * spread) \
            + rng.normal(0, 1.0)
        pos = np.asarray(base) + rng.normal(0, 0.05, 2)
        kinds = ["metacarpal", "proximal", "distal"] if len(lengths) == 3 else \
            ["metacarpal", "proximal", "middle", "distal"]
        chain = [pos.copy()]
        for label, kind, length in zip(labels[::-1], kinds, lengths):
            widths, caps = _LONG_SHAPES[kind]
            jl = length * size * rng.uniform(0.94, 1.06)
            jw = tuple(w * wf * thick * rng.uniform(0.92, 1.08) for w in widths)
            straight = jl - max(caps[0], 0) * jw[0] - max(caps[1], 0) * jw[2]
            n = _vertex_count(jl * px_per_cm * 2.2)
            local = _outline(straight, jw, caps, n, rng)
            local[:, 1] += max(caps[0], 0) * jw[0]
            bones.append(_Bone(label, _place(local, tuple(pos), angle), jw[1], 0.11 * thick,
                               density * rng.uniform(0.95, 1.05)))
            direction = np.array([np.sin(np.deg2rad(angle)), np.cos(np.deg2rad(angle))])
            pos = pos + direction * (jl + rng.uniform(0.12, 0.22))
            chain.append(pos.copy())
            angle += rng.normal(0, 2.5) + (2.0 if labels is FINGER_CHAINS[0][1] else 0.0)
        tips.append(pos)
        chains.append(np.array(chain))
    pull = 1.0 - style.carpal_scale * style.carpal_pack  # 0 for the default: centres unchanged
    for label, (centre, angle, length, widths, caps) in _CARPALS.items():
        f = rng.uniform(0.92, 1.08) * style.carpal_scale
        jw = tuple(w * f * rng.uniform(0.93, 1.07) for w in widths)
        jl = length * f * rng.uniform(0.85, 1.15)
        n = _vertex_count((jl + 2 * jw[1]) * px_per_cm * 2.5)
        local = _outline(jl, jw, caps, n, rng, jitter=0.06)
        local[:, 1] -= jl / 2
        centre = np.asarray(centre) - pull * (np.asarray(centre) - _CARPAL_CENTROID)
        c = centre * rng.uniform(0.97, 1.03) + rng.normal(0, 0.05, 2)
        bones.append(_Bone(label, _place(local, tuple(c), angle + rng.normal(0, 6.0)),
                           max(jw) * 0.9, 0.06, density * rng.uniform(0.9, 1.0)))
    # Forearm: long bones reaching far below the image edge (clipped later).
    rad_w = (0.75, 0.72, 1.45)
    rad = _outline(12.0, tuple(w * thick for w in rad_w), (0.5, 0.12), 64, rng, 0.02, tilt=0.35,
                   flare=(0.1, 0.22))
    rad[:, 1] -= 12.0 + 1.7 + rng.uniform(-0.1, 0.1)
    bones.append(_Bone("Radius", _place(rad, (0.65, 0.0), 5.0 + rng.normal(0, 2)), 0.72 * thick,
                       0.13 * thick, density))
    uln_w = (0.55, 0.5, 0.7)
    uln = _outline(12.0, tuple(w * thick for w in uln_w), (0.5, 0.6), 64, rng, 0.02, tilt=-0.3,
                   flare=(0.1, 0.15))
    uln[:, 1] -= 12.0 + 2.4 + rng.uniform(-0.1, 0.15)
    bones.append(_Bone("Ulna", _place(uln, (-1.6, 0.0), -4.0 + rng.normal(0, 2)), 0.5 * thick,
                       0.12 * thick, density))
    # Unlabelled details real radiographs have: the hook of the hamate (a ring seen end-on
    # inside the hamate) and, often, two sesamoids at the thumb's metacarpal head.
    hamate = next(b for b in bones if b.label == "Hamate").outline.mean(0)
    hook = _outline(0.1, (0.2, 0.2, 0.2), (1.0, 1.0), 24, rng, jitter=0.05)
    unlabeled = [_Bone("hook", hook + hamate + [-0.12, 0.05], 0.2, 0.05, density * 0.6)]
    if rng.random() < 0.7:
        head, before = chains[0][1], chains[0][0]
        axis = (head - before) / np.linalg.norm(head - before)
        for sign in (-1.0, 1.0):
            centre = head - axis * 0.45 + sign * np.array([axis[1], -axis[0]]) * 0.4
            sesamoid = _outline(0.05, (0.2, 0.2, 0.2), (1.0, 1.0), 24, rng)
            unlabeled.append(_Bone("sesamoid", sesamoid + centre, 0.2, 0.06, density * 0.8))
    order = {c: i for i, c in enumerate(CLASSES)}
    bones.sort(key=lambda b: order[b.label])
    return bones, {"tips": np.array(tips), "chains": chains, "unlabeled": unlabeled}


def _clip_polygon(pts: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Sutherland–Hodgman clip of a polygon to the square [lo, hi]²."""
    for axis, bound, keep_le in ((0, lo, False), (0, hi, True), (1, lo, False), (1, hi, True)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] <= bound if keep_le else pts[:, axis] >= bound
        if inside.all():
            continue
        out = []
        for i in range(len(pts)):
            cur, prev = pts[i], pts[i - 1]
            cin, pin = inside[i], inside[i - 1]
            if cin != pin:
                r = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(prev + r * (cur - prev))
            if cin:
                out.append(cur)
        pts = np.array(out).reshape(-1, 2)
    return pts


def _pixel_polygon(pts: np.ndarray, size: int) -> np.ndarray:
    """Integer pixel polygon of a contour, clipped to the image (may have < 3 points if outside)."""
    pts = _clip_polygon(pts, 0.0, float(size - 1))
    return np.clip(np.rint(pts), 0, size - 1).astype(np.int32).reshape(-1, 2)


def _soft_tissue(chains: list[np.ndarray], bones: list[_Bone], to_px, size: int,
                 px_per_cm: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float32 soft-tissue thickness in [0, 1]: hand, thumb and forearm silhouette.

    Drawn at a quarter of the resolution (it is smooth) and scaled up.
    """
    import cv2

    lo = max(64, size // 4)
    f = lo / size
    canvas = np.zeros((lo, lo), np.uint8)

    def q(p):
        return np.round(to_px(np.atleast_2d(p)) * f).astype(np.int32)

    by_label = {b.label: b for b in bones}
    carpal_pts = np.concatenate([by_label[c].outline for c in PALM_CLASSES])
    palm = np.concatenate([carpal_pts, *[c[1:2] for c in chains], chains[0][:1],
                           np.array([[-2.6, -1.5], [3.0, -1.5]])])
    hull = cv2.convexHull(q(palm))
    cv2.fillConvexPoly(canvas, hull, 255)
    for k, chain in enumerate(chains):
        w = (0.95, 0.87, 0.87, 0.8, 0.74)[k] * rng.uniform(0.92, 1.1)  # half-width, cm
        end = chain[-1] + (chain[-1] - chain[-2]) / np.linalg.norm(chain[-1] - chain[-2]) * 0.1
        pts = q(np.concatenate([chain[:-1], end[None]]))
        for a, b in zip(pts[:-1], pts[1:]):
            cv2.line(canvas, tuple(map(int, a)), tuple(map(int, b)), 255,
                     max(1, int(round(w * 2 * px_per_cm * f))), cv2.LINE_AA)
        cv2.circle(canvas, tuple(map(int, pts[-1])), max(1, int(round(w * px_per_cm * f))), 255, -1,
                   cv2.LINE_AA)
    arm_w = rng.uniform(3.4, 4.0)
    arm = np.array([[-arm_w + 0.4, -30.0], [arm_w + 0.9, -30.0], [3.0, -1.0], [-2.6, -1.0]])
    cv2.fillConvexPoly(canvas, q(arm), 255)
    mask = (canvas > 127).astype(np.uint8)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    u = 1.0 - np.clip(dist / (1.5 * px_per_cm * f), 0.0, 1.0)  # like a 1.5 cm radius cylinder
    depth = np.sqrt(1.0 - u * u).astype(np.float32)
    depth = cv2.GaussianBlur(depth, (0, 0), max(0.6, 0.06 * px_per_cm * f))
    return cv2.resize(depth, (size, size), interpolation=cv2.INTER_LINEAR)


def _bone_attenuation(mask: np.ndarray, bone: _Bone, px_per_cm: float, texture: np.ndarray) -> np.ndarray:
    """Attenuation inside one bone mask: bright cortex near the edge, a dimmer medulla with
    trabecular `texture` (zero-mean, unit-variance noise of the mask's shape) inside."""
    import cv2

    d = cv2.distanceTransform(mask, cv2.DIST_L2, 3) / px_per_cm  # cm from the edge
    tc = bone.cortex
    rim = np.sqrt(np.clip(d / tc, 0.0, 1.0)) * np.exp(-np.maximum(d - tc, 0.0) / (1.2 * tc))
    body = np.sqrt(np.clip(d / bone.half_width, 0.0, 1.0))
    body = body * (1.0 + 0.2 * texture)
    return (mask * bone.density * (0.8 * rim + 0.22 * body)).astype(np.float32)


def render_hand(rng: np.random.Generator, size: int, side: str = "R",
                style: PhantomStyle | str | None = None) -> tuple[np.ndarray, list[Annotation]]:
    """Render one phantom hand radiograph and its 29 bone polygons.

    Args:
        rng: the source of all randomness (pose, shapes, noise): same state, same picture.
        size: image side in pixels (square image), at least MIN_SIZE.
        side: "R" (thumb on the image's left) or "L" (mirrored: thumb on the right).
        style: a PhantomStyle or a VARIANTS name (None: the default phantom).

    Returns:
        image (size, size) uint8 and one Annotation per class in CLASSES order; points are
        integer pixel coordinates inside the image, and the picture is drawn from exactly
        these polygons.
    """
    if side not in ("R", "L"):
        raise TwostageError(f"side {side!r}: must be 'R' or 'L'")
    if size < MIN_SIZE:
        raise TwostageError(f"size {size}: must be at least {MIN_SIZE} px")
    style = resolve_style(style)

    # Pose: scale from the carpal box fraction, then shrink until the hand fits.
    frac = rng.uniform(*style.carpal_fraction)
    rot = rng.uniform(-style.rotation, style.rotation)
    mirror = -1.0 if side == "R" else 1.0
    px_per_cm = frac * size / _CARPAL_BOX_CM
    bones, extra = _hand_bones(rng, px_per_cm, style)
    a = np.deg2rad(rot)
    rot_m = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])

    def frame(p: np.ndarray) -> np.ndarray:  # hand cm -> unscaled image directions
        return (p * np.array([mirror, -1.0])) @ rot_m

    hand_pts = np.concatenate([b.outline for b in bones if b.label not in FOREARM]
                              + [extra["tips"] + 0.5, extra["tips"] - 0.5])
    ext = frame(hand_pts)
    span = ext.max(0) - ext.min(0)
    fit = min(0.97 * size / span[0], 0.97 * size / span[1], 0.82 * size / -ext[:, 1].min())
    px_per_cm = min(px_per_cm, fit)
    ext *= px_per_cm
    free = size - (ext.max(0) - ext.min(0))
    offset = np.array([
        -ext[:, 0].min() + free[0] * rng.uniform(0.3, 0.7),
        -ext[:, 1].min() + size * rng.uniform(-0.01, 0.04),
    ])

    def to_px(p: np.ndarray) -> np.ndarray:
        return frame(p) * px_per_cm + offset

    annotations = []
    for bone in bones:
        pts = _pixel_polygon(to_px(bone.outline), size)
        if len(pts) < 3:  # a bone pushed out of the image: keep a sliver on the edge
            c = np.clip(np.rint(to_px(bone.outline).mean(0)), 1, size - 2).astype(np.int32)
            pts = np.array([c - [1, 0], c + [1, 0], c + [0, 1]], np.int32)
        annotations.append(Annotation(bone.label, pts))

    return _expose(rng, size, bones, annotations, extra, to_px, px_per_cm, style), annotations


def _expose(rng: np.random.Generator, size: int, bones: list, annotations: list[Annotation], extra: dict,
            to_px, px_per_cm: float, style: PhantomStyle = VARIANTS["default"]) -> np.ndarray:
    """The radiograph of placed bones: attenuation of background, soft tissue and bones
    (overlaps add up), blur, exposure and noise, as (size, size) uint8."""
    import cv2

    ys = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    atten = np.float32(0.06) + np.float32(rng.uniform(0.0, 0.03)) * (ys[:, None] + ys[None, :])
    tissue = _soft_tissue(extra["chains"], bones, to_px, size, px_per_cm, rng)
    atten = atten + np.float32(rng.uniform(0.2, 0.27)) * tissue
    texture = rng.standard_normal((size, size), dtype=np.float32)
    texture = cv2.GaussianBlur(texture, (0, 0), max(0.6, 0.025 * px_per_cm))
    texture *= np.float32(1.0 / (texture.std() + 1e-6))
    bone_gain = np.float32(rng.uniform(0.85 * style.bone_gain, 1.1 * style.bone_gain))
    drawn = [(b, a.points) for b, a in zip(bones, annotations)]
    drawn += [(b, _pixel_polygon(to_px(b.outline), size)) for b in extra["unlabeled"]]
    for bone, pts in drawn:
        if len(pts) < 3:
            continue
        x0, y0 = np.maximum(pts.min(0) - 2, 0)
        x1, y1 = np.minimum(pts.max(0) + 3, size)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [(pts - [x0, y0]).reshape(-1, 1, 2)], 1)
        att = _bone_attenuation(mask, bone, px_per_cm, texture[y0:y1, x0:x1])
        atten[y0:y1, x0:x1] += bone_gain * att
    blur = 0.0012 * size * style.blur
    if blur >= 0.3:
        atten = cv2.GaussianBlur(atten, (0, 0), blur)
    gain = rng.uniform(1.5, 1.9)
    image = 255.0 * (1.0 - np.exp(-gain * atten))
    image += rng.normal(0.0, rng.uniform(2.0 * style.noise, 4.5 * style.noise), (size, size)).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


def _image_stem(rng: np.random.Generator, used: set[int]) -> int:
    """A unique 13-digit millisecond-timestamp-like number, as in real file names."""
    while True:
        k = int(rng.integers(1_661_000_000_000, 1_669_999_999_999))
        if k not in used:
            used.add(k)
            return k


def _hands(n: int) -> list[tuple[int, str]]:
    """(person index, side) for n images: both hands per person, a lone right hand if n is odd."""
    out = []
    for i in range((n + 1) // 2):
        out += [(i, "L"), (i, "R")] if 2 * i + 1 < n else [(i, "R")]
    return out


def synthesize(out: str | os.PathLike, n: int = 20, size: int = 512, seed: int = 0,
               test_n: int = 0, overwrite: bool = False, style: PhantomStyle | str | None = None) -> Path:
    """Write a phantom dataset in the dataset layout and return its root.

    OUT/train/DCM/IDxxx/image<13 digits>_{L,R}.png with OUT/train/outputs_json/... JSON,
    OUT/test/DCM/... (no JSON, their own IDs) and OUT/meta_data.csv (ID, age, sex, weight,
    height). `n` and `test_n` count images: two per ID (left and right hand); an odd count
    gives its last ID a single right hand. JSON `metadata` and `filename` are deliberately
    wrong, like real files. `style`: a PhantomStyle or a VARIANTS name (None: "default");
    the same seed draws the same hands, IDs and names in every style.
    """
    from tqdm import tqdm

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise TwostageError(f"n={n}: need at least 1 training image")
    if not isinstance(test_n, (int, np.integer)) or test_n < 0:
        raise TwostageError(f"test_n={test_n}: must be 0 or more")
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise TwostageError(f"size={size}: must be an integer of at least {MIN_SIZE} px")
    style = resolve_style(style)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TwostageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TwostageError(f"{out}: folder is not empty (use --overwrite / overwrite=True to write into it)")

    rng = np.random.default_rng(seed)
    used: set[int] = set()
    jobs = []
    meta_rows = []
    next_id = 1
    for split, count in (("train", n), ("test", test_n)):
        people: dict[int, str] = {}
        for person, side in _hands(count):
            if person not in people:
                people[person] = f"ID{next_id:03d}"
                next_id += 1
                meta_rows.append([people[person], int(rng.integers(20, 70)), str(rng.choice(["M", "F"])),
                                  int(rng.integers(48, 95)), int(rng.integers(152, 190))])
            stem = f"image{_image_stem(rng, used)}_{side}"
            jobs.append((split, people[person], stem, side, int(rng.integers(2**63 - 1))))

    for split, pid, stem, side, image_seed in tqdm(jobs, desc="synth", unit="img", disable=None):
        image, annotations = render_hand(np.random.default_rng(image_seed), size, side, style)
        write_png_atomic(out / split / IMAGE_DIR / pid / f"{stem}.png", image)
        if split == "train":
            wrong = f"image{_image_stem(np.random.default_rng(image_seed ^ 0x5EED), set())}.png"
            write_annotations(out / split / JSON_DIR / pid / f"{stem}.json", annotations, wrong,
                              (size, size), metadata={"width": FAKE_METADATA_SIZE,
                                                      "height": FAKE_METADATA_SIZE})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ID", "age", "sex", "weight", "height"])
    writer.writerows(meta_rows)
    write_text_atomic(out / "meta_data.csv", buf.getvalue())
    log.info("synth: %d train + %d test images (%d px, style %s) in %s", n, test_n, size, style_name(style), out)
    return out
