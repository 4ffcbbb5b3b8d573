"""Finishing steps (postprocess/) as the house runs them: the upscaler through the pipeline cache, each
output beside its source with its own sidecar, progress named per frame ("upscaling frame 17/49").

Used by the runner (checkboxes under the generation settings), the Gallery's buttons and
`app.py upscale` / `app.py interpolate`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configs.schema import GenerationRequest
from engine.results import Sidecar, sidecar_path, versions

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (frame, frames, message)


@dataclass(frozen=True)
class FinishStep:
    """One finishing step: "upscale" (factor = scale) or "interpolate"; `method`/`weights` as the CLI's flags."""

    step: str
    factor: int
    method: str = "auto"
    weights: str | None = None


def steps_from_request(req: GenerationRequest) -> list[FinishStep]:
    """The finishing steps a request asks for, in order: upscale first (on fewer frames), then interpolate."""
    steps = []
    if getattr(req, "upscale", 0):
        steps.append(FinishStep("upscale", req.upscale))
    if getattr(req, "interpolate", 0):
        steps.append(FinishStep("interpolate", req.interpolate))
    return steps


def check_steps(steps: list[FinishStep]) -> None:
    """RequestError naming the value, before anything runs."""
    from postprocess.interpolate import check_factor, check_method
    from postprocess.upscale import check_scale

    for s in steps:
        if s.step == "upscale":
            check_scale(s.factor)
        else:
            check_factor(s.factor)
            check_method(s.method)


def get_upscaler(cache, step: FinishStep, device: str | None = None):
    """The upscaler for a step: Lanczos (no model) without weights, else the model, held in the cache."""
    from postprocess.upscale import open_upscaler, resolve_upscaler

    choice = resolve_upscaler(step.factor, step.method, step.weights)
    if choice.path is None or cache is None:
        return open_upscaler(choice, device), choice
    key = (f"upscaler:{choice.path.name}", "upscale", "none")
    up = cache.get_loaded(key, lambda: open_upscaler(choice, device), {"model": f"upscaler:{choice.path}"})
    return up, choice


def run_step(src: Path, step: FinishStep, cache=None, on_frame: Progress | None = None, *, out=None,
             tile_px: int | None = None):
    """One finishing step on a finished video into `out` (default beside it: x_up2.mp4 / x_int2.mp4); returns
    its FinishResult (with the method's notes). `tile_px`: the upscaler's largest tile, 0 = whole frames."""
    from postprocess import finished_path, interpolate_video, upscale_video
    from postprocess.upscale import TileState

    dst = Path(out) if out else finished_path(src, step.step, step.factor)
    verb = "upscaling" if step.step == "upscale" else "interpolating"

    def progress(i: int, n: int) -> None:
        if on_frame is not None:
            on_frame(i, n, f"{verb} frame {i}/{n}")

    if step.step == "upscale":
        up, choice = get_upscaler(cache, step)
        tiles = TileState() if tile_px is None else TileState(tile_px or None)
        result = upscale_video(src, dst, up, tiles, on_frame=progress)
        result.notes += list(choice.notes)
    else:
        result = interpolate_video(src, dst, step.factor, step.method, on_frame=progress)
    logger.info("%s", result.summary())
    write_finish_sidecar(src, result)
    return result


def run_steps(src: Path, steps: list[FinishStep], cache=None, on_frame: Progress | None = None) -> list:
    """Steps in order, each reading the previous one's output; every intermediate video is kept."""
    results, current = [], Path(src)
    for step in steps:
        result = run_step(current, step, cache, on_frame)
        results.append(result)
        current = Path(result.video)
    return results


def write_finish_sidecar(src: Path, result) -> Path:
    """The output's sidecar in the one format: the source's request and plan, kind = the step, the step's
    record under `finishing`; so the Gallery lists it and "Reuse settings" works on it."""
    src, out = Path(src), Path(result.video)
    try:
        base = Sidecar.read(sidecar_path(src))
    except (OSError, ValueError):
        base = Sidecar(video=src.name, request=GenerationRequest(model="?", task="v2v", prompt="", video=str(src)))
    record = dataclasses.replace(
        base, video=out.name, kind=result.step, latents=None, frames=result.frames_out,
        timings={f"{result.step}_s": result.seconds}, finishing=[*base.finishing, result.to_dict()],
        versions=versions(), created=Sidecar(video="", request=base.request).created,
    )
    return record.write(sidecar_path(out))


def with_finishing(plan, req: GenerationRequest):
    """The plan with the upscale step as a stage of its own: the upscaler's weights (fp16 on a GPU, float32 on
    the CPU; none for Lanczos) plus one tile's activations and the output frame (postprocess.upscale
    `predicted_peak_bytes`), on the device that computes, with a reason. Interpolation runs in ffmpeg, outside."""
    from postprocess.upscale import DEFAULT_TILE_PX, UPSCALERS, predicted_peak_bytes, resolve_upscaler

    step = next((s for s in steps_from_request(req) if s.step == "upscale"), None)
    if step is None:
        return plan
    choice = resolve_upscaler(step.factor, step.method, step.weights)
    on_gpu = plan.device.startswith("cuda")
    weights = 0 if choice.path is None else UPSCALERS[step.factor].params * (2 if on_gpu else 4)
    peak = predicted_peak_bytes(weights, DEFAULT_TILE_PX, (req.height, req.width), step.factor)
    name = f"upscale x{step.factor}"
    reason = (f"finishing: {name} with {choice.label}, predicted {peak / 2**20:.0f} MiB "
              f"(weights + one {DEFAULT_TILE_PX} px tile); the pipeline's weights are released by then")
    changes = dict(stages={**plan.stages, name: peak}, reasons=(*plan.reasons, reason))
    if not on_gpu and plan.host_stages:
        changes["host_stages"] = {**plan.host_stages, name: peak}
    return plan.replace(**changes)
