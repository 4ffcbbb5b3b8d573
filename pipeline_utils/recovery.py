"""Out-of-memory recovery: recognise an OOM and pick the next rung down.

The ladder, one rung per failure: offload (none -> model -> group -> sequential; on a
machine without a GPU these run too for the denoise, onloading to the CPU, so the same
path is taken and tested everywhere), then VAE tiling on, then smaller tiles
(halved down to a floor), then smaller decode chunks (down to one latent frame).
A denoise OOM can only be helped by offload; a decode OOM by all of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from configs.schema import OFFLOADS, Plan
from vram_utils.sizes import is_out_of_memory

RecoveryStage = Literal["loading", "encoding", "denoising", "decoding"]
TILE_FLOOR_PX = 64  # below this the seams cost more than the memory saved
# Without a chunk setting the VAEs decode 2 latent frames at a time (diffusers' CogVideoX batch size).
DEFAULT_CHUNK_FRAMES = 2


@dataclass(frozen=True)
class StepDown:
    stage: RecoveryStage
    error: str
    change: str  # what was changed, for the person and the sidecar

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decode_step_downs(stats) -> list[StepDown]:
    """The streaming decode's own steps (`DecodeStats.oom_steps`: smaller tiles, then smaller chunks)."""
    return [StepDown("decoding", s.error, s.change()) for s in stats.oom_steps]


# One definition of "out of memory" for the whole house (the decode's own ladder uses it too).
is_oom = is_out_of_memory


def step_down(plan: Plan, stage: RecoveryStage, cuda: bool) -> tuple[Plan, str] | None:
    """The plan one rung lower for a failure at `stage`, with a one-line description; None at the bottom."""
    # Offloading frees GPU memory for the decode too (the transformer leaves the GPU); without a GPU
    # the weights already sit in RAM, so a decode goes straight to the decode rungs.
    if plan.offload != OFFLOADS[-1] and (cuda or stage != "decoding"):
        lower = OFFLOADS[OFFLOADS.index(plan.offload) + 1]
        return plan.replace(offload=lower), f"offload {plan.offload} -> {lower}"
    if stage != "decoding":
        return None
    d = plan.decode
    if not d.enable_vae_tiling:
        return _with_decode(plan, enable_vae_tiling=True), f"VAE tiling on ({d.tile_x}x{d.tile_y} px tiles)"
    if min(d.tile_x, d.tile_y) // 2 >= TILE_FLOOR_PX:
        tx, ty = d.tile_x // 2, d.tile_y // 2
        sx, sy = max(TILE_FLOOR_PX // 2, d.tile_stride_x // 2), max(TILE_FLOOR_PX // 2, d.tile_stride_y // 2)
        return (
            _with_decode(plan, tile_x=tx, tile_y=ty, tile_stride_x=min(sx, tx), tile_stride_y=min(sy, ty)),
            f"tiles {d.tile_x}x{d.tile_y} -> {tx}x{ty} px",
        )
    chunk = d.chunk_frames or DEFAULT_CHUNK_FRAMES
    if chunk > 1:
        return _with_decode(plan, chunk_frames=chunk // 2), f"decode chunks {chunk} -> {chunk // 2} latent frames"
    return None


def _with_decode(plan: Plan, **changes) -> Plan:
    return plan.replace(decode=dataclasses.replace(plan.decode, **changes))
