"""Where the spatial tiles go, and how their seams are blended. Pure arithmetic plus one small weight tensor.

Tiles are placed in latent pixels so that every tile decodes to exactly `factor` times its latent size; the
tiles of one axis are spread evenly between the first and the last position, all of the same size, so the
output is always exactly the latent size times the VAE's spatial factor (diffusers' CogVideoX tiling is not:
its row limits are rounded separately from its strides).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the blend weights: the planner imports the arithmetic without it
    import torch


@dataclass(frozen=True)
class TileLayout:
    """Tiles over one latent frame. Starts and sizes are latent pixels; `factor` turns them into output pixels."""

    height: int  # latent
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]  # tile starts, latent rows
    xs: tuple[int, ...]  # tile starts, latent columns
    factor: int  # output pixels per latent pixel
    # The largest tile asked for (latent pixels, clamped to the frame); tile_h / tile_w may be smaller.
    max_tile_h: int
    max_tile_w: int

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def tiled(self) -> bool:
        return self.count > 1

    @property
    def overhead(self) -> float:
        """Pixels through the decoder over the frame's pixels: 1.0 untiled, more with every overlap."""
        return self.count * self.tile_h * self.tile_w / (self.height * self.width)

    def tiles(self) -> list[tuple[int, int]]:
        """(y0, x0) latent starts, row by row."""
        return [(y, x) for y in self.ys for x in self.xs]

    def describe(self) -> str:
        f = self.factor
        if not self.tiled:
            return f"untiled ({self.height * f}x{self.width * f} px)"
        return (
            f"{len(self.ys)}x{len(self.xs)} tiles of {self.tile_h * f}x{self.tile_w * f} px "
            f"over {self.height * f}x{self.width * f} px"
        )


def axis_tiles(length: int, tile: int, stride: int) -> tuple[int, tuple[int, ...]]:
    """(size, starts) of equal tiles covering [0, length), for a tile of at most `tile` and an overlap of at
    least `tile - stride`: as few tiles as `stride` allows, each shrunk to the smallest size that still
    keeps that overlap, spread evenly with the last one flush.

    Shrinking costs nothing in blend width and saves work: 360 px in tiles of 256 / stride 192 become two of
    216 px (overlap 72) instead of two of 256 (overlap 152), 16% fewer pixels through the decoder.
    """
    if tile >= length:
        return length, (0,)
    n = math.ceil((length - tile) / stride) + 1
    overlap = tile - stride
    size = min(tile, math.ceil((length + (n - 1) * overlap) / n))
    # Even spacing: the ideal step (length - size) / (n - 1) is at most size - overlap, an integer, so the
    # rounded steps are too; every overlap stays at least tile - stride wide.
    return size, tuple(round(i * (length - size) / (n - 1)) for i in range(n))


def plan_tiles(
    latent_h: int, latent_w: int, factor: int, tile_px: tuple[int, int] | None, stride_px: tuple[int, int]
) -> TileLayout:
    """A layout from output-pixel sizes. `tile_px` is (tile_y, tile_x), the largest tile, or None for one
    tile over the frame; tiles may come out smaller (see `axis_tiles`).

    Pixel sizes are rounded down to whole latent pixels (at least one), and a stride is never larger than its tile.
    """
    if tile_px is None:
        return TileLayout(latent_h, latent_w, latent_h, latent_w, (0,), (0,), factor, latent_h, latent_w)
    tile_h = min(latent_h, max(1, tile_px[0] // factor))
    tile_w = min(latent_w, max(1, tile_px[1] // factor))
    stride_h = min(tile_h, max(1, stride_px[0] // factor))
    stride_w = min(tile_w, max(1, stride_px[1] // factor))
    size_h, ys = axis_tiles(latent_h, tile_h, stride_h)
    size_w, xs = axis_tiles(latent_w, tile_w, stride_w)
    return TileLayout(latent_h, latent_w, size_h, size_w, ys, xs, factor, tile_h, tile_w)


def frame_layout(
    frame_px: tuple[int, int], factor: int, tile_px: tuple[int, int] | None, stride_px: tuple[int, int]
) -> TileLayout:
    """`plan_tiles` for a frame of (height, width) output pixels: what the stream decodes for these settings."""
    return plan_tiles(max(1, frame_px[0] // factor), max(1, frame_px[1] // factor), factor, tile_px, stride_px)


def _ramp(size: int, before: int, after: int) -> torch.Tensor:
    """1-D weights over one tile axis: rising across the overlap with the tile before, falling across the one after.

    Values are (k + 0.5) / overlap, so they never reach 0 (every pixel keeps a weight) and two complementary
    ramps sum to exactly 1.
    """
    import torch

    k = torch.arange(size, dtype=torch.float32) + 0.5
    w = torch.ones(size)
    if before > 0:
        w = torch.minimum(w, k / before)
    if after > 0:
        w = torch.minimum(w, k.flip(0) / after)
    return w


def blend_weight(layout: TileLayout, y0: int, x0: int) -> torch.Tensor:
    """(tile_h * factor, tile_w * factor) float32 weight of the tile at latent (y0, x0)."""
    f = layout.factor

    def overlaps(starts: tuple[int, ...], start: int, tile: int) -> tuple[int, int]:
        i = starts.index(start)
        before = starts[i - 1] + tile - start if i > 0 else 0
        after = start + tile - starts[i + 1] if i + 1 < len(starts) else 0
        return before * f, after * f

    wy = _ramp(layout.tile_h * f, *overlaps(layout.ys, y0, layout.tile_h))
    wx = _ramp(layout.tile_w * f, *overlaps(layout.xs, x0, layout.tile_w))
    return wy[:, None] * wx[None, :]
