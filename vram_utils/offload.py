"""Put a pipeline where a plan says: an offload rung and VAE tiling, on top of diffusers.

Rungs (DESIGN.md, fastest first):
  none        every module on the execution device
  model       `enable_model_cpu_offload` (whole components move in and out)
  group       block-level group offloading with CUDA streams (copies overlap compute); the VAE
              stays resident: it is small, and a CogVideoX VAE would be a single group whose hook
              only fires through forward(), which decode() never calls
  sequential  leaf-level group offloading with CUDA streams (the smallest footprint)

Applying is idempotent and safe for modules shared by several cached pipelines:
each module remembers which pipeline and rung last placed it, and whenever that
is not this pipeline and this rung, every hook on the pipeline's modules
(accelerate's and diffusers') is removed first and the rung applied afresh. The
runner applies the plan before every run, so a pipeline whose shared transformer
was re-hooked by its sibling gets it back in its own order.

Without a CUDA GPU the rungs still run, onloading to the CPU (model offload with
device="cpu", group offloading without streams), so the same path is exercised
everywhere.
"""
from __future__ import annotations

import itertools
import logging
from typing import Iterable

import torch

from configs.schema import OFFLOADS, Offload, Plan

logger = logging.getLogger(__name__)

_PLACED = "_fitvideo_placed"  # (pipeline token, rung, device) stamped on each module we placed
_TOKEN = "_fitvideo_token"  # a per-pipeline number: unlike id(), never reused by a later pipeline
_TOKENS = itertools.count(1)
# diffusers registers group offloading as these named hooks (diffusers.hooks.group_offloading)
_GROUP_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def execution_device() -> torch.device:
    """Where a run computes by default: the CUDA GPU with the most free memory, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from vram_utils.probe import probe

    best = probe().best_gpu
    return torch.device(f"cuda:{best.index if best else 0}")


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


# --------------------------------------------------------------------------- removing hooks


def remove_offload_hooks(module: torch.nn.Module) -> None:
    """Remove accelerate's (model / sequential offload) and diffusers' (group offload) hooks from a module tree.
    Weights that accelerate had moved to the meta device are restored from its CPU copy."""
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module, recurse=True)
    if any(hasattr(m, "_diffusers_hook") for m in module.modules()):
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in _GROUP_HOOK_NAMES:
            registry.remove_hook(name, recurse=True)
    module.__dict__.pop(_PLACED, None)


def remove_all_offload(pipe) -> None:
    """Strip every offload hook from the pipeline's modules, including hooks another pipeline sharing a
    module put there, and leave the modules where they are."""
    for module in _modules(pipe).values():
        remove_offload_hooks(module)
    if hasattr(pipe, "_all_hooks"):
        pipe._all_hooks = []  # model offload's hook chain; maybe_free_model_hooks re-hooks from it
    pipe.__dict__.pop(_PLACED, None)


def _token(pipe) -> int:
    return pipe.__dict__.setdefault(_TOKEN, next(_TOKENS))


def detach_pipeline(pipe, still_used: Iterable[torch.nn.Module] = ()) -> None:
    """Before a pipeline is dropped: remove the hooks it put on its modules. A module another pipeline
    still uses keeps its hooks unless this pipeline placed them last (model offload's hooks chain to
    the pipeline's other modules and would keep them alive); that pipeline re-applies its plan."""
    keep = {id(m) for m in still_used}
    mine = pipe.__dict__.get(_TOKEN)
    for module in _modules(pipe).values():
        stamp = module.__dict__.get(_PLACED)
        if id(module) not in keep or (stamp is not None and stamp[0] == mine):
            remove_offload_hooks(module)
    if hasattr(pipe, "_all_hooks"):
        pipe._all_hooks = []
    pipe.__dict__.pop(_PLACED, None)


def placed_as(pipe) -> tuple | None:
    """(rung, device) the pipeline was last placed with by `apply_offload_strategy`, if all its modules
    still carry that placement; None otherwise (never placed, or a sibling re-placed a shared module)."""
    stamp = pipe.__dict__.get(_PLACED)
    if stamp is None:
        return None
    if any(m.__dict__.get(_PLACED) != stamp for m in _modules(pipe).values()):
        return None
    return stamp[1:]


# --------------------------------------------------------------------------- applying a rung


def _block_path(module: torch.nn.Module) -> list[str]:
    """Names of the modules on the way down to the biggest ModuleList: diffusers' block-level offload only
    looks at direct children, so a T5 encoder (encoder.block) needs ["encoder"], a CLIP vision model
    (vision_model.encoder.layers) ["vision_model", "encoder"], a diffusers transformer []."""
    best, best_params = "", -1
    for name, sub in module.named_modules():
        if isinstance(sub, (torch.nn.ModuleList, torch.nn.Sequential)) and len(sub) > 1:
            n = sum(p.numel() for p in sub.parameters())
            if n > best_params:
                best, best_params = name, n
    return best.split(".")[:-1] if best else []


def _group_offload(module: torch.nn.Module, onload: torch.device, level: str) -> None:
    from diffusers.hooks import apply_group_offloading

    streams = onload.type == "cuda"  # copies on a side stream overlap compute; needs a CUDA device
    kwargs = dict(
        onload_device=onload,
        offload_device=torch.device("cpu"),
        offload_type=level,
        use_stream=streams,
        non_blocking=streams,
    )
    if level == "block_level":
        kwargs["num_blocks_per_group"] = 1  # streams require 1; prefetching keeps two blocks on the GPU
        path = _block_path(module)
        if path:
            kwargs["block_modules"] = path
    module.to("cpu")
    apply_group_offloading(module, **kwargs)


def apply_offload_strategy(pipe, strategy: Offload = "model", device: str | torch.device | None = None):
    """Apply an offload rung: "none" | "model" | "group" | "sequential" (seed 003 API).

    `device` is where computation runs (default: the best CUDA GPU, else the CPU). Idempotent; a pipeline
    placed differently before (or whose shared modules another pipeline placed) is un-hooked first.
    """
    if strategy not in OFFLOADS:
        raise ValueError(f"strategy={strategy!r} is not allowed; choose one of {OFFLOADS}")
    dev = torch.device(device) if device is not None else execution_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    stamp = (_token(pipe), strategy, str(dev))
    if placed_as(pipe) == stamp[1:]:
        logger.debug("offload %s on %s already in place", strategy, dev)
        return pipe
    remove_all_offload(pipe)
    modules = _modules(pipe)
    if strategy == "none":
        pipe.to(dev)
    elif strategy == "model":
        pipe.enable_model_cpu_offload(device=dev)
    else:
        level = "block_level" if strategy == "group" else "leaf_level"
        for name, module in modules.items():
            if name == "vae" and level == "block_level":
                module.to(dev)  # resident: see the module docstring
            else:
                _group_offload(module, dev, level)
    pipe.__dict__[_PLACED] = stamp
    for module in modules.values():
        module.__dict__[_PLACED] = stamp
    logger.info("offload %s on %s applied", strategy, dev)
    return pipe


# --------------------------------------------------------------------------- VAE tiling


def _family(vae):
    from families import family_of_vae

    try:
        return family_of_vae(vae)
    except TypeError:
        return None  # another VAE class: diffusers' own tiling with its defaults


def configure_vae_tiling(
    pipe,
    enable: bool = True,
    tile_sample_min_height: int | None = None,
    tile_sample_min_width: int | None = None,
    tile_sample_stride_height: int | None = None,
    tile_sample_stride_width: int | None = None,
):
    """Turn the VAE's tiled encode/decode on or off, with tile sizes in output pixels (seed 003 API).

    Accepts a pipeline or a VAE. The family sets the tiles (families/: for CogVideoX, overlap factors with
    which the output keeps its size, where diffusers' defaults break for many custom tile sizes; for Wan,
    a stride of 3/4 of the tile unless given).
    """
    vae = getattr(pipe, "vae", pipe)
    if not enable:
        vae.disable_tiling()
        return pipe
    family = _family(vae)
    if family is None:
        vae.enable_tiling()
        return pipe
    ratio = family.vae_spatial_ratio(vae)
    for name, value in (("tile_sample_min_height", tile_sample_min_height), ("tile_sample_min_width", tile_sample_min_width)):
        if value is not None and (value <= 0 or value % ratio):
            raise ValueError(f"{name}={value!r} is not allowed; use a positive multiple of {ratio} px (the VAE's scale)")
    family.enable_vae_tiling(
        vae, (tile_sample_min_height, tile_sample_min_width), (tile_sample_stride_height, tile_sample_stride_width)
    )
    return pipe


# --------------------------------------------------------------------------- plans


def apply_plan(pipe, plan: Plan) -> None:
    """Put the pipeline where the plan says (offload rung, device, VAE tiling). Idempotent; call before every
    run: a module shared with another cached pipeline may have been re-hooked by it."""
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("plan made for %s but no CUDA GPU is here: running on the CPU", plan.device)
        device = torch.device("cpu")
    apply_offload_strategy(pipe, plan.offload, device)
    d = plan.decode
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return
    if not d.enable_vae_tiling:
        configure_vae_tiling(pipe, False)
        return
    family = _family(vae)
    ratio = family.vae_spatial_ratio(vae) if family else 8

    def snap(px: int) -> int:  # tiles must be whole latent pixels
        return max(ratio, px // ratio * ratio)

    tile = (snap(d.tile_y), snap(d.tile_x))
    stride = (min(snap(d.tile_stride_y), tile[0]), min(snap(d.tile_stride_x), tile[1]))
    try:
        configure_vae_tiling(pipe, True, *tile, *stride)
    except ValueError as exc:  # a tile size CogVideoX cannot reassemble exactly: its defaults are safe
        logger.info("VAE tiling with the VAE's default tiles (%s)", exc)
        configure_vae_tiling(pipe, True)


apply = apply_plan  # DESIGN.md names it vram_utils.offload.apply(pipe, plan)
