"""Host RAM per stage (the second budget): which weights a host rung holds in RAM, how many bytes each takes there
(pinned copies for streamed offload, one block group in flight from disk), which of them stay memory-mapped (file
pages a memory limit reclaims: read in place) and what of those must stay resident, and the host-side activations.
vram_utils/estimate.py's `estimate` fills `Estimate.host_stages` from here; its docstring says how the rungs count.
"""
from __future__ import annotations

import math

from configs.schema import HostRung, Offload
from vram_utils.archs import ModelArch
from vram_utils.estimate import (
    CPU_RUNTIME_BYTES, DISK_GROUPS_IN_FLIGHT, MIB, ONCE_PER_RUN, PINNED_COPY_FACTOR, TRANSFORMERS, Backend,
    StageEstimate, Workload, _scaled, _tile, latent_bytes, latent_frames,
)
from vram_utils.ladder import HOST_MEASURES


def mapped_components(w: Workload) -> frozenset[str]:
    """Components whose weights stay memory-mapped in RAM: loaded in their stored dtype (`w.mapped`), except the
    transformers when quantized (int8 / fp8 / fp8 storage make anonymous copies) or streamed from disk."""
    measures = HOST_MEASURES[w.host_rung]
    if w.quant != "none" or measures.low_precision or measures.disk:
        return w.mapped - set(TRANSFORMERS)
    return w.mapped


def mapped_size(arch: ModelArch, w: Workload, sizes: dict[str, int], component: str) -> int:
    """Of a mapped component's weights, what stays memory-mapped: all but the parameters the model keeps in
    float32 (converted on load: anonymous)."""
    if component in TRANSFORMERS and w.dtype_bytes < 4:
        return max(0, sizes[component] - 4 * arch.transformer.fp32_params)
    return sizes[component]


def working_bytes(arch: ModelArch, w: Workload, sizes: dict[str, int], component: str) -> int:
    """Of a mapped component, what must stay resident while it computes: its largest layer (the one whose matrix
    product runs; the kernel may drop the pages of the others). A text encoder's embedding is read by row."""
    leaf = {"transformer": arch.transformer.largest_leaf_params, "vae": arch.vae.largest_leaf_params,
            "text_encoder": arch.text_encoder.block_leaf_params}
    params = leaf.get("transformer" if component in TRANSFORMERS else component, 0)
    return min(sizes.get(component, 0), params * w.dtype_bytes) if params else min(sizes.get(component, 0), 64 * MIB)


# --------------------------------------------------------------------------- host RAM


def held_components(sizes: dict[str, int], stage: str, host_rung: HostRung) -> set[str]:
    """Components whose weights exist in the process during `stage` under `host_rung`. Text encoder first:
    the pipeline without its transformers encodes the prompt (the runner's `_load`), then the text encoder
    goes before the transformers load."""
    m = HOST_MEASURES[host_rung]
    held = set(sizes)
    if m.release_text_encoder:
        held = held - set(TRANSFORMERS) if stage == "text" else held - {"text_encoder"}
    if m.one_expert or m.disk:  # one expert at a time (on disk: only the computing expert's groups in flight)
        held -= set(TRANSFORMERS[1:])
    return held


def streamed_transformer_bytes(arch: ModelArch, expert_bytes: int) -> int:
    """One expert streamed from disk (vram_utils/offload.py `_disk_offload`: block-level groups read from their
    files, without CUDA streams): its non-block group and the block groups in flight, in RAM or on the GPU."""
    tr = arch.transformer
    in_flight = tr.non_block_params + DISK_GROUPS_IN_FLIGHT * tr.block_params
    return _scaled(in_flight, tr.params, expert_bytes)


def placement(offload: Offload, w: Workload) -> Offload:
    """How the components that are not on disk are placed: with the disk rung, diffusers cannot mix group
    offload with model offload, so "model" places them as the group rung (vram_utils/offload.py)."""
    return "group" if (offload == "model" and HOST_MEASURES[w.host_rung].disk) else offload


def ram_factor(component: str, offload: Offload, backend: Backend) -> float:
    """RAM per weight byte of a held component: pinned copies under streamed group / leaf offload."""
    streamed = backend == "cuda" and offload in ("group", "sequential") and component not in ONCE_PER_RUN
    if not streamed or (component == "vae" and offload == "group"):  # a group rung's VAE lives on the GPU
        return 1.0
    return PINNED_COPY_FACTOR


def ram_bytes(arch: ModelArch, w: Workload, sizes: dict[str, int], component: str, offload: Offload,
              backend: Backend) -> int:
    """Bytes a held component takes in host RAM (`offload` as placed, see `placement`)."""
    if component in TRANSFORMERS and HOST_MEASURES[w.host_rung].disk:
        return streamed_transformer_bytes(arch, sizes[component])
    return int(sizes[component] * ram_factor(component, offload, backend))


# A tile's causal decoder caches, in elements per output pixel per full-resolution decoder channel: each causal
# conv keeps its input's last 2 frames; at full resolution 3 resnets x 2 convs (6 x 2 = 12 x top channels),
# the half-resolution level twice the channels on a quarter of the pixels (+ 6), the lower levels about 2 more:
# ~22. Counted from the decoder layouts (CogVideoX 128 / Wan 2.1 96 top channels: ~2,800 / ~2,100 elements per
# pixel), not measured; bench/host_ram.py measures the decode's host part on a GPU.
CAUSAL_CACHE_ELEMS_PER_TOP_CHANNEL = 22


def parked_cache_bytes(arch: ModelArch, w: Workload) -> int:
    """With tiles on a GPU, the causal caches of the tiles not being decoded wait in host RAM (decode/stream.py
    `_park`): every tile but the one decoding, from the second chunk on."""
    vae, d = arch.vae, w.decode
    th, tw = _tile(w, d.enable_vae_tiling, d.tile_y, d.tile_x)
    if (th, tw) == (w.height, w.width) or latent_frames(w.frames, vae) <= vae.chunk_latent_frames:
        return 0
    tiles = _tiles_along(w.height, th, d.tile_stride_y) * _tiles_along(w.width, tw, d.tile_stride_x)
    per_px = CAUSAL_CACHE_ELEMS_PER_TOP_CHANNEL * vae.top_channels
    return int((tiles - 1) * per_px * th * tw * w.dtype_bytes)


def _tiles_along(frame: int, tile: int, stride: int) -> int:
    return 1 if tile >= frame else math.ceil((frame - tile) / max(1, stride)) + 1


def host_stages(arch: ModelArch, w: Workload, offload: Offload, sizes: dict[str, int],
                names: tuple[str, ...]) -> tuple[StageEstimate, ...]:
    """Host RAM per stage on the CUDA backend (module docstring): weights held + host-side activations."""
    held_before: set[str] = set()
    out = []
    mapped = mapped_components(w)
    for name in names:
        held = held_components(sizes, name, w.host_rung)
        mapped_bytes = working = 0
        if offload == "none":  # weights pass through RAM in the stage that loads them, then live on the GPU
            loaded = held - held_before
            weights = sum(ram_bytes(arch, w, sizes, c, offload, "cuda") for c in loaded)
            if name == "denoise" and "transformer" in held and HOST_MEASURES[w.host_rung].one_expert:
                weights = max(weights, ram_bytes(arch, w, sizes, "transformer", offload, "cuda"))  # the switch
            # mapped weights pass through as file pages, copied to the GPU one tensor at a time
            mapped_bytes = min(weights, sum(mapped_size(arch, w, sizes, c) for c in loaded & mapped))
            working = max((working_bytes(arch, w, sizes, c) for c in loaded & mapped), default=0)
        else:  # offloaded weights rest in RAM as copies (pinned for streams): anonymous
            weights = sum(ram_bytes(arch, w, sizes, c, offload, "cuda") for c in held)
        held_before = held
        act = CPU_RUNTIME_BYTES
        if name == "encode":  # the input frames, read as uint8
            act += w.frames * 3 * w.height * w.width
        if name == "decode":  # decoded uint8 frames, the float32 latents saved to disk, parked tile caches
            act += w.frames * 3 * w.height * w.width + latent_bytes(arch, w) + parked_cache_bytes(arch, w)
        out.append(StageEstimate(name, weights, act, mapped_bytes, working))
    return tuple(out)
