"""Put a pipeline where a plan says: an offload rung and VAE tiling, on top of diffusers.

Rungs (DESIGN.md, fastest first):
  none        every module on the execution device
  model       `enable_model_cpu_offload` (whole components move in and out)
  group       block-level group offloading with CUDA streams (copies overlap compute); the VAE
              stays resident: it is small, and a CogVideoX VAE would be a single group whose hook
              only fires through forward(), which decode() never calls
  sequential  leaf-level group offloading with CUDA streams (the smallest footprint)

The host-RAM disk rung (`plan.disk_offload`) sits on top of any of them: the transformer (and
`transformer_2`) is group-offloaded block by block to safetensors files under
`$FITVIDEO_HOME/offload/<weights key>` (diffusers' `offload_to_disk_path`), so host RAM holds one block at a
time instead of the whole model. A later run with the same weights reuses the files. How it composes with
the plan's GPU rung for the other components (diffusers cannot mix group offload with model offload):
  none + disk        the other components resident on the execution device
  model + disk       the other components group-offloaded block by block in RAM (as the group rung)
  group + disk       the other components as the group rung (VAE resident)
  sequential + disk  the other components leaf-level; the transformers stay block-level from disk
Disk groups onload without CUDA streams: the read from disk, not the copy, sets their pace.

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

import hashlib
import itertools
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch

from configs.paths import fitvideo_home
from configs.schema import OFFLOADS, Offload, Plan, RequestError
from families import DENOISERS
from vram_utils.sizes import module_bytes

logger = logging.getLogger(__name__)

_PLACED = "_fitvideo_placed"  # (pipeline token, rung, device) stamped on each module we placed
_DISK = "_fitvideo_disk"  # the folder the disk rung streams a module from
_TOKEN = "_fitvideo_token"  # a per-pipeline number: unlike id(), never reused by a later pipeline
_TOKENS = itertools.count(1)
# diffusers registers group offloading as these named hooks (diffusers.hooks.group_offloading)
_GROUP_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
DISK_COMPONENTS = DENOISERS  # what the disk rung streams from disk: the transformers
# Free space the disk rung asks for beyond the weights' bytes: 5 % (safetensors headers are tiny, the rest is
# slack for a filesystem's block rounding) and 1 GiB left over for the outputs and the OS.
DISK_MARGIN = 1.05
DISK_RESERVE_BYTES = 1 << 30
_DISK_DONE = "fitvideo-offload.json"  # written once every group file is complete; without it a folder is redone


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

        _restore_disk_weights(module)
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


# Encoders run once per prompt / image: streams would buy them little speed and cost a pinned copy of all their
# weights in host RAM (2x: 21 GiB for UMT5-XXL), so they are group-offloaded without streams (1x).
ONCE_PER_RUN = ("text_encoder", "image_encoder")


def _group_offload(module: torch.nn.Module, onload: torch.device, level: str, streams: bool) -> None:
    """Group offloading; `streams` copies on a side stream to overlap compute (a CUDA device only)."""
    from diffusers.hooks import apply_group_offloading

    streams = streams and onload.type == "cuda"
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


def apply_offload_strategy(
    pipe, strategy: Offload = "model", device: str | torch.device | None = None, disk_offload: bool = False
):
    """Apply an offload rung: "none" | "model" | "group" | "sequential" (seed 003 API), and with
    `disk_offload` the host-RAM disk rung on top (see the module docstring for how they compose).

    `device` is where computation runs (default: the best CUDA GPU, else the CPU). Idempotent; a pipeline
    placed differently before (or whose shared modules another pipeline placed) is un-hooked first.
    Raises RequestError before anything moves when the disk has too little room for the weights.
    """
    if strategy not in OFFLOADS:
        raise ValueError(f"strategy={strategy!r} is not allowed; choose one of {OFFLOADS}")
    dev = torch.device(device) if device is not None else execution_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    rung = f"{strategy}+disk" if disk_offload else strategy
    stamp = (_token(pipe), rung, str(dev))
    if placed_as(pipe) == stamp[1:]:
        logger.debug("offload %s on %s already in place", rung, dev)
        return pipe
    remove_all_offload(pipe)
    modules = _modules(pipe)
    disk = {n: m for n, m in modules.items() if n in DISK_COMPONENTS} if disk_offload else {}
    folders = {name: prepare_disk_folder(module, name) for name, module in disk.items()}  # refuses when short
    if strategy == "none" and not disk:
        pipe.to(dev)
    elif strategy == "model" and not disk:
        pipe.enable_model_cpu_offload(device=dev)
    else:
        _place_modules(modules, dev, strategy, folders)
    _stamp(pipe, modules, stamp)
    logger.info("offload %s on %s applied%s", rung, dev, "".join(f"; {n} from {f}" for n, f in folders.items()))
    return pipe


def place_apart(pipe, device: torch.device, encoder_device: torch.device) -> None:
    """Components across GPUs (the planner's `encoder_device`): the text encoder on `encoder_device`, everything else
    resident on `device`, each moved once (never all onto `device` first). The runner encodes the prompt there and
    hands the embeddings over (engine/runner.py)."""
    stamp = (_token(pipe), f"none+text-encoder@{encoder_device}", str(device))
    if placed_as(pipe) == stamp[1:]:
        return
    remove_all_offload(pipe)
    modules = _modules(pipe)
    for name, module in modules.items():
        module.to(encoder_device if name == "text_encoder" else device)
    _stamp(pipe, modules, stamp)
    logger.info("text encoder on %s, the rest on %s", encoder_device, device)


def _stamp(pipe, modules: dict[str, torch.nn.Module], stamp: tuple) -> None:
    """Mark the pipeline and its modules as placed (`placed_as` reads it: an unchanged placement is not redone)."""
    pipe.__dict__[_PLACED] = stamp
    for module in modules.values():
        module.__dict__[_PLACED] = stamp


def _place_modules(modules: dict[str, torch.nn.Module], dev: torch.device, strategy: str, folders: dict) -> None:
    """Module by module: the disk components from their folders, the others by the rung ("model" becomes
    block-level groups in RAM: diffusers refuses model offload on a pipeline holding a group-offloaded module)."""
    level = "leaf_level" if strategy == "sequential" else "block_level"
    for name, module in modules.items():
        if name in folders:
            _disk_offload(module, dev, folders[name])
        elif strategy == "none" or (name == "vae" and level == "block_level"):
            module.to(dev)  # resident: see the module docstring
        else:
            _group_offload(module, dev, level, streams=name not in ONCE_PER_RUN)


# --------------------------------------------------------------------------- the disk rung


def offload_root() -> Path:
    """Where the disk rung keeps weight files: $FITVIDEO_HOME/offload."""
    return fitvideo_home() / "offload"


def disk_key(module: torch.nn.Module, component: str) -> str:
    """A folder name that changes whenever the weights do: the model's source, the component, its storage
    dtypes and quantization, and a hash of the names, shapes and a sample of the values of every tensor.
    diffusers reuses any group file already present, so a key shared by different weights would load the
    wrong ones."""
    source = str(getattr(getattr(module, "config", None), "get", lambda *_: None)("_name_or_path") or "")
    tensors = dict(module.state_dict(keep_vars=True))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    quant = "fp8-storage" if any("float8" in d for d in dtypes) else "none"
    digest = hashlib.sha256(f"{type(module).__name__}|{source}|{component}".encode())
    for name, t in tensors.items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    for t in tensors.values():  # the first and last 64 values of every tensor: a fused LoRA changes them all
        if t.device.type != "meta" and t.numel():
            flat = t.detach().reshape(-1)
            sample = torch.cat([flat[:64], flat[-64:]]).cpu().contiguous()
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name or type(module).__name__)[-60:]
    counts = {d: sum(t.numel() for t in tensors.values() if str(t.dtype).removeprefix("torch.") == d) for d in dtypes}
    main_dtype = max(counts, key=counts.get)
    return f"{base}-{component}-{main_dtype}-{quant}-{digest.hexdigest()[:12]}"


def check_disk_space(folder: Path, needed_bytes: int) -> None:
    """Refuse (RequestError naming the folder, the bytes needed and free) when the disk holding `folder`
    has less than `needed_bytes` * DISK_MARGIN + DISK_RESERVE_BYTES free."""
    probe_at = folder
    while not probe_at.exists() and probe_at != probe_at.parent:
        probe_at = probe_at.parent
    free = shutil.disk_usage(probe_at).free
    want = int(needed_bytes * DISK_MARGIN) + DISK_RESERVE_BYTES
    if free < want:
        raise RequestError(
            f"weights streamed from disk need {want / 2**30:.2f} GiB free in {folder} "
            f"({needed_bytes / 2**30:.2f} GiB of weights + 5% + 1 GiB kept free); that disk has "
            f"{free / 2**30:.2f} GiB free. Free space there or point FITVIDEO_HOME at a disk with more room"
        )


def prepare_disk_folder(module: torch.nn.Module, component: str) -> Path:
    """The folder the disk rung will stream `module` from, checked before anything is written: a complete
    folder from an earlier run is reused; an incomplete one (a run stopped while writing) is cleared."""
    if any(_is_torchao(t) for t in module.parameters()):
        raise RequestError(
            f"{component} is quantized with torchao (int8 / fp8), which diffusers cannot write to disk; "
            "weights streamed from disk allow quant 'none' or 'fp8-storage'"
        )
    folder = offload_root() / disk_key(module, component)
    if (folder / _DISK_DONE).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    check_disk_space(folder, module_bytes(module))
    return folder


def _is_torchao(t: torch.Tensor) -> bool:
    return type(t).__module__.startswith("torchao") or type(getattr(t, "data", t)).__module__.startswith("torchao")


def _disk_offload(module: torch.nn.Module, onload: torch.device, folder: Path) -> None:
    """Block-level groups whose weights live in `folder`: applying writes each group's file (skipped for files
    already there) and leaves only untouched placeholders in RAM; each forward reads a block, then drops it."""
    from diffusers.hooks import apply_group_offloading

    folder.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        onload_device=onload,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        offload_to_disk_path=str(folder),
    )
    path = _block_path(module)
    if path:
        kwargs["block_modules"] = path
    apply_group_offloading(module, **kwargs)  # reads each tensor where it lies: no second copy in RAM
    done = folder / _DISK_DONE
    if not done.is_file():
        files = sorted(folder.glob("group_*.safetensors"))
        done.write_text(json.dumps({"files": len(files), "bytes": sum(f.stat().st_size for f in files)}))
    module.__dict__[_DISK] = str(folder)


def _disk_groups(module: torch.nn.Module) -> list:
    """diffusers' ModuleGroups under `module` whose weights live on disk, each once."""
    groups: dict[int, object] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        group = getattr(hook, "group", None)
        if group is not None and group.offload_to_disk_path:
            groups.setdefault(id(group), group)
    return list(groups.values())


def _restore_disk_weights(module: torch.nn.Module) -> None:
    """Before the disk hooks go: put the weights back from their files (memory-mapped: the pages are read
    when used). Without this the module would keep the placeholders the disk rung left in RAM."""
    import safetensors.torch

    for group in _disk_groups(module):
        loaded = safetensors.torch.load_file(group.safetensors_file_path, device="cpu")
        for key, tensor in group.key_to_tensor.items():
            tensor.data = loaded[key]
    module.__dict__.pop(_DISK, None)


def disk_folder_of(module: torch.nn.Module) -> Path | None:
    """The folder a module is streamed from by the disk rung, or None."""
    folder = module.__dict__.get(_DISK)
    return Path(folder) if folder else None


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
    if plan.encoder_device and plan.offload == "none" and not plan.disk_offload:
        place_apart(pipe, device, torch.device(plan.encoder_device if device.type == "cuda" else device))
    else:
        apply_offload_strategy(pipe, plan.offload, device, disk_offload=plan.disk_offload)
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
