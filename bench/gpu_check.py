"""GPU readiness in one command: every GPU claim of the README, measured, in one table.

    .venv/bin/python bench/gpu_check.py               # on a CUDA GPU (planned for under 8 min on an H100-class card)
    .venv/bin/python bench/gpu_check.py --cpu-smoke   # the same code paths at tiny sizes on the CPU (under a minute)
    .venv/bin/python bench/gpu_check.py --only a,d --json rows.json

Checks (each row: claim | measured | target | result):
  a  the planner's rung under 8 / 12 / 16 / 24 GiB caps (torch.cuda.set_per_process_memory_fraction): full-size
     CogVideoX-5b and Wan 2.1 1.3B transformers (diffusers classes, published config values, random bf16
     weights), one forward each at the model's default request (49x480x720 / 81x480x832, guidance on) with the
     planned rung applied: it runs without OOM under the cap and its measured peak is within the plan's
     predicted denoise stage (which also counts the prompt embeddings, scheduler copies and, for the `none`
     rung, every component's weights, so it is an upper bound, not a ratio target)
  b  group offload with CUDA streams runs (every block group copies on a side stream) and gives the resident
     result, on the full-size Wan 1.3B transformer
  c  fp8 weights (quant.apply(module, "fp8")) on compute capability >= 8.9: torchao float8, about one byte
     per parameter, output close to bf16's
  d  streaming decode at 49x480x720 (13 latent frames) against diffusers' enable_tiling, full-size VAEs, random
     bf16 weights, the tiles of bench/decode_memory.py: peak ratio, time ratio, our peak 13 / 3 latent frames.
     Peak = max_memory_allocated during the decode (the VAE's weights included), as decode_memory.py measures.
     Both sides end with uint8 frames on the host (no mp4: the encoder is the same for both and runs on the CPU)
  e  plan accuracy on CUDA: bench/plan_accuracy.py's CUDA grid (CogVideoX-2b and Wan 1.3B pipelines, 8-24 GB caps)
  f  ten runs of a tiny pipeline (tiny-wan, 33x256x256) through engine.runner.Runner keep
     torch.cuda.memory_allocated flat

--cpu-smoke runs the same functions with tiny sizes (tiny-cogvideox / tiny-wan and their configs, no caps; the
rung is still the one the planner picks for the full-size model on a card of that size; four runner runs). Peaks
there are host RSS. Rows whose claim only a GPU can show (streams, fp8 compute, the decode ratios, the CUDA grid)
say "GPU only": their code still runs where it can, and a wrong result there is still a FAIL.

Prints the CPU model (lscpu) and the GPU name first: compare figures only within one run (shared/NOTES.md).
Exit status 1 when any row fails.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # the project, and the sibling benchmarks reused here
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

logger = logging.getLogger("gpu_check")

MIB, GIB = 2**20, 2**30
PASS, FAIL, GPU_ONLY, NA = "pass", "FAIL", "GPU only", "n/a"
COG_5B, WAN_1_3B = "THUDM/CogVideoX-5b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
TINY = {"cogvideox": "tiny-cogvideox", "wan": "tiny-wan"}
PROMPT = "a cat walks on the beach"
GUIDANCE = 6.0  # guidance on: CogVideoX runs cond + uncond as one batch of 2, Wan one after the other

# Published transformer configs (the rest of each is diffusers' defaults); tests/test_vram_utils.py checks these
# values against the planner's architecture table on the meta device.
FULL_TRANSFORMERS = {
    COG_5B: ("CogVideoXTransformer3DModel", dict(num_attention_heads=48, attention_head_dim=64, num_layers=42,
                                                 text_embed_dim=4096, time_embed_dim=512,
                                                 use_rotary_positional_embeddings=True)),
    WAN_1_3B: ("WanTransformer3DModel", dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                             num_layers=30, text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                             qk_norm="rms_norm_across_heads")),
}
FULL_VAES = {"cogvideox": "AutoencoderKLCogVideoX", "wan": "AutoencoderKLWan"}  # diffusers defaults = 2b / 2.1 VAEs
WAN_TEXT_TOKENS = 512  # WanPipeline's max_sequence_length
FAMILY_LABEL = {"cogvideox": "CogVideoX", "wan": "Wan 2.1"}


@dataclass(frozen=True)
class Row:
    check: str  # a..f
    claim: str
    measured: str
    target: str
    result: str  # pass | FAIL | GPU only | n/a


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the CUDA run and the CPU smoke run."""

    cuda: bool
    caps_gib: tuple[int, ...] = (8, 12, 16, 24)
    rung_models: tuple[str, ...] = (COG_5B, WAN_1_3B)
    workload: tuple[int, int, int] | None = None  # (frames, height, width) of check a; None = the model's default
    small: tuple[int, int, int] = (9, 480, 832)  # checks b and c: one short forward of Wan 1.3B
    fp8_max_ratio: float = 0.55  # weight bytes after / before; bf16 -> fp8 with 2% of the weights kept is 0.51
    decode_latent_hw: tuple[int, int] = (60, 90)  # 480x720 output
    decode_latent_frames: tuple[int, int] = (3, 13)  # 9 and 49 frames
    runner: tuple[int, int, int] = (33, 256, 256)  # check f: tiny-wan frames, height, width
    runs: int = 10
    # check f, CUDA: allowed growth of memory_allocated after run one (which loads the model). One run's leaked
    # latents are 0.6 MiB here, so a leak shows within two runs. On the CPU: RSS within 2% of run one's (README).
    flat_bytes: int = 1 * MIB

    @property
    def device(self) -> str:
        return "cuda:0" if self.cuda else "cpu"

    def run_model(self, model: str) -> str:
        """The model that computes for `model`: itself on CUDA, the tiny model of its family on the CPU."""
        from configs.registry import get_model_spec

        return model if self.cuda else TINY[get_model_spec(model).family]


CUDA_SIZES = Sizes(cuda=True)
SMOKE_SIZES = Sizes(
    cuda=False, workload=(9, 32, 32), small=(9, 32, 32), fp8_max_ratio=0.9,
    decode_latent_hw=(4, 6), decode_latent_frames=(1, 3),  # 32x48 px: still two tiles of 32 px wide
    runner=(9, 32, 32), runs=4,
)


# =========================================================================== machine


def cpu_model() -> str:
    """lscpu's model name (the figures depend on it: shared/NOTES.md), /proc/cpuinfo without lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name:")]
        if names:
            return names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / GIB:.1f} GiB)"


def release(cuda: bool) -> None:
    """Garbage and cached blocks back; the whole card again (a cap never outlives its check)."""
    import torch

    gc.collect()
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def capped_device(cap_bytes: int, cuda: bool):
    """A DeviceInfo whose GPU holds `cap_bytes`. On CUDA the cap is real: the caching allocator refuses to
    reserve past it, and the host RAM is this machine's. On the CPU it is a card on paper, for the (pure)
    planner, on a machine with plenty of RAM (128 GiB), so that the GPU cap alone picks the rung the README's
    GPU table names (the host RAM here changes from one moment to the next)."""
    import torch

    import vram_utils

    host = vram_utils.probe()
    name, used, capability = "synthetic card", 0, None
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), 0)
        name, used = torch.cuda.get_device_name(0), torch.cuda.memory_reserved(0)
        capability = torch.cuda.get_device_capability(0)
    gpu = vram_utils.GpuInfo(0, f"{name} capped at {cap_bytes / GIB:g} GiB", cap_bytes, used, cap_bytes - used, 0, 0,
                             capability)
    if not cuda:
        return vram_utils.DeviceInfo(True, (gpu,), 128 * GIB, 128 * GIB, host.process_rss_bytes)
    return vram_utils.DeviceInfo(True, (gpu,), host.host_total_bytes, host.host_available_bytes, host.process_rss_bytes)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:160]


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


# =========================================================================== models with random weights


def random_module(build: Callable, dtype, device):
    """`build()` with random N(0, 0.02) weights made straight in `dtype` on `device` (no float32 copy of billions
    of weights). Buffers (position tables) keep what the constructor computed. Cast as
    from_pretrained(torch_dtype=dtype) casts: the class's `_keep_in_fp32_modules` stay float32."""
    import torch
    from accelerate import init_empty_weights

    torch.manual_seed(0)
    with init_empty_weights():  # parameters on meta, buffers real
        module = build()
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())  # e.g. Wan's rope, norms, time embedder
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    return module.eval()


def random_transformer(model: str, device):
    """The transformer of `model` with random weights in the model's dtype: a full-size one from its published
    config values, a tiny one from the tiny model's own config (as saved by engine.tiny)."""
    import diffusers
    import torch

    from configs.registry import get_model_spec

    spec = get_model_spec(model)
    if spec.tiny:
        from engine.cache import PipelineCache

        config = dict(PipelineCache(max_size=1).get(model, "t2v").transformer.config)
        cls = getattr(diffusers, config["_class_name"])
    else:
        name, config = FULL_TRANSFORMERS[model]
        cls = getattr(diffusers, name)
    return random_module(lambda: cls.from_config(config), getattr(torch, spec.default_dtype), device)


def random_vae(family: str, sizes: Sizes):
    """Full-size VAE of the family (diffusers' defaults), random bf16 weights; on the CPU the tiny model's VAE."""
    import diffusers
    import torch

    if not sizes.cuda:
        from engine.cache import PipelineCache

        return PipelineCache(max_size=1).get(TINY[family], "t2v").vae.eval()
    return random_module(getattr(diffusers, FULL_VAES[family]), torch.bfloat16, sizes.device)


def transformer_pipeline(model: str, transformer):
    """A diffusers pipeline holding only `transformer`: the offload rungs act on pipelines, and CogVideoX's
    rotary table comes from one. The other components are None, which diffusers' offloading skips."""
    import diffusers

    from configs.registry import get_model_spec

    cls = diffusers.CogVideoXPipeline if get_model_spec(model).family == "cogvideox" else diffusers.WanPipeline
    return cls(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=None)


# =========================================================================== one transformer forward


@dataclass(frozen=True)
class Workload:
    frames: int
    height: int
    width: int
    batch: int
    text_tokens: int


def request_for(model: str, shape: tuple[int, int, int] | None = None):
    """A T2V request at the model's defaults, or at (frames, height, width)."""
    from configs.schema import GenerationRequest

    frames, height, width = shape or (None, None, None)
    return GenerationRequest(model=model, task="t2v", prompt=PROMPT, frames=frames, height=height, width=width,
                             steps=2, guidance=GUIDANCE)


def workload_of(request, transformer) -> Workload:
    """What the family's pipeline feeds the transformer for `request`."""
    from configs.registry import get_model_spec

    spec = get_model_spec(request.model)
    height, width = request.height or spec.default_resolution[0], request.width or spec.default_resolution[1]
    frames = request.frames or spec.default_frames
    if spec.family == "cogvideox":  # cond + uncond in one batch; the text is the transformer's own length
        return Workload(frames, height, width, 2 if request.guidance > 1 else 1,
                        int(transformer.config.max_text_seq_length))
    from engine.tiny import WAN_TEXT_LEN

    return Workload(frames, height, width, 1, WAN_TEXT_LEN if spec.tiny else WAN_TEXT_TOKENS)


def forward(pipe, family: str, wl: Workload, device):
    """One denoising forward at `wl`, inputs made as the family's pipeline makes them; returns the prediction."""
    import torch

    tr = pipe.transformer
    cfg, dtype = tr.config, tr.dtype
    lat_frames, lat_h, lat_w = (wl.frames - 1) // 4 + 1, wl.height // 8, wl.width // 8  # both VAEs: 4x time, 8x space
    g = torch.Generator("cpu").manual_seed(0)
    text_dim = cfg.text_embed_dim if family == "cogvideox" else cfg.text_dim
    text = torch.randn(wl.batch, wl.text_tokens, text_dim, generator=g)  # (B, L, D)
    if family == "cogvideox":
        x = torch.randn(wl.batch, lat_frames, cfg.in_channels, lat_h, lat_w, generator=g)  # (B, F, C, H, W)
    else:
        x = torch.randn(wl.batch, cfg.in_channels, lat_frames, lat_h, lat_w, generator=g)  # (B, C, F, H, W)
    kwargs = dict(hidden_states=x.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                  timestep=torch.full((wl.batch,), 999, device=device), return_dict=False)
    if family == "cogvideox" and cfg.use_rotary_positional_embeddings:
        kwargs["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(wl.height, wl.width, lat_frames, device)
    with torch.inference_mode():
        return tr(**kwargs)[0]


def measured_peak(meter, cuda: bool) -> int:
    """Peak above the meter's start: GPU allocated bytes on CUDA, host RSS on the CPU."""
    return meter.gpu_delta_bytes if cuda else meter.host_delta_bytes


# =========================================================================== a: rungs under caps


def rung_claims(sizes: Sizes) -> list[str]:
    from configs.registry import get_model_spec

    return [f"{get_model_spec(m).label}, GPU capped at {cap} GiB: the planned rung runs, peak <= predicted"
            for m in sizes.rung_models for cap in sizes.caps_gib]


def check_rungs(sizes: Sizes) -> list[Row]:
    from configs.registry import get_model_spec

    rows = []
    claims = iter(rung_claims(sizes))
    for model in sizes.rung_models:
        run_model = sizes.run_model(model)
        # made on the compute device (random numbers are fast there), then kept in RAM as a loaded model is
        pipe = transformer_pipeline(run_model, random_transformer(run_model, sizes.device).to("cpu"))
        family = get_model_spec(model).family
        for cap in sizes.caps_gib:
            rows.append(rung_row(next(claims), pipe, (model, run_model, family), cap, sizes))
        del pipe
        release(sizes.cuda)
    return rows


def rung_row(claim: str, pipe, models: tuple[str, str, str], cap_gib: int, sizes: Sizes) -> Row:
    """Plan under the cap, apply the planned rung, run one forward, compare the peak with the prediction."""
    import torch

    import vram_utils
    from configs.registry import get_model_spec

    model, run_model, family = models
    target = "no OOM; peak <= predicted denoise stage"
    try:
        device_info = capped_device(cap_gib * GIB, sizes.cuda)
        plan = vram_utils.plan_for(request_for(model), get_model_spec(model), device_info)
        run_request = request_for(run_model, sizes.workload)
        # On the CPU the tiny model computes, in host RAM: its own plan there gives the prediction.
        run_plan = plan if run_model == model else vram_utils.plan_for(
            run_request, get_model_spec(run_model), vram_utils.probe())
        predicted = run_plan.stages["denoise"]
        with vram_utils.PeakMeter() as meter:
            vram_utils.apply_offload_strategy(pipe, plan.offload, sizes.device)
            out = forward(pipe, family, workload_of(run_request, pipe.transformer), sizes.device)
            del out
        peak = measured_peak(meter, sizes.cuda)
        where = "" if sizes.cuda else f" ({run_model}, CPU RSS, no cap)"
        measured = f"{plan.offload}: peak {fmt_bytes(peak)} of predicted {fmt_bytes(predicted)}{where}"
        return Row("a", claim, measured, target, PASS if peak <= predicted else FAIL)
    except Exception as exc:  # an OOM is the finding; anything else must not cost the other caps their rows
        what = "OOM under the cap" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
        return Row("a", claim, f"{what}: {first_line(exc)}", target, FAIL)
    finally:
        vram_utils.apply_offload_strategy(pipe, "none", "cpu")  # hooks off, weights back for the next cap
        release(sizes.cuda)


# =========================================================================== b: group offload with streams


B_CLAIM = "group offload with CUDA streams runs and gives the resident result"


def check_group_streams(sizes: Sizes) -> list[Row]:
    import vram_utils

    model = sizes.run_model(WAN_1_3B)
    pipe = transformer_pipeline(model, random_transformer(model, sizes.device).to("cpu"))
    wl = workload_of(request_for(model, sizes.small), pipe.transformer)
    vram_utils.apply_offload_strategy(pipe, "none", sizes.device)
    reference = forward(pipe, "wan", wl, sizes.device).float().cpu()
    vram_utils.apply_offload_strategy(pipe, "group", sizes.device)
    out = forward(pipe, "wan", wl, sizes.device).float().cpu()
    groups, streams = _group_hooks(pipe.transformer)
    vram_utils.apply_offload_strategy(pipe, "none", "cpu")
    diff = (out - reference).abs().max().item()
    # bf16 rounding of the largest value: only the placement changed, so anything above it is a wrong weight
    tol = 2**-7 * reference.abs().max().item()
    same = diff <= tol
    measured = f"{streams}/{groups} block groups with a stream; group vs resident max diff {diff:.3g} (bound {tol:.3g})"
    target = "every block group has a stream; output within bf16 rounding"
    if not sizes.cuda:
        return [Row("b", B_CLAIM, measured + " (CPU: no streams)", target, GPU_ONLY if same else FAIL)]
    return [Row("b", B_CLAIM, measured, target, PASS if same and groups and streams == groups else FAIL)]


def _group_hooks(module) -> tuple[int, int]:
    """(block groups, those that copy on a CUDA side stream) in `module`. The group of what lies outside the
    blocks hangs on the module itself and is loaded before the first block without a stream (diffusers' design)."""
    groups = streams = 0
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None) if m is not module else None
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups += 1
            streams += hook.group.stream is not None
    return groups, streams


# =========================================================================== c: fp8


C_CLAIM = "fp8 weights: torchao float8 on compute capability >= 8.9"


def check_fp8(sizes: Sizes) -> list[Row]:
    import torch

    import quant

    model = sizes.run_model(WAN_1_3B)
    pipe = transformer_pipeline(model, random_transformer(model, sizes.device))
    wl = workload_of(request_for(model, sizes.small), pipe.transformer)
    reference = forward(pipe, "wan", wl, sizes.device).float().flatten()
    result = quant.apply(pipe.transformer, "fp8")
    out = forward(pipe, "wan", wl, sizes.device).float().flatten()
    cosine = torch.nn.functional.cosine_similarity(out, reference, dim=0).item()
    del pipe
    release(sizes.cuda)
    fp8_here = sizes.cuda and torch.cuda.get_device_capability(0) >= quant.FP8_MIN_CAPABILITY
    expected = "fp8" if fp8_here else "fp8-storage"  # elsewhere it falls back, and says so
    ok = (result.applied == expected and (fp8_here or bool(result.reason))
          and result.ratio <= sizes.fp8_max_ratio and cosine >= 0.99)
    measured = (f"applied {result.applied}, {result.bytes_per_param:.3f} B/param (x{result.ratio:.3f} of "
                f"{fmt_bytes(result.bytes_before)}), cosine to unquantized {cosine:.5f}"
                + (f"; {result.reason}" if result.reason else ""))
    target = f"fp8 applied; x <= {sizes.fp8_max_ratio}; cosine >= 0.99"
    if not ok:
        return [Row("c", C_CLAIM, measured, target, FAIL)]
    return [Row("c", C_CLAIM, measured, target, PASS if fp8_here else (NA if sizes.cuda else GPU_ONLY))]


# =========================================================================== d: streaming decode vs diffusers


def decode_claims() -> list[str]:
    claims = []
    for family in ("cogvideox", "wan"):
        label = FAMILY_LABEL[family]
        claims += [f"{label} decode: our peak / diffusers tiled, longer video",
                   f"{label} decode: our peak, longer / shorter video",
                   f"{label} decode: our time / diffusers tiled, longer video"]
    return claims


class CountingSink:
    """Takes the decoded uint8 frames and keeps only their count and size."""

    def __init__(self):
        self.frames = 0
        self.shape: tuple[int, ...] = ()

    def write(self, frames) -> None:
        self.frames += len(frames)
        self.shape = tuple(frames.shape[1:])


def decode_once(vae, z, settings, cuda: bool) -> tuple[int, float, int]:
    """(peak bytes, seconds, frames) of one decode of `z` (1, C, F, h, w) to uint8 frames on the host.
    settings None: diffusers' own vae.decode with enable_tiling on, else decode.stream_decode with `settings`."""
    import torch

    import decode
    import vram_utils

    release(cuda)
    t0 = time.perf_counter()
    with vram_utils.PeakMeter() as meter:
        if settings is None:
            with torch.inference_mode():
                video = vae.decode(z).sample  # (1, 3, T, H, W) in [-1, 1]
                # as diffusers' postprocess: [0, 1], rounded to uint8, (T, H, W, 3) on the host
                frames = ((video[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                count = len(frames.permute(1, 2, 3, 0).cpu())
                del video, frames
        else:
            sink = CountingSink()
            decode.stream_decode(vae, z, settings, sink)
            count = sink.frames
    seconds = time.perf_counter() - t0
    return (meter.peak_gpu_bytes if cuda else meter.host_delta_bytes), seconds, count


def check_decode(sizes: Sizes) -> list[Row]:
    rows = []
    claims = iter(decode_claims())
    for family in ("cogvideox", "wan"):
        rows += decode_rows(family, [next(claims) for _ in range(3)], sizes)
        release(sizes.cuda)
    return rows


def decode_rows(family: str, claims: list[str], sizes: Sizes) -> list[Row]:
    """Our streaming decode of the shorter and the longer video, diffusers' tiled decode of the longer one."""
    import torch

    import decode_memory
    from configs.schema import DecodeSettings

    vae = random_vae(family, sizes)
    vae.disable_tiling()
    few, many = sizes.decode_latent_frames
    h, w = sizes.decode_latent_hw
    channels = vae.config.latent_channels if family == "cogvideox" else vae.config.z_dim
    z = {n: torch.randn(1, channels, n, h, w, generator=torch.Generator("cpu").manual_seed(n))  # (B, C, F, h, w)
         .to(sizes.device, vae.dtype) for n in (few, many)}
    diffusers_tiles, our_tiles = decode_memory.TILES["cuda", family] if sizes.cuda else ({}, dict(
        tile_y=32, tile_x=32, tile_stride_y=24, tile_stride_x=24, chunk_frames=1 if family == "cogvideox" else 0))
    ours = DecodeSettings(enable_vae_tiling=True, **our_tiles)
    ours_few = decode_once(vae, z[few], ours, sizes.cuda)  # first: it also warms the kernels up
    vae.enable_tiling(**diffusers_tiles)
    theirs = decode_once(vae, z[many], None, sizes.cuda)
    vae.disable_tiling()
    ours_many = decode_once(vae, z[many], ours, sizes.cuda)
    del vae, z
    counts = (ours_few[2], theirs[2], ours_many[2])
    frames_ok = counts == ((few - 1) * 4 + 1, (many - 1) * 4 + 1, (many - 1) * 4 + 1)
    size = f"{many} latent frames, {(many - 1) * 4 + 1}x{h * 8}x{w * 8}"
    targets = decode_memory.TARGETS
    ratios = [
        (_ratio(ours_many[0], theirs[0]), targets["cog_vs_tiled" if family == "cogvideox" else "wan_vs_tiled"],
         f"{fmt_bytes(ours_many[0])} / {fmt_bytes(theirs[0])}, {size}"),
        (_ratio(ours_many[0], ours_few[0]), targets["frames_ratio"],
         f"{fmt_bytes(ours_many[0])} / {fmt_bytes(ours_few[0])}, {many} / {few} latent frames"),
        (_ratio(ours_many[1], theirs[1]), targets["time_vs_tiled"],
         f"{ours_many[1]:.1f} s / {theirs[1]:.1f} s, {size}"),
    ]
    rows = []
    for claim, (ratio, target, detail) in zip(claims, ratios):
        result = (PASS if ratio <= target else FAIL) if sizes.cuda else GPU_ONLY
        note = "" if frames_ok else f"; wrong frame counts (ours short, diffusers, ours long) {counts}"
        rows.append(Row("d", claim, f"{ratio:.3f} ({detail}){note}", f"<= {target}", result if frames_ok else FAIL))
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")  # a CPU RSS delta can be 0


# =========================================================================== e: plan accuracy on CUDA


def plan_accuracy_claims() -> list[str]:
    import plan_accuracy

    from configs.registry import get_model_spec

    return [f"plan accuracy, {get_model_spec(m).label} pipeline, GPU capped at {cap} GB: predicted / measured"
            for m in plan_accuracy.CUDA_MODELS for cap in plan_accuracy.CUDA_CAPS_GB]


def check_plan_accuracy(sizes: Sizes) -> list[Row]:
    import plan_accuracy

    target = f"{plan_accuracy.TARGET[0]}-{plan_accuracy.TARGET[1]}"
    if not sizes.cuda:
        return [Row("e", claim, "not run: bench/plan_accuracy.py's CUDA grid needs CUDA", target, GPU_ONLY)
                for claim in plan_accuracy_claims()]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plan_accuracy.run_cuda()
    release(True)
    return plan_accuracy_rows(printed.getvalue())


def plan_accuracy_rows(printed: str) -> list[Row]:
    """Rows from what plan_accuracy.run_cuda printed, one line per (model, cap) in its order:
    '<label> <cap> GB: <rung>   <pred MiB> <meas MiB> <ratio>  ok|OUT', or '...: <rung>: OOM (...)'."""
    import plan_accuracy

    from configs.registry import get_model_spec

    target = f"{plan_accuracy.TARGET[0]}-{plan_accuracy.TARGET[1]}"
    lines = printed.splitlines()
    rows = []
    claims = iter(plan_accuracy_claims())
    for model in plan_accuracy.CUDA_MODELS:
        for cap in plan_accuracy.CUDA_CAPS_GB:
            claim, prefix = next(claims), f"{get_model_spec(model).label} {cap} GB: "
            line = next((ln for ln in lines if ln.startswith(prefix)), None)
            pattern = r"(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|inf)\s+(ok|OUT)$"
            m = re.match(pattern, line[len(prefix):]) if line else None
            if m is None:
                rows.append(Row("e", claim, (line or "no line printed for it")[:160], target, FAIL))
                continue
            rung, pred, meas, ratio, verdict = m.groups()
            rows.append(Row("e", claim, f"{rung}: {ratio} ({pred} / {meas} MiB)", target,
                            PASS if verdict == "ok" else FAIL))
    return rows


# =========================================================================== f: runs stay flat


F_CLAIM = "runs of a tiny pipeline in a row through the Runner keep torch.cuda.memory_allocated flat"


def check_runner_flat(sizes: Sizes) -> list[Row]:
    import torch

    import vram_utils
    from engine.cache import PipelineCache
    from engine.runner import Runner

    frames, height, width = sizes.runner
    after = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        runner = Runner(PipelineCache(max_size=1), outputs_dir=tmp)
        request = request_for("tiny-wan", (frames, height, width))
        for i in range(sizes.runs):
            runner.generate(request, out_path=Path(tmp) / f"run{i}.mp4")
            after.append(torch.cuda.memory_allocated(0) if sizes.cuda else vram_utils.probe().process_rss_bytes)
        runner.cache.unload_all()
    growth = max(after[1:]) - after[0]  # run one loads the model and is the baseline
    allowed = sizes.flat_bytes if sizes.cuda else int(0.02 * after[0])
    metric = "allocated" if sizes.cuda else "RSS"
    measured = (f"{metric} after run 1 {fmt_bytes(after[0])}, largest growth after it {growth / MIB:+.2f} MiB "
                f"({sizes.runs} runs, tiny-wan {frames}x{height}x{width})")
    release(sizes.cuda)
    target = f"growth <= {fmt_bytes(allowed)}" if sizes.cuda else "RSS growth <= 2% of run 1 (the CPU claim)"
    return [Row("f", F_CLAIM, measured, target, PASS if growth <= allowed else FAIL)]


# =========================================================================== driver


CHECKS: dict[str, tuple[Callable[[Sizes], list[str]], Callable[[Sizes], list[Row]]]] = {
    "a": (rung_claims, check_rungs),
    "b": (lambda sizes: [B_CLAIM], check_group_streams),
    "c": (lambda sizes: [C_CLAIM], check_fp8),
    "d": (lambda sizes: decode_claims(), check_decode),
    "e": (lambda sizes: plan_accuracy_claims(), check_plan_accuracy),
    "f": (lambda sizes: [F_CLAIM], check_runner_flat),
}


def expected_claims(sizes: Sizes, only: str = "abcdef") -> list[tuple[str, str]]:
    """(check, claim) of every row a run prints, in order."""
    return [(key, claim) for key, (claims, _) in CHECKS.items() if key in only for claim in claims(sizes)]


def run_check(key: str, sizes: Sizes) -> list[Row]:
    """The check's rows; a check that raises gives FAIL rows, with the error, for every claim it did not answer."""
    claims, check = CHECKS[key]
    t0 = time.perf_counter()
    try:
        rows = check(sizes)
        error = ""
    except Exception as exc:  # one broken check must not hide the others' results
        logger.exception("check %s failed", key)
        rows, error = [], f"{type(exc).__name__}: {first_line(exc)}"
        release(sizes.cuda)
    answered = {row.claim for row in rows}
    rows += [Row(key, claim, f"error: {error}", "-", FAIL) for claim in claims(sizes) if claim not in answered]
    logger.info("check %s: %.1f s", key, time.perf_counter() - t0)
    return rows


def print_table(rows: list[Row], seconds: float) -> None:
    print("\n| claim | measured | target | result |\n|---|---|---|---|")
    for row in rows:
        cells = (f"{row.check}. {row.claim}", row.measured, row.target, row.result)
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")  # an error text must not split a row
    counts = {r: sum(row.result == r for row in rows) for r in (PASS, FAIL, GPU_ONLY, NA)}
    print("\n" + ", ".join(f"{n} {r}" for r, n in counts.items()) + f"; {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, no caps (under a minute)")
    ap.add_argument("--only", default="abcdef", help="checks to run, e.g. a,d (default: all)")
    ap.add_argument("--json", type=Path, help="also write the rows here as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # pipelines' and loaders' progress bars would drown the table
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights and tiny models: nothing to download
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --cpu-smoke for the same code paths at tiny sizes on the CPU")
    only = args.only.replace(",", "").replace(" ", "")
    unknown = sorted(set(only) - set(CHECKS))
    if unknown or not only:
        ap.error(f"--only {args.only!r}: unknown check(s) {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(CHECKS)}")
    sizes = SMOKE_SIZES if args.cpu_smoke else CUDA_SIZES
    # the machine first: figures compare only within one run on one machine
    print(f"FitVideo GPU check ({'CPU smoke, tiny sizes' if args.cpu_smoke else 'CUDA'})\nCPU: {cpu_model()}\n"
          f"GPU: {gpu_name()}\ntorch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    rows = [row for key in CHECKS if key in only for row in run_check(key, sizes)]
    seconds = time.perf_counter() - t0
    print_table(rows, seconds)
    if args.json:
        data = {"mode": "cpu-smoke" if args.cpu_smoke else "cuda", "cpu": cpu_model(), "gpu": gpu_name(),
                "seconds": seconds, "rows": [dataclasses.asdict(row) for row in rows]}
        args.json.write_text(json.dumps(data, indent=1))
    return 1 if any(row.result == FAIL for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
