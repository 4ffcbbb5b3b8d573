"""Pure memory estimator: sizes and shapes in, predicted peak bytes per stage out.

No torch, no device access: an estimate is arithmetic on the architecture
numbers in `archs.py` and the request's shapes, so it runs (and is tested)
anywhere. Bytes everywhere; GiB only where a reason is written for a person.

A run goes through stages (text encoding, image encoding for Wan I2V, VAE
encoding for I2V / V2V, denoising, VAE decoding). The peak on the device that
computes is, per stage, the weights resident there during that stage plus the
stage's live activations plus what persists across stages (latents, prompt
embeddings); the run's peak is the largest stage. Which weights are resident in
a stage is what the offload rung changes:

  none        every component, all the time
  model       the component computing (diffusers' model offload chain also leaves the
              text encoder on the GPU through a VAE encode, and the VAE through denoising
              once it has encoded)
  group       block level with CUDA streams: what lies outside the repeated blocks plus two
              blocks (the one computing and the one being prefetched); the VAE stays resident
  sequential  leaf level with CUDA streams: the layer computing and the one prefetched (two of the
              largest; for a text encoder its embedding and an FF projection)

A two-expert model (Wan 2.2 A14B) has `transformer` and `transformer_2`, one computing at a time: model
offload (diffusers' `model_cpu_offload_seq` "text_encoder->transformer->transformer_2->vae") and group /
sequential offload put one expert's weights on the GPU; "none" puts both there.

Host RAM, the second budget (`Estimate.host_stages`, per stage, above the process baseline). Which weights
exist in the process during a stage is what the host rung (vram_utils/ladder.py) changes: "ram" loads every
component before the first stage; "text-encoder-first" holds the text encoder (and the VAE) for the text
stage and frees it before the transformers load (the peak is the larger of the two, not their sum);
"one-expert" holds one expert at a time (the first is freed before the second loads at the switch);
"low-precision" stores the transformer weights at one byte (fp8 storage, `quant`); "disk" streams the
transformers' block groups from files (only the groups in flight are in RAM, read without CUDA streams; the
files' page cache is reclaimable and not counted). The disk rung assumes an expert reaches its files without
being materialised whole in RAM (vram_utils/offload.py's loader); loaded whole first, its load would add one
expert's bytes. How many bytes a held component takes in RAM is what the offload rung changes on CUDA:

  none        weights pass through RAM when loaded (from_pretrained), then live on the GPU: counted in the
              stage that loads them
  model       every component stays in RAM all run (the one on the GPU moved, not copied; at load they all
              are in RAM)
  group,      `PINNED_COPY_FACTOR` x the offloaded components (all but a group rung's VAE): see there
  sequential
With the disk rung, "model" places the other components as "group" (diffusers cannot mix the two).
Host-side activations: the input frames (encode), the decoded uint8 frames, the float32 latents saved to
disk and, with tiles on a GPU, the parked causal caches of the tiles not decoding (decode).
On the CPU backend host RAM is the computing device: the host stages are the device stages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from configs.schema import DecodeSettings, GenerationRequest, HostRung, ModelSpec, Offload, Quant
from configs.registry import load_presets
from families import DENOISERS
from vram_utils.archs import ModelArch, TransformerArch, VaeArch
from vram_utils.ladder import HOST_MEASURES, OFFLOAD_RUNGS

Backend = Literal["cuda", "cpu"]
LADDER: tuple[Offload, ...] = OFFLOAD_RUNGS  # fastest first (vram_utils/ladder.py owns the rungs)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIB = 2**20
GIB = 2**30

# Host RSS above the live-tensor peak on the CPU (oneDNN scratch buffers, allocator bookkeeping):
# 20-32 MB in the calibration runs of bench/plan_accuracy.py.
CPU_RUNTIME_BYTES = 24 * MIB
# cuBLAS / cuDNN workspaces come from the caching allocator and count in max_memory_allocated.
# Not yet measured here (no GPU on the development machine); bench/plan_accuracy.py checks it on CUDA.
CUDA_WORKSPACE_BYTES = 64 * MIB
# Linear weights are ~98% of a video transformer's parameters; quantization stores them in one byte
# while norms, biases and embeddings keep the compute dtype.
QUANTIZED_FRACTION = 0.98
# Group / sequential offload with CUDA streams: diffusers' docs (Memory optimization, group offloading,
# `use_stream`) say to "ensure you have 2x the amount of memory as the model size". Why: apply_group_offloading
# pins a CPU copy of every parameter (`_init_cpu_param_dict`: `param.data.cpu().pin_memory()`) while the loaded
# copy stays referenced until the group's first onload, and PyTorch's pinned-memory allocator rounds each block
# up to a power of two. We count 2x for the whole run (not measured here: no GPU; bench/host_ram.py checks it).
PINNED_COPY_FACTOR = 2.0
# The disk rung: the block group computing is read back from its file (plus the expert's non-block group),
# without CUDA streams (vram_utils/offload.py `_disk_offload`), so nothing is read ahead: one group in flight.
# Measured (bench/host_ram.py, a 4-block Wan-14B-width stack on the CPU, files reused): 1.25 GiB peak RSS,
# 1.12 GiB predicted with one group (0.90), 1.78 GiB with two (1.42).
DISK_GROUPS_IN_FLIGHT = 1
TRANSFORMERS = DENOISERS  # the experts take turns: the first is the high-noise one, the others follow it
# Group-offloaded without streams (vram_utils/offload.py ONCE_PER_RUN): no pinned copy.
ONCE_PER_RUN = ("text_encoder", "image_encoder")


@dataclass(frozen=True)
class Workload:
    """What one run computes (resolved shapes, no defaults left open)."""

    task: str
    frames: int
    height: int
    width: int
    cfg: bool  # classifier-free guidance (guidance > 1): CogVideoX doubles its batch
    dtype_bytes: int
    quant: Quant = "none"
    decode: DecodeSettings = DecodeSettings()
    host_rung: HostRung = "ram"  # what is held in host RAM (vram_utils/ladder.py HOST_MEASURES)
    step_cache: str = "off"  # the run's step cache: it keeps hidden-state tensors between steps (STEP_CACHE_TENSORS)
    # components whose weights load memory-mapped from safetensors files (stored in the dtype they load in):
    # file-backed pages, not anonymous memory (see `mapped_components`)
    mapped: frozenset[str] = frozenset()
    # processes sharing the denoise (context parallel, engine/parallel.py): each holds all the weights and its
    # share of the tokens' activations (Ulysses: 1/N of the sequence, then all of it over 1/N of the heads)
    parallel: int = 1
    # the text encoder on a second GPU (a box with two or more, offload none): the main GPU never holds it
    encoder_apart: bool = False

    def replace(self, **changes) -> "Workload":
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StageEstimate:
    name: str
    weights_bytes: int  # weights resident on the computing device during the stage
    activation_bytes: int  # live activations of the stage, persistent tensors included
    # Host RAM only: of `weights_bytes`, the memory-mapped part (file pages the kernel can drop and read again), and
    # of that the part that must stay resident while the stage computes (the layer computing)
    mapped_bytes: int = 0
    working_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """What the stage holds when nothing is dropped (the process's RSS above its baseline, uncapped)."""
        return self.weights_bytes + self.activation_bytes

    @property
    def anon_bytes(self) -> int:
        """What no memory limit can reclaim: everything but the mapped weights."""
        return self.peak_bytes - self.mapped_bytes

    def need_bytes(self, in_place: bool) -> int:
        """What must fit the budget: everything, or (weights read in place) anonymous + the layer computing."""
        return self.anon_bytes + self.working_bytes if in_place else self.peak_bytes


@dataclass(frozen=True)
class Estimate:
    offload: Offload
    backend: Backend
    stages: tuple[StageEstimate, ...]
    component_bytes: dict[str, int] = field(default_factory=dict)
    # host RAM per stage (weights held in RAM + host-side activations); on the CPU backend equal to `stages`
    host_stages: tuple[StageEstimate, ...] = ()
    host_rung: HostRung = "ram"

    @property
    def peak_device_bytes(self) -> int:
        """Peak on the device that computes: the GPU, or host RAM on the CPU backend."""
        return max(s.peak_bytes for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.peak_bytes).name

    @property
    def peak_gpu_bytes(self) -> int:
        return self.peak_device_bytes if self.backend == "cuda" else 0

    @property
    def weights_total_bytes(self) -> int:
        return sum(self.component_bytes.values())

    @property
    def peak_host_bytes(self) -> int:
        """Host RAM above the process baseline at its largest stage (see the module docstring)."""
        if self.backend == "cpu" or not self.host_stages:
            return self.peak_device_bytes
        return max(s.peak_bytes for s in self.host_stages)

    @property
    def peak_host_stage(self) -> str:
        stages = self.host_stages if self.backend == "cuda" and self.host_stages else self.stages
        return max(stages, key=lambda s: s.peak_bytes).name

    @property
    def _host(self) -> tuple[StageEstimate, ...]:
        return self.host_stages if self.backend == "cuda" and self.host_stages else self.stages

    @property
    def host_need_bytes(self) -> int:
        """Host RAM the budget must hold: the peak, or on the in-place rung anonymous memory + the layer computing
        (mapped weights beyond that are dropped and read again)."""
        in_place = HOST_MEASURES[self.host_rung].in_place
        return max(s.need_bytes(in_place) for s in self._host)

    @property
    def peak_host_anon_bytes(self) -> int:
        """Anonymous host RAM at its largest stage: what a memory limit cannot take back."""
        return max(s.anon_bytes for s in self._host)

    @property
    def peak_host_mapped_bytes(self) -> int:
        return max(s.mapped_bytes for s in self._host)

    def stage_dict(self) -> dict[str, int]:
        return {s.name: s.peak_bytes for s in self.stages}

    def host_stage_dict(self) -> dict[str, int]:
        stages = self.host_stages if self.backend == "cuda" and self.host_stages else self.stages
        return {s.name: s.peak_bytes for s in stages}


# --------------------------------------------------------------------------- shapes


def latent_frames(frames: int, vae: VaeArch) -> int:
    return (frames - 1) // vae.temporal_ratio + 1


def video_tokens(w: Workload, arch: ModelArch) -> int:
    """Tokens of the latent video the transformer attends over."""
    tr, vae = arch.transformer, arch.vae
    t = math.ceil(latent_frames(w.frames, vae) / tr.patch_t)
    h = w.height // vae.spatial_ratio // tr.patch_hw
    wd = w.width // vae.spatial_ratio // tr.patch_hw
    return t * h * wd


# Hidden-state tensors (tokens x width, compute dtype) a step cache keeps between steps, per guidance branch:
# (fixed, per transformer block). diffusers' hooks: first-block keeps the first block's residual and the last
# hidden states, MagCache one residual, TaylorSeer (lite) the output projection's input and its first
# difference; PAB one attention output per block, FasterCache two (cond, uncond) per block.
STEP_CACHE_TENSORS = {"off": (0, 0), "first-block": (2, 0), "magcache": (1, 0), "taylorseer": (2, 0),
                      "pab": (0, 1), "fastercache": (0, 2)}


def step_cache_bytes(arch: ModelArch, w: Workload) -> int:
    """What the run's step cache keeps in memory while it denoises (0 without one)."""
    fixed, per_block = STEP_CACHE_TENSORS.get(w.step_cache, (0, 0))
    tr = arch.transformer
    branches = 2 if w.cfg else 1
    tokens = video_tokens(w, arch) + tr.joint_text_tokens
    return (fixed + per_block * tr.layers) * branches * tokens * tr.dim * w.dtype_bytes


def workload_for(request: GenerationRequest, spec: ModelSpec) -> Workload:
    """The request's shapes with the model's and preset's defaults filled in (no validation here)."""
    h0, w0 = spec.default_resolution
    guidance = request.guidance
    if guidance is None:
        guidance = load_presets()[request.preset].guidance
    return Workload(
        task=request.task,
        frames=request.frames or spec.default_frames,
        height=request.height or h0,
        width=request.width or w0,
        cfg=guidance > 1.0,
        dtype_bytes=DTYPE_BYTES[spec.default_dtype],
        quant=request.quant,
        decode=request.decode,
        step_cache=(request.step_cache or load_presets()[request.preset].step_cache).split(":")[0],
        mapped=frozenset(c for c in spec.params if spec.stored_dtypes.get(c, spec.default_dtype) == spec.default_dtype),
        parallel=request.context_parallel,
    )


# --------------------------------------------------------------------------- component sizes


def transformer_weight_bytes(params: int, dtype_bytes: int, quant: Quant) -> int:
    if quant == "none":
        return params * dtype_bytes
    # int8 / fp8 / fp8 storage: one byte per quantized weight (+ per-channel scales, negligible)
    return int(params * QUANTIZED_FRACTION + params * (1 - QUANTIZED_FRACTION) * dtype_bytes)


def component_bytes(arch: ModelArch, w: Workload) -> dict[str, int]:
    """Weight bytes per component; a two-expert model has `transformer` and `transformer_2`, equal in size."""
    b = w.dtype_bytes
    fp32 = arch.transformer.fp32_params if b < 4 else 0  # kept in float32 whatever the dtype (family's arch)
    sizes = {
        "text_encoder": arch.text_encoder.params * b,
        "transformer": transformer_weight_bytes(arch.transformer.params - fp32, b, w.quant) + 4 * fp32,
        "vae": arch.vae.params * b,
    }
    for later in TRANSFORMERS[1:arch.experts]:  # each further expert has the first one's architecture
        sizes[later] = sizes["transformer"]
    if arch.image_encoder_params and w.task == "i2v":
        sizes["image_encoder"] = arch.image_encoder_params * b
    return sizes


def _scaled(params_part: int, params_all: int, bytes_all: int) -> int:
    return int(bytes_all * params_part / max(1, params_all))


def resident_bytes(arch: ModelArch, w: Workload, offload: Offload, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes of each component on the device while that component computes, under `offload`."""
    if offload in ("none", "model"):
        return dict(sizes)
    tr, te, vae = arch.transformer, arch.text_encoder, arch.vae
    out = {}
    if offload == "group":  # non-block part + the block computing + the block prefetched
        out["transformer"] = _scaled(tr.non_block_params + 2 * tr.block_params, tr.params, sizes["transformer"])
        out["text_encoder"] = _scaled(te.non_block_params + 2 * te.block_params, te.params, sizes["text_encoder"])
        out["vae"] = sizes["vae"]  # resident all run long (see offload.py: small, and decode() bypasses forward hooks)
    else:  # sequential: leaf level, the layer computing + the layer prefetched
        out["transformer"] = _scaled(2 * tr.largest_leaf_params, tr.params, sizes["transformer"])
        # the embedding (the largest layer, used first) and the FF projection prefetched after it
        out["text_encoder"] = _scaled(te.largest_leaf_params + te.block_leaf_params, te.params, sizes["text_encoder"])
        out["vae"] = _scaled(2 * vae.largest_leaf_params, vae.params, sizes["vae"])
    for later in (c for c in TRANSFORMERS[1:] if c in sizes):
        out[later] = out["transformer"]
    if "image_encoder" in sizes:
        out["image_encoder"] = sizes["image_encoder"] if offload == "group" else min(sizes["image_encoder"], 64 * MIB)
    return out


# --------------------------------------------------------------------------- activations


def text_activation_bytes(arch: ModelArch, w: Workload) -> int:
    """One prompt through the T5/UMT5 encoder (the negative prompt runs as a second call, not a batch)."""
    te = arch.text_encoder
    s, b = te.seq_len, w.dtype_bytes
    hidden = s * (6 * te.dim + 3 * te.ff_dim) * b  # residual, norm, q/k/v/out; gated FF keeps 3 x ff alive
    scores = 2 * te.heads * s * s * 4  # eager attention: fp32 scores and their softmax
    return hidden + scores


def prompt_embedding_bytes(arch: ModelArch, w: Workload) -> int:
    """Prompt (and negative prompt) embeddings kept through denoising."""
    return (2 if w.cfg else 1) * arch.text_encoder.seq_len * arch.text_encoder.dim * w.dtype_bytes


def latent_bytes(arch: ModelArch, w: Workload) -> int:
    vae = arch.vae
    return (
        vae.latent_channels
        * latent_frames(w.frames, vae)
        * (w.height // vae.spatial_ratio)
        * (w.width // vae.spatial_ratio)
        * 4  # the schedulers keep latents in float32
    )


def denoise_activation_bytes(arch: ModelArch, w: Workload) -> int:
    """Peak live activations of one transformer forward: the widest point of a block (the FF input and
    its GELU output alive together) over every token of the batch. Attention runs through SDPA's
    flash / memory-efficient kernels, linear in tokens (no tokens x tokens matrix)."""
    tr: TransformerArch = arch.transformer
    batch = 2 if (w.cfg and tr.cfg_in_batch) else 1
    tokens = -(-video_tokens(w, arch) // w.parallel) + tr.joint_text_tokens  # this process's share
    per_token = tr.act_elems_per_dim * tr.dim + 2 * tr.ff_dim
    act = int(batch * tokens * per_token * w.dtype_bytes)
    if w.quant != "none":  # a quantized layer is dequantized / upcast to the compute dtype while it runs
        act += tr.largest_leaf_params * w.dtype_bytes
    # latents, noise predictions (cond + uncond) and the scheduler's copies; a step cache's kept tensors
    return act + 4 * latent_bytes(arch, w) + step_cache_bytes(arch, w)


# ATen runs a float32 conv3d on the CPU with its slow im2col kernel up to this input size, with oneDNN above
# (checked with torch._C._select_conv_backend: 8 x 10 x 256 x 256 -> Slow3d, 8 x 11 x 256 x 256 -> Mkldnn).
SLOW_CONV3D_MAX_NUMEL = 5 * 2**20


def _cpu_extra_per_px(vae: VaeArch, w: Workload, th: int, tw: int, chunk_frames: int) -> float:
    extra = vae.cpu_extra_elems_per_px
    # the widest conv input: the top channels over the chunk's frames plus the 2 cached / padded ones
    if w.dtype_bytes == 4 and vae.top_channels * (chunk_frames + 2) * th * tw <= SLOW_CONV3D_MAX_NUMEL:
        extra += vae.cpu_im2col_elems_per_px
    return extra


def _tile(w: Workload, tiling: bool, tile_y: int, tile_x: int) -> tuple[int, int]:
    if tiling and (w.height > tile_y or w.width > tile_x):
        return min(w.height, tile_y), min(w.width, tile_x)
    return w.height, w.width


def decode_activation_bytes(arch: ModelArch, w: Workload, backend: Backend = "cuda") -> int:
    """VAE decode: the peak chunk of one tile (the whole frame without tiling), plus the decoded video the
    decoder accumulates (torch.cat keeps old and new alive: 2x) and, with tiling, the tiles' outputs."""
    vae, d, b = arch.vae, w.decode, w.dtype_bytes
    th, tw = _tile(w, d.enable_vae_tiling, d.tile_y, d.tile_x)
    n_lat = latent_frames(w.frames, vae)
    if n_lat == 1:
        per_px, chunk_frames = vae.decode_elems_per_px_one_frame, 1
    elif n_lat <= vae.chunk_latent_frames:
        per_px, chunk_frames = vae.decode_elems_per_px_single_chunk, w.frames
    else:
        per_px, chunk_frames = vae.decode_elems_per_px, vae.steady_chunk_frames
        if d.chunk_frames > vae.chunk_latent_frames:  # a longer causal chunk holds proportionally more frames
            per_px *= d.chunk_frames / vae.chunk_latent_frames
    if backend == "cpu":
        per_px += _cpu_extra_per_px(vae, w, th, tw, chunk_frames)
    chunk = int(per_px * th * tw * b)
    video = w.frames * 3 * w.height * w.width * b
    held = 2 * video
    if (th, tw) != (w.height, w.width):
        overlap = (d.tile_y / max(1, d.tile_stride_y)) * (d.tile_x / max(1, d.tile_stride_x))
        held += int(video * overlap)
    return chunk + held + latent_bytes(arch, w)


def encode_activation_bytes(arch: ModelArch, w: Workload, backend: Backend = "cuda") -> int:
    """VAE encode of the conditioning input: the image for CogVideoX I2V, the whole video for V2V and for
    Wan I2V (which encodes the image followed by zero frames)."""
    vae, b = arch.vae, w.dtype_bytes
    frames_in = 1 if (w.task == "i2v" and arch.transformer.joint_text_tokens) else w.frames
    d = w.decode
    th, tw = _tile(w, d.enable_vae_tiling, d.tile_y, d.tile_x)
    per_px = vae.encode_elems_per_px if frames_in > 1 else vae.decode_elems_per_px_one_frame
    if backend == "cpu":
        per_px += _cpu_extra_per_px(vae, w, th, tw, min(frames_in, vae.steady_chunk_frames))
    video_in = frames_in * 3 * w.height * w.width * b
    return int(per_px * th * tw * b) + 2 * video_in + latent_bytes(arch, w)


def image_encoder_activation_bytes(arch: ModelArch, w: Workload) -> int:
    # CLIP ViT-H/14 on one 224x224 image: 257 tokens x 1280 wide; tiny next to its weights
    return 257 * (6 * 1280 + 2 * 5120) * w.dtype_bytes if arch.image_encoder_params else 0


# --------------------------------------------------------------------------- the estimate


def estimate(arch: ModelArch, w: Workload, offload: Offload = "none", backend: Backend = "cuda") -> Estimate:
    """Predicted peak bytes per stage for `w` under `offload` on `backend`, on the computing device and in
    host RAM (`w.host_rung` says what RAM holds).

    On the CPU backend everything lives in host RAM and offload moves nothing, so
    every rung reads as "none" and the stages add the CPU runtime's own scratch.
    """
    from vram_utils.host_estimate import (  # here: host_estimate builds on this module
        held_components, host_stages, mapped_components, mapped_size, placement, ram_bytes,
        streamed_transformer_bytes, working_bytes,
    )

    sizes = component_bytes(arch, w)
    asked: Offload = offload if backend == "cuda" else "none"
    rung = placement(asked, w)
    res = resident_bytes(arch, w, rung, sizes)
    if HOST_MEASURES[w.host_rung].disk:  # the experts' block groups come from disk, one computing at a time
        res.update({c: streamed_transformer_bytes(arch, sizes[c]) for c in TRANSFORMERS if c in sizes})
    embeds = prompt_embedding_bytes(arch, w)
    encodes = w.task in ("i2v", "v2v")
    extra = CUDA_WORKSPACE_BYTES if backend == "cuda" else CPU_RUNTIME_BYTES

    def on_device(stage: str, *names: str) -> int:
        if rung == "none":  # everything this stage holds (both experts unless one at a time)
            held = held_components(sizes, stage, w.host_rung) - ({"text_encoder"} if w.encoder_apart else set())
            return sum(ram_bytes(arch, w, sizes, c, rung, backend) for c in held)
        if rung == "group":  # the VAE is resident throughout
            names = tuple(set(names) | {"vae"})
        return sum(res.get(n, 0) for n in names)  # "transformer": one expert computes at a time

    def stage(name: str, names: tuple[str, ...], activations: int) -> StageEstimate:
        """On the CPU the device is host RAM: the held weights loaded mapped stay file pages, read in place."""
        weights = on_device(name, *names)
        if backend == "cuda":
            return StageEstimate(name, weights, activations)
        held = held_components(sizes, name, w.host_rung) & mapped_components(w)
        return StageEstimate(name, weights, activations, min(weights, sum(mapped_size(arch, w, sizes, c) for c in held)),
                             max((working_bytes(arch, w, sizes, c) for c in held & set(names)), default=0))

    # the text encoder apart: it computes on the second GPU (`apart_peak_bytes`); the main one only holds the rest
    stages = [stage("text", ("text_encoder",), extra if w.encoder_apart else text_activation_bytes(arch, w) + extra)]
    if "image_encoder" in sizes:
        stages.append(stage("image", ("image_encoder",), image_encoder_activation_bytes(arch, w) + embeds + extra))
    if encodes:
        # model offload: the VAE's hook only offloads the transformer before it, so the encoder that ran
        # last (text or image) is still on the GPU while the VAE encodes
        before = "image_encoder" if "image_encoder" in sizes else "text_encoder"
        names = ("vae", before) if rung == "model" else ("vae",)
        stages.append(stage("encode", names, encode_activation_bytes(arch, w, backend) + embeds + extra))
    # model offload: the VAE stays on the GPU through denoising once it has encoded
    names = ("transformer", "vae") if (rung == "model" and encodes) else ("transformer",)
    stages.append(stage("denoise", names, denoise_activation_bytes(arch, w) + embeds + extra))
    stages.append(stage("decode", ("vae",), decode_activation_bytes(arch, w, backend) + extra))
    host = host_stages(arch, w, rung, sizes, tuple(s.name for s in stages)) if backend == "cuda" else tuple(stages)
    return Estimate(asked, backend, tuple(stages), sizes, host, w.host_rung)


def apart_peak_bytes(arch: ModelArch, w: Workload) -> int:
    """The second GPU's peak when the text encoder runs there (`Workload.encoder_apart`): its weights, one prompt
    through it, the embeddings it hands over, the kernels' workspace."""
    return (component_bytes(arch, w)["text_encoder"] + text_activation_bytes(arch, w) + prompt_embedding_bytes(arch, w)
            + CUDA_WORKSPACE_BYTES)


def disk_bytes_needed(arch: ModelArch, w: Workload) -> int:
    """Free disk the disk rung writes: every expert's transformer weights at their stored precision."""
    sizes = component_bytes(arch, w)
    return sum(sizes[c] for c in TRANSFORMERS if c in sizes)
