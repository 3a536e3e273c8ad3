"""CLAHE for a batch of grey images as torch ops, on whatever device the batch is on.

The training augmentation runs batched on the training device (`augment`), so CLAHE can no
longer be OpenCV's per-image CPU call. This re-implements OpenCV's 8-bit algorithm
(modules/imgproc/src/clahe.cpp: CLAHE_Impl::apply, CLAHE_CalcLut_Body,
CLAHE_Interpolation_Body) step by step, with the same float32 operations in the same order
and the same rounding, so that with `weight=None` it reproduces OpenCV's result bit for bit:
a 256-bin histogram per tile (of the image padded with BORDER_REFLECT_101 when a side is not
a multiple of the tile count), clipped at max(int(clip_limit * area / 256), 1) with the
excess spread uniformly plus OpenCV's residual step, LUT = saturate(round(cumsum * 255 /
area)), then per pixel the bilinear blend of the LUTs of the 4 nearest tile centres.

`weight` (the coverage of a geometrically augmented image) keeps the zero-filled outside out
of the histograms; the interpolation does not depend on it.
"""
from __future__ import annotations

import torch

LEVELS = 256
"""Histogram bins: one per grey level of an 8-bit image."""

_CHUNK_CPU = 1 << 18
"""Pixels handled at once on the CPU: the per-pixel buffers stay in the cache and the allocator
reuses them (fresh 30 MB tensors cost more in page faults than their arithmetic)."""

_CHUNK_OTHER = 1 << 22
"""Pixels handled at once on other devices (GPU): few kernel launches, yet bounded per-pixel
buffers (~100 MB) however big the batch."""


def _reflect101(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Source indices of BORDER_REFLECT_101 (0, 1, …, n-1, n-2, …) for `size` >= n positions,
    folded as often as needed, like OpenCV's borderInterpolate."""
    i = torch.arange(size, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i % period
    return torch.where(i >= n, period - i, i)


def _axis(n: int, tile: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per row (or column) of the image: the interpolation cell 0..tiles (cell c blends tiles
    max(c-1, 0) and min(c, tiles-1)) and the two blend weights (a, 1-a), computed as OpenCV
    does in float32 (t = i * (1/tile) - 0.5; a = t - floor(t)), so they are the same bits."""
    inv = torch.full((), 1.0, dtype=torch.float32, device=device) / tile  # made on the device: no host copy
    t = torch.arange(n, device=device, dtype=torch.float32) * inv - 0.5
    t1 = torch.floor(t)
    a = t - t1
    return (t1.to(torch.int64) + 1).clamp_(0, tiles), a, 1.0 - a


def _luts(hist: torch.Tensor, clip_limit: float) -> torch.Tensor:
    """Clipped float32 histograms (..., 256) -> uint8 LUTs, as CLAHE_CalcLut_Body.

    The counts are exact integers when every weight is 1 (float32 is exact up to 2**24 per
    tile), and then this is OpenCV's integer arithmetic; fractional weights take the same
    formulas, with the fraction of the clipped excess that OpenCV's integer residual step
    cannot place spread evenly over the bins."""
    area = hist.sum(-1, keepdim=True)
    if clip_limit > 0:
        # OpenCV: static_cast<int>(clipLimit * tileSizeTotal / histSize), in double
        wide = torch.float32 if hist.device.type == "mps" else torch.float64
        limit = torch.floor(clip_limit * area.to(wide) / LEVELS).clamp_(min=1).to(torch.float32)
        clipped = (hist - limit).clamp_(min=0).sum(-1, keepdim=True)
        hist = torch.minimum(hist, limit)
        batch = torch.floor(clipped / LEVELS)
        residual = clipped - batch * LEVELS
        n = residual.to(torch.int64)
        # the whole residual units: one each to bins 0, step, 2 step, … with step = max(256 // n, 1)
        step = (LEVELS // n.clamp(min=1)).clamp_(min=1)
        i = torch.arange(LEVELS, device=hist.device)
        extra = ((i % step == 0) & (i // step < n)).to(torch.float32)
        hist = hist + (batch + (residual - n) / LEVELS) + extra
    cdf = torch.cumsum(hist, -1)
    # OpenCV: lutScale = float(255) / tileSizeTotal; saturate_cast<uchar>(sum * lutScale)
    scale = torch.full((), LEVELS - 1.0, dtype=torch.float32, device=hist.device) / area.clamp(min=1e-30)
    lut = torch.round(cdf * scale).clamp_(0, LEVELS - 1)
    # a tile without any weight has no histogram: its grey levels stay as they are
    identity = torch.arange(LEVELS, device=hist.device, dtype=torch.float32)
    return torch.where(area > 0, lut, identity).to(torch.uint8)


def clahe(images: torch.Tensor, clip_limit: float = 2.0, tiles: tuple[int, int] = (8, 8),
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """OpenCV's CLAHE (`cv2.createCLAHE(clip_limit, tiles).apply`) on a (B, H, W) batch of
    float grey levels 0..255, on the batch's device; returns (B, H, W) float32 in 0..255, not
    yet rounded: round half to even (`torch.round`) gives OpenCV's uint8 result exactly.

    `tiles` is (tiles_x, tiles_y), OpenCV's tileGridSize. `weight` (B, H, W) in 0..1 is each
    pixel's weight in its tile's histogram (None: 1 everywhere, OpenCV's result); the tile
    area in the clip limit and in the LUT scale is then the tile's summed weight, and a tile
    without weight keeps its grey levels (identity LUT). Inputs are rounded to integer levels.
    """
    if images.dim() != 3:
        raise ValueError(f"clahe expects (B, H, W) images, got shape {tuple(images.shape)}")
    if weight is not None and weight.shape != images.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} differs from images {tuple(images.shape)}")
    tx, ty = int(tiles[0]), int(tiles[1])
    if tx < 1 or ty < 1:
        raise ValueError(f"tiles must be positive, got {tiles}")
    B, H, W = images.shape
    dev = images.device
    if images.numel() == 0:
        return images.to(torch.float32)
    chunk = _CHUNK_CPU if dev.type == "cpu" else _CHUNK_OTHER
    levels = torch.round(images).clamp_(0, LEVELS - 1).to(torch.uint8)
    hist, th, tw = _tile_histograms(levels, weight, tx, ty, chunk)
    lut = _luts(hist.view(B, ty, tx, LEVELS), clip_limit)
    return _blend(levels, lut, th, tw, chunk)


def _tile_histograms(levels: torch.Tensor, weight: torch.Tensor | None, tx: int, ty: int,
                     chunk: int) -> tuple[torch.Tensor, int, int]:
    """The (weighted) grey-level histogram of every tile, flat (B*ty*tx*256), and the tile size.

    Of the image padded at the bottom/right (reflect-101) when a side does not divide; OpenCV
    then pads *both* sides by tiles - size % tiles, i.e. by a whole tile on a side that did
    divide (which changes that side's tile size): kept, to match it."""
    B, H, W = levels.shape
    dev = levels.device
    lv, wt = levels, weight
    if H % ty or W % tx:
        rows = _reflect101(H, H + ty - H % ty, dev)
        cols = _reflect101(W, W + tx - W % tx, dev)
        lv = lv[:, rows][:, :, cols]
        wt = None if wt is None else wt[:, rows][:, :, cols]
    Hp, Wp = lv.shape[1:]
    th, tw = Hp // ty, Wp // tx
    lv = lv.reshape(B * Hp, Wp)
    ones = torch.ones((), dtype=torch.float32, device=dev)
    wt = None if wt is None else wt.to(torch.float32).reshape(B * Hp, Wp)
    # key = ((item * ty + tile row) * tx + tile column) * 256 + level
    row_key = ((torch.arange(B, device=dev) * ty).unsqueeze(1) + torch.arange(Hp, device=dev) // th).view(-1)
    row_key = (row_key * (tx * LEVELS)).unsqueeze(1)
    col_key = (torch.arange(Wp, device=dev) // tw) * LEVELS
    hist = torch.zeros(B * ty * tx * LEVELS, dtype=torch.float32, device=dev)
    step = max(1, chunk // Wp)
    for r0 in range(0, B * Hp, step):  # chunks: bounded, cache-sized int64 keys
        r1 = min(B * Hp, r0 + step)
        key = lv[r0:r1].to(torch.int64).add_(col_key).add_(row_key[r0:r1]).view(-1)
        src = ones.expand(key.numel()) if wt is None else wt[r0:r1].reshape(-1)
        hist.scatter_add_(0, key, src)  # float32 sums of integer counts stay exact
    return hist, th, tw


def _blend(levels: torch.Tensor, lut: torch.Tensor, th: int, tw: int, chunk: int) -> torch.Tensor:
    """Every pixel's level through the 4 LUTs of the tile centres around it, blended bilinearly.

    Per interpolation cell (between 4 tile centres) its 4 LUTs side by side, packed as one
    int32 per level, so that a pixel needs one gather instead of four; then OpenCV's blend, in
    its order of float32 operations (one rounding each, no fused multiply-add):
    (l11 * xa1 + l12 * xa) * ya1 + (l21 * xa1 + l22 * xa) * ya."""
    B, H, W = levels.shape
    ty, tx = lut.shape[1:3]
    dev = levels.device
    cy, ya, ya1 = _axis(H, th, ty, dev)
    cx, xa, xa1 = _axis(W, tw, tx, dev)
    cells_y, cells_x = torch.arange(ty + 1, device=dev), torch.arange(tx + 1, device=dev)
    up, down = (cells_y - 1).clamp(min=0), cells_y.clamp(max=ty - 1)
    left, right = (cells_x - 1).clamp(min=0), cells_x.clamp(max=tx - 1)
    quad = torch.stack([lut[:, up][:, :, left], lut[:, up][:, :, right],
                        lut[:, down][:, :, left], lut[:, down][:, :, right]], -1)  # (B, ty+1, tx+1, 256, 4)
    packed = quad.contiguous().view(torch.int32).view(-1)
    cell_row = ((torch.arange(B, device=dev) * (ty + 1)).unsqueeze(1) + cy).view(-1)
    cell_row = (cell_row * ((tx + 1) * LEVELS)).to(torch.int32).unsqueeze(1)
    cell_col = (cx * LEVELS).to(torch.int32)
    ya, ya1 = ya.repeat(B).unsqueeze(1), ya1.repeat(B).unsqueeze(1)

    lv = levels.reshape(B * H, W)
    out = torch.empty((B * H, W), dtype=torch.float32, device=dev)
    step = max(1, chunk // W)
    for r0 in range(0, B * H, step):
        r1 = min(B * H, r0 + step)
        idx = lv[r0:r1].to(torch.int32).add_(cell_col).add_(cell_row[r0:r1]).view(-1)
        g = packed.index_select(0, idx).view(torch.uint8).view(r1 - r0, W, 4)
        g = g.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        g[0].mul_(xa1).add_(g[1].mul_(xa)).mul_(ya1[r0:r1])
        g[2].mul_(xa1).add_(g[3].mul_(xa)).mul_(ya[r0:r1])
        torch.add(g[0], g[2], out=out[r0:r1])
    return out.clamp_(0, LEVELS - 1).view(B, H, W)
