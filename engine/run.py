"""One generation's state and what it hands back: the `Run` the runner owns from the resolved request to the
written sidecar, its progress events, its result, and the small steps around it (encode the prompt, save the
latents, write the sidecar).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

import decode
from configs.schema import GenerationRequest, ModelSpec, Plan, RequestError
from engine.media import load_image, read_video
from engine.recovery import StepDown
from vram_utils.host_budget import host_limit
from engine.results import SavedLatents, Sidecar, latents_path, sidecar_path, versions
from families import DENOISERS, get_family

logger = logging.getLogger(__name__)

Stage = Literal["loading", "compiling", "encoding", "denoising", "decoding", "saving", "finishing", "done"]


@dataclass(frozen=True)
class ProgressEvent:
    stage: Stage
    step: int = 0
    total: int = 0
    message: str = ""
    eta_s: float | None = None
    preview: Any = None  # denoising: a latent preview (H, W, 3) uint8, when one was made at this step


class Cancelled(Exception):
    """The person pressed Stop; nothing is wrong."""


class RunFailed(RuntimeError):
    """A run could not finish for a reason outside the request (disk full, ...). The message says what to do."""


@dataclass
class RunResult:
    """A finished run: where its files are, and its sidecar (what it was and how it went, as written next to the
    video). The sidecar's fields read through: `result.request`, `result.plan`, `result.frames`, `result.timings`..."""

    video_path: Path
    sidecar_path: Path
    latents_path: Path | None
    sidecar: Sidecar

    def __getattr__(self, name: str):
        sidecar = self.__dict__.get("sidecar")
        if sidecar is not None and name in _SIDECAR_FIELDS:
            return getattr(sidecar, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def final_path(self) -> Path:
        """The finished video: the last finishing step's output, else the decoded video."""
        return Path(self.finishing[-1]["video"]) if self.finishing else self.video_path

    def update(self, **changes) -> Path:
        """The sidecar with `changes`, written again (atomically)."""
        self.sidecar = dataclasses.replace(self.sidecar, **changes)
        return self.sidecar.write(self.sidecar_path)


_SIDECAR_FIELDS = frozenset(f.name for f in dataclasses.fields(Sidecar))


@dataclass(frozen=True)
class RunPaths:
    """Where a run's results go: the video, and beside it the latents (before decode) and the sidecar."""

    video: Path
    latents: Path
    sidecar: Path

    @classmethod
    def beside(cls, video: Path) -> "RunPaths":
        return cls(Path(video), latents_path(video), sidecar_path(video))


@dataclass(eq=False)
class Run:
    """One generation's state, owned by the Runner from the resolved request to the written sidecar."""

    resolved: Any  # engine.resolve.ResolvedRun: what to run, every default filled
    paths: RunPaths
    emit: Callable[[ProgressEvent], None]
    stop: threading.Event | None = None
    inputs: dict = field(default_factory=dict)  # the pipeline's conditioning (image, video or frame count)
    plan: Plan = field(default_factory=Plan)  # lowered by each out-of-memory step down
    stage: Stage = "loading"  # where the run is, for the ladder
    warnings: list[str] = field(default_factory=list)
    step_downs: list[StepDown] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    prompt_checked: bool = False  # the prompt-length warning is computed once per run
    pipe: Any = None  # the pipeline, once loaded
    mods: list = field(default_factory=list)  # the modifiers on `pipe` now (engine/modifiers.py)
    latents: torch.Tensor | None = None  # (B, C, F, H, W) in VAE space once denoised: the last safe point
    stream: decode.StreamingDecode | None = None  # the decode under way (or the one that just failed)
    stats: decode.DecodeStats | None = None  # the finished decode's
    # The text encoder run first and freed (plan.release_text_encoder): the prompt's embeddings, kept for retries;
    # "calibration": MagCache's calibration prompt's, when its ratios must be made first.
    embeds: dict = field(default_factory=dict)
    switch_step: int | None = None  # two-expert models: index of the first low-noise denoising step
    step_cache: Any = None  # engine.stepcache.StepCache of this run (its counters go to the sidecar), or None
    ratios_key: str = ""  # MagCache: the key its ratios are filed under, and the settings that make it
    ratios_facts: dict = field(default_factory=dict)
    watch: Any = None  # vram_utils.host_budget.HostWatch: the room under the host limit, checked every step
    worker: dict = field(default_factory=dict)  # the runner's `worker` (a Ray worker's name, node, device), for the sidecar
    group: Any = None  # engine.parallel.Group while the denoise is shared with helper processes (context parallel)

    def check_memory(self) -> None:
        if self.watch is not None:
            self.watch.check()

    @property
    def request(self) -> GenerationRequest:
        return self.resolved.request

    @property
    def spec(self) -> ModelSpec:
        return self.resolved.spec

    def check_stop(self) -> None:
        check_stop(self.stop)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def safe_emitter(on_progress: Callable[[ProgressEvent], None] | None) -> Callable[[ProgressEvent], None]:
    """Progress is for display: a failing progress callback must not cost the person their run."""

    def emit(event: ProgressEvent) -> None:
        if on_progress is None:
            return
        try:
            on_progress(event)
        except Cancelled:
            raise
        except Exception:
            logger.exception("progress callback failed at %s; the run goes on", event.stage)

    return emit


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled("stopped by request")


def check_writable(folder: Path) -> None:
    """Fail before any work if results cannot be written (a file in the way, permissions, read-only disk)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise RequestError(
            f"outputs folder {str(folder)!r} is not writable ({exc.strerror or exc}); choose another with --outputs-dir"
        ) from exc


def prompt_warnings(pipe, req: GenerationRequest, family: str) -> list[str]:
    """Warn (the pipeline truncates) when the prompt is longer than the text encoder reads."""
    limit = max_sequence_length(pipe, family)
    count = len(pipe.tokenizer(req.prompt, truncation=False).input_ids)
    if count <= limit:
        return []
    message = f"prompt has {count} tokens; the text encoder reads {limit}, so the rest is cut off"
    logger.warning(message)
    return [message]


def max_sequence_length(pipe, family: str) -> int:
    """Text tokens the family's pipeline encodes (families/: CogVideoX's must equal the transformer's)."""
    return get_family(family).max_sequence_length(pipe)


def boundary_timestep(pipe) -> float | None:
    """Two-expert pipelines (Wan 2.2 A14B): the timestep at and above which the high-noise expert runs, as the
    pipeline computes it (boundary_ratio * num_train_timesteps); None for one transformer."""
    two = any(name in pipe.config for name in DENOISERS[1:])
    ratio = pipe.config.get("boundary_ratio") if two else None
    return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps


def expert_names(spec: ModelSpec, task: str) -> tuple[str, ...]:
    """The transformers of a (model, task) pipeline, in the order they run."""
    from configs.schema import task_experts

    return spec.family_module.denoisers[:task_experts(spec, task)]


def experts_record(run: Run) -> dict | None:
    """What the sidecar says about the two experts: the boundary, the first low-noise step, both guidances."""
    if run.pipe is None or boundary_timestep(run.pipe) is None:
        return None
    req = run.request
    return {
        "boundary_ratio": run.pipe.config["boundary_ratio"], "switch_step": run.switch_step,
        "guidance": req.guidance, "guidance_2": req.guidance if req.guidance_2 is None else req.guidance_2,
        "experts_in_ram": run.plan.experts_in_ram or 2,
    }


def encode_prompt(pipe, req: GenerationRequest, max_length: int, device=None) -> dict:
    """The prompt's (and the negative prompt's) embeddings, as the pipeline itself makes them (on `device`: the
    text encoder's, where it runs apart from the transformer; else the pipeline's execution device)."""
    with torch.inference_mode():
        embeds, negative = pipe.encode_prompt(
            prompt=req.prompt, negative_prompt=req.negative_prompt or None, do_classifier_free_guidance=True,
            max_sequence_length=max_length, device=device or pipe._execution_device,
        )
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def save_or_fail(run: Run) -> None:
    """The latents on disk before the decode (a decode failure then costs only the decode)."""
    try:
        save_latents(run.paths.latents, run.latents, run.request)
    except OSError as exc:
        raise RunFailed(
            f"could not save the latents to {run.paths.latents} ({exc.strerror or exc}); free space and run again"
        ) from exc


def fit_suggestion(req: GenerationRequest, spec, plan: Plan) -> str:
    """What would make the request fit: the planner's suggestions where it made them, else halve the frames."""
    fewer = plan.suggested_frames or spec.snap_frames(max(1, (req.frames - 1) // 2 + 1))
    parts = [f"fewer frames (e.g. --frames {fewer})"] if fewer < req.frames else []
    if plan.suggested_model:
        parts.append(f"a smaller model ({plan.suggested_model})")
    parts.append(f"a smaller size than {req.height}x{req.width}")
    return ", or ".join(parts)


def save_latents(path: Path, z: torch.Tensor, req: GenerationRequest) -> Path:
    """The latents on disk (atomically), in the one latents format (results.SavedLatents)."""
    return SavedLatents(z, req).write(path).path


def result_of(run: Run, measured: dict[str, int], timeline: dict | None) -> RunResult:
    """The finished run as a RunResult, its sidecar written."""
    import quant

    from engine.recovery import decode_step_downs

    stats, paths = run.stats, run.paths
    expert = next((m for m in (getattr(run.pipe, n, None) for n in DENOISERS) if m is not None), None)
    quant_result = quant.last_result(expert)
    if quant_result is not None and quant_result.reason:
        run.warn(quant_result.reason)  # e.g. fp8 fell back to fp8-storage on this GPU
    sidecar = Sidecar(
        video=paths.video.name, request=run.request, latents=paths.latents.name, frames=stats.frames, plan=run.plan,
        decode_settings=run.plan.decode, decode=stats.to_dict(), timings=run.timings, measured=measured,
        warnings=run.warnings,
        # the runner's rungs (and those of failed decodes), then the decode's own of the attempt that finished
        step_downs=[s.to_dict() for s in [*run.step_downs, *decode_step_downs(stats)]],
        quant=dataclasses.asdict(quant_result) | {"ratio": quant_result.ratio} if quant_result else None,
        experts=experts_record(run), versions=versions(), loras=[dict(a.record) for a in run.resolved.loras],
        memory_timeline=timeline,
        step_cache=run.step_cache.stats() if run.step_cache is not None else None, worker=dict(run.worker),
    )
    result = RunResult(paths.video, paths.sidecar, paths.latents, sidecar)
    sidecar.write(paths.sidecar)
    return result


def check_host_room(plan: Plan, resident_bytes: int = 0) -> None:
    """Under a container's (or the commit) limit, nothing swaps: a run whose host need is over the room left now is
    not started (the planner fitted it to the room when it planned; other programs may have taken memory since).
    `resident_bytes`: the cache's weights for this run already in RAM (counted as room, as the planner does)."""
    limit = host_limit()
    if limit.kind == "machine" or not plan.fits or plan.host_need_bytes <= limit.available_bytes + resident_bytes:
        return
    raise RunFailed(f"not started: the plan needs {plan.host_need_bytes / 2**30:.2f} GiB of host RAM and the "
                    f"{limit.text()} now (it had {plan.host_budget_bytes / 2**30:.2f} GiB when planned); free memory "
                    "or choose smaller settings")


def read_inputs(req: GenerationRequest) -> tuple[dict, list[str]]:
    """The pipeline's input arguments, and what the person should know about the inputs."""
    if req.task == "i2v":
        return {"image": load_image(req.image, req.width, req.height)}, []
    if req.task == "v2v":
        video, notes = read_video(req.video, req.frames, req.width, req.height)
        return {"video": video, "strength": req.strength}, notes
    return {"num_frames": req.frames}, []


def ratios_facts(run: Run) -> dict:
    """Every setting MagCache's ratios depend on: the model and its LoRAs, the shape and sampling of the run, the
    precision, the attention backend and where the weights sit (the offload rung)."""
    req, plan = run.request, run.plan
    return {
        "model": req.model, "task": req.task, "steps": req.steps, "guidance": req.guidance,
        "guidance_2": req.guidance_2, "shift": req.shift, "size": [req.height, req.width], "frames": req.frames,
        "strength": req.strength if req.task == "v2v" else None, "quant": req.quant, "attention": req.attention,
        "loras": [[a.file.adapter, list(a.strengths)] for a in run.resolved.loras],
        "offload": plan.offload, "disk": plan.disk_offload, "device": plan.device.split(":")[0],
    }
