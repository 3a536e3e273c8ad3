"""Reference implementations the tests check production code against: the dense mapping of
an array into an upscaled box crop and back (production maps polygons with
`box.polygon_to_crop` and crops images with `box.crop_image`; these give the expected result)."""
from __future__ import annotations

import numpy as np

from twostage.box import Box, crop_image
from twostage.errors import TwostageError


def points_to_source(points: np.ndarray, box: Box, scale: float) -> np.ndarray:
    """Inverse of `points_to_crop`: crop x,y -> float source coordinates."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts + 0.5) / scale - 0.5 + [box.x0, box.y0]


def resize_square(array, size: int, upscale: bool):
    """Resize the last two dims of a numpy array / torch tensor to (size, size), pixel centres aligned.

    Integer and bool data (masks, labels) use nearest-exact, so values stay in their set;
    float data (probabilities) uses bilinear, area-averaged when shrinking.
    """
    if isinstance(array, np.ndarray):
        import cv2

        lead = array.shape[:-2]
        flat = array.reshape(-1, *array.shape[-2:])
        if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
            src = flat.astype(np.uint8) if array.dtype == bool else flat
            out = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_NEAREST_EXACT) for c in src])
            out = out.astype(array.dtype)
        else:
            interp = cv2.INTER_LINEAR if upscale else cv2.INTER_AREA
            out = np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in flat])
        return out.reshape(*lead, size, size)
    import torch
    import torch.nn.functional as F

    lead = array.shape[:-2]
    flat = array.reshape(1, -1, *array.shape[-2:])
    if not torch.is_floating_point(array):
        out = F.interpolate(flat.float(), size=(size, size), mode="nearest-exact").to(array.dtype)
    else:
        out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=not upscale)
    return out.reshape(*lead, size, size)


def source_to_crop(array, box: Box, scale: int):
    """Crop an (..., H, W) array to the box and resize it by `scale` (the forward mapping of
    maps/masks; images for the network go through an `Upscaler` instead)."""
    return resize_square(crop_image(array, box), box.side * scale, upscale=True)


def crop_to_source(crop_array, box: Box, scale: int):
    """Inverse of `source_to_crop`: an (..., s·side, s·side) crop-space array resized to
    (..., side, side) in source pixels, ready for `paste`."""
    expect = box.side * scale
    if tuple(crop_array.shape[-2:]) != (expect, expect):
        raise TwostageError(f"crop_to_source: crop array is {tuple(crop_array.shape[-2:])}, "
                            f"expected ({expect}, {expect}) for box side {box.side} x scale {scale}")
    return resize_square(crop_array, box.side, upscale=False)


def paste(full, crop_source, box: Box):
    """Write a (..., side, side) source-size crop array into (..., H, W) `full` in place; returns `full`."""
    rows, cols = box.slices
    full[..., rows, cols] = crop_source
    return full
