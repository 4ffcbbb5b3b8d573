"""A request checked once, before anything loads, its defaults filled: every error names the value and what is
allowed (engine/resolve.py adds the checks that need the engine: LoRA files, step caches, attention, compile)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

from configs.registry import get_model_spec, load_presets, models_for_task
from configs.schema import (
    LORA_STRENGTH_MAX, MAX_PROMPT_CHARS, MAX_SIDE_PX, PRESETS, QUANTS, SEED_MAX, TASKS, DecodeSettings,
    GenerationRequest, LoraChoice, ModelSpec, OffloadChoice, RequestError, task_experts,
)
from families import FAMILIES


def _check_number(name: str, value, lo: float, hi: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
        raise RequestError(f"{name}={value!r} is not allowed; {allowed}")


def resolve_request(req: GenerationRequest, *, check_files: bool = True) -> GenerationRequest:
    """Validate a request once, before anything loads, and fill its defaults.

    Raises RequestError naming the offending value and what is allowed. `check_files=False` leaves out the
    input image / video checks (a plan preview before anything is uploaded: the file does not change the plan).
    """
    # 1. What is asked of which model, in words.
    spec = get_model_spec(req.model)
    _check_task(req, spec)
    prompt = (req.prompt or "").strip()
    if not prompt:
        raise RequestError("prompt is empty; describe the video you want")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if req.preset not in PRESETS:
        raise RequestError(f"preset={req.preset!r} is not allowed; choose one of {PRESETS}")
    preset = load_presets()[req.preset]
    # 2. The video's shape, within the family's rules and the model's sizes.
    frames = _frames(req, spec)
    height, width = _size(req, spec)
    # 3. Sampling and memory settings.
    fps = spec.fps if req.fps is None else req.fps
    _check_number("fps", fps, 1, 120, "use 1 to 120 frames per second")
    steps = preset.steps if req.steps is None else req.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise RequestError(f"steps={steps!r} is not allowed; use a whole number from 1 to 1000")
    guidance = preset.guidance if req.guidance is None else req.guidance
    _check_number("guidance", guidance, 0.0, 100.0, "use a number from 0 to 100")
    guidance_2 = _guidance_2(req, spec, guidance)
    _check_number("seed", req.seed, 0, SEED_MAX, f"use 0 to {SEED_MAX} (-1 for random in the UI)")
    if not isinstance(req.seed, int):
        raise RequestError(f"seed={req.seed!r} is not allowed; use a whole number from 0 to {SEED_MAX}")
    if req.offload not in get_args(OffloadChoice):
        raise RequestError(f"offload={req.offload!r} is not allowed; choose one of {get_args(OffloadChoice)}")
    if req.quant not in QUANTS:
        raise RequestError(f"quant={req.quant!r} is not allowed; choose one of {QUANTS}")
    if isinstance(req.context_parallel, bool) or not isinstance(req.context_parallel, int) or \
            not 1 <= req.context_parallel <= 16:
        raise RequestError(f"context_parallel={req.context_parallel!r} is not allowed; use 1 (off) to 16 processes")
    # 4. The inputs the task needs.
    _check_inputs(req, check_files)
    check_decode(req.decode)
    check_finishing(req)
    _check_loras(req, spec)
    if req.shift is not None:
        if not spec.family_module.flow_shift:
            with_shift = ", ".join(f.name for f in FAMILIES.values() if f.flow_shift)
            raise RequestError(f"shift={req.shift!r} is not allowed for {spec.label}: its scheduler has no flow shift "
                               f"(families with one: {with_shift}); leave it out")
        _check_number("shift", req.shift, 0.1, 50.0, "use a number from 0.1 to 50 (Wan's default is 3 to 5)")
    return req.replace(
        prompt=prompt, frames=frames, height=height, width=width, fps=int(fps), steps=steps, guidance=float(guidance),
        guidance_2=guidance_2,
    )


FINISH_FACTORS = (0, 2, 4)  # 0 = the finishing step is off


def check_finishing(req: GenerationRequest) -> None:
    """The finishing steps' factors (postprocess/ checks the rest when it runs)."""
    for name in ("upscale", "interpolate"):
        value = getattr(req, name)
        if isinstance(value, bool) or value not in FINISH_FACTORS:
            raise RequestError(f"{name}={value!r} is not allowed; use 0 (off), 2 or 4")


def _check_loras(req: GenerationRequest, spec: ModelSpec) -> None:
    """The LoRA list's shape and strengths (engine/lora.py finds the files and checks they fit)."""
    if not isinstance(req.loras, tuple) or not all(isinstance(c, LoraChoice) for c in req.loras):
        raise RequestError(f"loras={req.loras!r} is not allowed; give a list of LoRAs, each a name and a strength")
    allowed = f"use a number from -{LORA_STRENGTH_MAX:g} to {LORA_STRENGTH_MAX:g} (1 = as trained, 0 = off)"
    for c in req.loras:
        _check_number(f"strength of LoRA {c.name!r}", c.strength, -LORA_STRENGTH_MAX, LORA_STRENGTH_MAX, allowed)
        if c.strength_2 is None:
            continue
        if task_experts(spec, req.task) < 2:
            raise RequestError(f"a low-noise strength for LoRA {c.name!r} is not allowed for {req.model} {req.task}: "
                               "it runs one transformer; per-expert strengths are for Wan 2.2 A14B t2v / i2v")
        _check_number(f"low-noise strength of LoRA {c.name!r}", c.strength_2, -LORA_STRENGTH_MAX, LORA_STRENGTH_MAX,
                      allowed)


def _guidance_2(req: GenerationRequest, spec: ModelSpec, guidance: float) -> float | None:
    """The low-noise expert's guidance: only two-expert pipelines have one; None there means `guidance`."""
    if task_experts(spec, req.task) < 2:
        if req.guidance_2 is not None:
            raise RequestError(
                f"guidance_2={req.guidance_2!r} is not allowed for {req.model} {req.task}: it runs one transformer; "
                "a second guidance is for two-expert models (Wan 2.2 A14B t2v / i2v). Leave it out and use guidance"
            )
        return None
    guidance_2 = guidance if req.guidance_2 is None else req.guidance_2
    _check_number("guidance_2", guidance_2, 0.0, 100.0, "use a number from 0 to 100")
    return float(guidance_2)


def _check_task(req: GenerationRequest, spec: ModelSpec) -> None:
    if req.task not in TASKS:
        raise RequestError(f"task={req.task!r} is not allowed; choose one of {TASKS}")
    if req.task not in spec.tasks:
        raise RequestError(
            f"model {req.model!r} has no {req.task} pipeline; it serves: {', '.join(spec.tasks)}. "
            f"Models with {req.task}: {', '.join(models_for_task(req.task))}"
        )


def _frames(req: GenerationRequest, spec: ModelSpec) -> int:
    frames = spec.default_frames if req.frames is None else req.frames
    if isinstance(frames, bool) or not isinstance(frames, int) or not spec.frames_ok(frames) or frames > spec.max_frames:
        raise RequestError(
            f"frames={frames!r} is not allowed for {spec.family} models; use {spec.frame_rule_text()} "
            f"up to {spec.max_frames} (nearest: {spec.snap_frames(frames) if isinstance(frames, int) else spec.default_frames})"
        )
    return frames


def _size(req: GenerationRequest, spec: ModelSpec) -> tuple[int, int]:
    height, width = spec.default_resolution
    height = height if req.height is None else req.height
    width = width if req.width is None else req.width
    for name, value in (("height", height), ("width", width)):
        m = spec.size_multiple
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m or value > MAX_SIDE_PX:
            raise RequestError(
                f"{name}={value!r} is not allowed; use a positive multiple of {m} up to {MAX_SIDE_PX} "
                f"(this model's sizes: {', '.join(f'{h}x{w}' for h, w in spec.resolutions)})"
            )
    fixed = spec.tasks[req.task].fixed_size
    if fixed and (height, width) != fixed:
        raise RequestError(
            f"size {height}x{width} is not allowed for {req.model} {req.task}: its learned positional "
            f"embeddings fix the size at {fixed[0]}x{fixed[1]}"
        )
    return height, width


def _check_inputs(req: GenerationRequest, check_files: bool) -> None:
    if req.task == "i2v" and check_files:
        _check_input_file("image", req.image)
    if req.task == "v2v":
        if check_files:
            _check_input_file("video", req.video)
        _check_number("strength", req.strength, 0.0, 1.0, "use a number from 0 to 1")


def _check_input_file(name: str, path: str | None) -> None:
    if not path:
        raise RequestError(f"{name} is missing; the task needs an input {name} file")
    p = Path(path)
    if not p.is_file():
        raise RequestError(f"{name} file {path!r} does not exist")
    if p.stat().st_size == 0:
        raise RequestError(f"{name} file {path!r} is empty (0 bytes)")


def check_decode(d: DecodeSettings, min_px: int = 32, max_px: int | None = MAX_SIDE_PX) -> None:
    """Decode settings a person may ask for (32 to 4096 px). The streaming decode itself takes any positive
    size (`min_px=1, max_px=None`): its own out-of-memory steps may go below what a person is offered."""
    for name in ("tile_x", "tile_y", "tile_stride_x", "tile_stride_y"):
        value = getattr(d, name)
        if (isinstance(value, bool) or not isinstance(value, int) or value < min_px
                or (max_px is not None and value > max_px)):
            allowed = f"from {min_px} to {max_px}" if max_px is not None else f"from {min_px} up"
            raise RequestError(f"{name}={value!r} is not allowed; use whole pixels {allowed}")
    if d.tile_stride_x > d.tile_x or d.tile_stride_y > d.tile_y:
        raise RequestError(
            f"tile stride ({d.tile_stride_x}x{d.tile_stride_y}) larger than the tile ({d.tile_x}x{d.tile_y}) "
            "would leave gaps; use a stride no larger than the tile"
        )
    if isinstance(d.chunk_frames, bool) or not isinstance(d.chunk_frames, int) or d.chunk_frames < 0:
        raise RequestError(f"chunk_frames={d.chunk_frames!r} is not allowed; use 0 (automatic) or a positive count")
