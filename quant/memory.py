"""Measuring weight storage and dropping per-run state (the lessons of seed 001 as code).

Bytes are counted from the real storage: a torchao tensor subclass (Int8Tensor,
Float8Tensor) reports the dtype of the weight it stands for (bf16), not of what
it holds (int8 data + float32 scales), so `numel * element_size` would count it
twice over. We open it with `__tensor_flatten__` instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vram_utils import sizes as _sizes

logger = logging.getLogger(__name__)

# Per-run tensors are latent-shaped (B, C, F, H, W) or (B, C) at least; schedule tables
# (betas, alphas_cumprod, timesteps, sigmas) are 1-D or scalars and belong to the config.
_PER_RUN_MIN_DIMS = 2
_MAX_DEPTH = 4  # how deep `state_tensors` follows plain objects, lists and dicts


# Storage is counted, and memory given back, by vram_utils: one implementation for the whole house.
tensor_bytes = _sizes.tensor_bytes
weight_bytes = _sizes.module_bytes  # a module's parameters and buffers as stored, shared tensors once
release_memory = _sizes.release_memory
trim_host_heap = _sizes.trim_host_heap


def param_count(module: torch.nn.Module) -> int:
    """Logical parameter count (a quantized weight counts the elements it stands for)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class StateTensor:
    path: str  # e.g. "scheduler.model_outputs[0]"
    shape: tuple[int, ...]
    bytes: int


def state_tensors(pipe: object) -> list[StateTensor]:
    """Tensors a pipeline holds outside its nn.Module components (scheduler state, pipeline attributes).

    Weights live in modules and are meant to stay; anything else still holding a
    tensor after a run is per-run state that a later run may copy or pile up.
    """
    found: list[StateTensor] = []
    _walk(pipe, "", set(), found, 0)
    return found


def _walk(obj: object, path: str, seen: set[int], found: list[StateTensor], depth: int) -> None:
    if depth > _MAX_DEPTH or id(obj) in seen or isinstance(obj, (torch.nn.Module, type, str, bytes, int, float)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(StateTensor(path, tuple(obj.shape), tensor_bytes(obj)))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, f"{path}[{key!r}]", seen, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, f"{path}[{i}]", seen, found, depth + 1)
    elif hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            _walk(value, f"{path}.{key}" if path else key, seen, found, depth + 1)


def drop_run_state(pipe: object) -> int:
    """Drop latent-shaped tensors a finished run left in the pipeline and its scheduler; returns bytes dropped.

    Multistep schedulers (UniPC, DPM-Solver) keep the last model outputs and
    sample between calls; `set_timesteps` resets them at the next run, so
    dropping them is safe and returns their memory now instead of holding it
    (on the GPU, when the latents lived there) until the next run.
    """
    dropped = 0
    for owner in (pipe, getattr(pipe, "scheduler", None)):
        if owner is None:
            continue
        for name, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and value.dim() >= _PER_RUN_MIN_DIMS:
                dropped += tensor_bytes(value)
                setattr(owner, name, None)
            elif isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value):
                # Keep the list (its length is the solver order), empty its slots.
                for i, v in enumerate(value):
                    if isinstance(v, torch.Tensor) and v.dim() >= _PER_RUN_MIN_DIMS:
                        dropped += tensor_bytes(v)
                        value[i] = None
    if dropped:
        logger.debug("dropped %.1f KiB of per-run pipeline state", dropped / 2**10)
    return dropped
