"""Latent preview: a small RGB picture of the latents while they are being denoised.

A per-family linear latent -> RGB projection (families/*.py: `latent_rgb_factors`, `latent_rgb_bias`, where the
numbers come from and which latent space they are for) of the middle latent frame, upscaled, with a strip of up
to four other latent frames below it. The projection runs in torch on the latents' device;
the latents are only read. Only the projected latent-size frames come to the CPU, where numpy upscales them
(nearest neighbour) and lays them out. Cost: about a millisecond, next to seconds per denoising step.

Wiring into a diffusers pipeline call (the off switch is not passing the callback):

    policy = PreviewPolicy()                       # make it right before the pipeline call
    def on_step_end(pipe, i, t, callback_kwargs):
        image = policy.maybe(i, preview_image, callback_kwargs["latents"], family, pipe=pipe)
        if image is not None:
            publish(image)                         # (H, W, 3) uint8 numpy
        return callback_kwargs                     # untouched: the preview never changes the latents
    pipe(..., callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])

`PreviewPolicy` spaces the previews so their total time stays within `budget` (5 %) of the denoising time it
measures between callbacks, and never lets a failing preview stop a generation.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

STRIP_FRAMES = 4  # other latent frames shown small below the middle one
STRIP_GAP = 2  # pixels between the main picture and the strip


def preview_frame_indices(frames: int, strip: int = STRIP_FRAMES) -> tuple[int, list[int]]:
    """(the middle frame, up to `strip` other frames spread over the clip in time order)."""
    middle = frames // 2
    others = [f for f in range(frames) if f != middle]
    if len(others) > strip:
        picks = np.linspace(0, len(others) - 1, strip).round().astype(int)
        others = [others[p] for p in picks]
    return middle, others


def project_latents(latents: torch.Tensor, family, frames: list[int], pipe=None) -> torch.Tensor:
    """The pipeline's latents, batch item 0, latent `frames` -> (len(frames), 3, H, W) float32 RGB in about [-1, 1].

    `family.preview_latents` gives the (B, C, F, H, W) view, `family.rgb_projection` the factors for the pipeline's
    latent space (`pipe` lends the VAE config where the family needs it). Reads `latents` only.
    """
    return _project(latents, family, frames, pipe, 1.0, 0.0)


def _project(latents: torch.Tensor, family, frames: list[int], pipe, gain: float, offset: float) -> torch.Tensor:
    """gain * (z @ factors + bias) + offset as (n, 3, H, W) float32: index_select + one addmm (few ops: cheap)."""
    with torch.no_grad():
        z = family.preview_latents(latents)[0]  # (C, F, H, W) view
        index = torch.tensor(frames, device=z.device, dtype=torch.long)
        picked = z.index_select(1, index).float()  # (C, n, H, W): a copy of the few frames wanted
        c, n, h, w = picked.shape
        factors, bias = family.rgb_projection(c, pipe)
        weight = torch.tensor(factors, dtype=torch.float32).t().mul(gain).to(z.device)  # (3, C)
        shift = torch.tensor(bias, dtype=torch.float32).mul(gain).add(offset).view(3, 1).to(z.device)
        rgb = torch.addmm(shift, weight, picked.view(c, n * h * w))  # (3, n*H*W)
        return rgb.view(3, n, h, w).transpose(0, 1)


def _upscale(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of (h, w, 3) uint8: each latent pixel becomes a block, as it honestly is."""
    h, w = frame.shape[:2]
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    return frame[rows[:, None], cols[None, :]]


def compose_preview(frames: np.ndarray, max_side: int) -> np.ndarray:
    """(n, h, w, 3) uint8, main frame first -> (H, W, 3) uint8: main with its longer side `max_side`, strip below.

    Numpy on the CPU: single-threaded copies of a few hundred KB, which stay cheap on a busy machine (small
    torch ops there pay for waking intra-op threads).
    """
    n, h, w = frames.shape[:3]
    scale = max_side / max(h, w)
    main_h, main_w = max(1, round(h * scale)), max(1, round(w * scale))
    main = _upscale(frames[0], main_h, main_w)
    if n == 1:
        return np.ascontiguousarray(main)
    thumb_w = max(1, main_w // (n - 1))
    thumb_h = max(1, round(thumb_w * h / w))
    canvas = np.zeros((main_h + STRIP_GAP + thumb_h, main_w, 3), dtype=np.uint8)
    canvas[:main_h] = main
    for j, frame in enumerate(frames[1:]):
        canvas[main_h + STRIP_GAP:, j * thumb_w:(j + 1) * thumb_w] = _upscale(frame, thumb_h, thumb_w)
    return canvas


def preview_image(
    latents: torch.Tensor, family, max_side: int = 256, pipe=None, strip: int = STRIP_FRAMES,
) -> np.ndarray:
    """A preview of the pipeline's current latents: (H, W, 3) uint8 numpy, the middle latent frame with its longer
    side `max_side` (nearest-neighbour: one block per latent pixel), and below it a strip of up to `strip` other
    frames (time order) filling the same width.

    `latents`: as `callback_on_step_end` gets them (`callback_kwargs["latents"]`, the family's layout, any float
    dtype, any device); only read. `family`: a families.ModelFamily. `pipe`: the pipeline, for the VAE's config
    (CogVideoX's scaling factor); None assumes the family's default. The projection runs on the latents' device;
    only the projected latent-size frames (a few KB) come to the CPU.
    """
    frames = family.preview_latents(latents).shape[2]
    middle, others = preview_frame_indices(frames, strip)
    with torch.no_grad():  # 127.5 * rgb + 128 rounds [-1, 1] to 0..255 when truncated
        pixels = _project(latents, family, [middle, *others], pipe, 127.5, 128.0).clamp_(0, 255).to(torch.uint8)
    return compose_preview(pixels.permute(0, 2, 3, 1).cpu().numpy(), max_side)


@dataclass
class PreviewPolicy:
    """Decides at each step whether to make a preview, so previews cost at most `budget` of the step time.

    It measures the time between callbacks (the denoising, previews excluded) and the previews it runs, and lets
    a preview through when the total preview time, this one included at the last one's cost, stays within
    `budget` x the denoising time so far; the first callback always gets one. `every`: never more often than
    every `every` steps; `min_interval_s`: nor more often than this (a UI need not refresh faster).
    """

    budget: float = 0.05
    every: int = 1
    min_interval_s: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    step_time: float = field(default=0.0, init=False)  # denoising seconds seen between callbacks
    preview_time: float = field(default=0.0, init=False)  # seconds spent in previews
    last_cost: float = field(default=0.0, init=False)
    previews: int = field(default=0, init=False)
    disabled: bool = field(default=False, init=False)
    _last_end: float | None = field(default=None, init=False)
    _last_step: int | None = field(default=None, init=False)
    _last_preview_at: float = field(default=float("-inf"), init=False)

    def due(self, step: int) -> bool:
        """Count the time since the last callback as denoising; True when a preview fits now."""
        now = self.clock()
        if self._last_end is not None:
            self.step_time += now - self._last_end
        self._last_end = now
        if self.disabled:
            return False
        if self._last_step is None:
            return True
        return (step - self._last_step >= self.every and now - self._last_preview_at >= self.min_interval_s
                and self.preview_time + self.last_cost <= self.budget * self.step_time)

    def maybe(self, step: int, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)`, timed, when `due(step)`; else None. A failing preview logs and turns previews off."""
        if not self.due(step):
            return None
        _sync(args)  # on a GPU, time the preview, not the step's queued kernels the preview's copy waits for
        start = self.clock()
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a preview must never stop a generation
            logger.warning("latent preview failed; previews off for this run", exc_info=True)
            self.disabled = True
            return None
        finally:
            end = self.clock()
            self.last_cost = end - start
            self.preview_time += self.last_cost
            self.previews += 1
            self._last_step, self._last_preview_at, self._last_end = step, end, end

    @property
    def overhead(self) -> float:
        """Preview time over denoising time so far."""
        return self.preview_time / self.step_time if self.step_time else 0.0


def _sync(args) -> None:
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is not None and tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
