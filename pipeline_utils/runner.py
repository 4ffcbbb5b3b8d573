"""One place that owns a generation, in numbered steps (see DESIGN.md).

   1. check the request            5. denoise to latents (progress + stop flag per step)
   2. plan memory                  6. save latents next to the output
   3. get the pipeline (cache)     7. stream-decode into the video file
   4. apply the plan               8. finally: drop per-run state, free memory
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

import decode
import quant
import vram_utils
from configs.schema import DecodeSettings, GenerationRequest, Plan, RequestError, get_model_spec, resolve_request
from pipeline_utils.cache import PipelineCache
from vram_utils import release_memory
from vram_utils.sentinel import LeakReport, LeakSentinel
from pipeline_utils.media import load_image, load_video
from pipeline_utils.recovery import StepDown, decode_step_downs, is_oom, step_down

logger = logging.getLogger(__name__)

Stage = Literal["loading", "encoding", "denoising", "decoding", "saving", "done"]
LATENTS_SUFFIX = ".latents.pt"


@dataclass(frozen=True)
class ProgressEvent:
    stage: Stage
    step: int = 0
    total: int = 0
    message: str = ""
    eta_s: float | None = None


class Cancelled(Exception):
    """The person pressed Stop; nothing is wrong."""


class RunFailed(RuntimeError):
    """A run could not finish for a reason outside the request (disk full, ...). The message says what to do."""


@dataclass
class RunResult:
    video_path: Path
    sidecar_path: Path
    latents_path: Path | None
    request: GenerationRequest
    plan: Plan
    frames: int
    timings: dict[str, float] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    step_downs: list[dict] = field(default_factory=list)  # every out-of-memory step down, in order
    quant: dict | None = None  # what quantization did (bytes before/after, fallback reason)
    decode: dict | None = None  # the streaming decode's stats (chunks, tiles, its own out-of-memory steps)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchao", "gradio"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def sidecar_path(video_path: Path) -> Path:
    return Path(video_path).with_suffix(".json")


def latents_path(video_path: Path) -> Path:
    return Path(video_path).with_suffix(LATENTS_SUFFIX)


class Runner:
    """Runs requests against a pipeline cache. One run at a time per runner (a lock)."""

    def __init__(self, cache: PipelineCache | None = None, outputs_dir: str | Path = "outputs"):
        self.cache = cache or PipelineCache()
        self.outputs_dir = Path(outputs_dir)
        self.fault_hook: Callable[[str, int], None] | None = None  # tests inject failures here
        self.sentinel = LeakSentinel(held_bytes=lambda device_type: self.cache.weights_on(device_type)[0])
        self.last_leak: LeakReport | None = None
        self._lock = threading.Lock()

    def default_output(self, request: GenerationRequest) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = self.outputs_dir / f"{stamp}_{request.task}_{request.seed}.mp4"
        n = 1
        while base.exists() or sidecar_path(base).exists():  # never overwrite a result
            base = self.outputs_dir / f"{stamp}_{request.task}_{request.seed}-{n}.mp4"
            n += 1
        return base

    def generate(
        self,
        request: GenerationRequest,
        out_path: str | Path | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RunResult:
        emit = _safe_emitter(on_progress)
        with self._lock:
            baseline = self.sentinel.before()
            loads_before = self.cache.loads
            try:
                return self._generate(request, out_path, emit, stop)
            finally:
                # 8. Per-run state is gone with this frame; the sentinel gives the memory back (gc, CUDA
                # cache, heap) and checks it came back to the baseline.
                device_type = "cuda" if baseline[0] == "gpu_allocated" else "cpu"
                self.last_leak = self.sentinel.after(
                    baseline, f"{request.task} {request.model} seed {request.seed}",
                    weight_ids=self.cache.weights_on(device_type)[1],
                    judge=self.cache.loads == loads_before,  # a run that loaded a model is a warm-up
                )

    def _generate(self, request, out_path, emit, stop) -> RunResult:
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        # 1. Check the request (RequestError names the bad value) before anything loads.
        req = resolve_request(request)
        spec = get_model_spec(req.model)
        out = Path(out_path) if out_path else self.default_output(req)
        check_writable(out.parent)
        inputs = self._read_inputs(req)
        warnings: list[str] = []

        # 2. Plan memory: rung, precision, decode settings, with reasons.
        plan = vram_utils.plan(req, spec)
        logger.info("plan: %s", plan.summary)
        if plan.refused:  # needs more than the device has in all: nothing would be produced
            raise RequestError(plan.refused)
        if not plan.fits:  # we still try (estimates have margins), but the person is told what would fit
            warnings += [r for r in plan.reasons if r.startswith("suggestion:")]

        # 3-7, with the out-of-memory ladder.
        lat_path = latents_path(out)
        step_downs: list[StepDown] = []
        with vram_utils.PeakMeter() as meter:
            pipe, stats, plan = self._attempts(req, spec, plan, inputs, out, lat_path, warnings, step_downs,
                                               timings, emit, stop)
        timings["decode_s"] = stats.seconds
        timings["total_s"] = time.perf_counter() - t_start
        quant_result = quant.last_result(pipe.transformer)
        if quant_result is not None and quant_result.reason and quant_result.reason not in warnings:
            warnings.append(quant_result.reason)  # e.g. fp8 fell back to fp8-storage on this GPU

        emit(ProgressEvent("saving", message=f"saving {out.name}"))
        result = RunResult(out, sidecar_path(out), lat_path, req, plan, stats.frames, timings, warnings=warnings)
        # The runner's rungs, then the decode's own (smaller tiles, then smaller chunks) of the attempt that finished.
        result.step_downs = [s.to_dict() for s in [*step_downs, *decode_step_downs(stats)]]
        result.decode = stats.to_dict()
        result.quant = dataclasses.asdict(quant_result) | {"ratio": quant_result.ratio} if quant_result else None
        result.measured = meter.to_dict()
        write_sidecar(result)
        emit(ProgressEvent("done", message=str(out)))
        return result

    def _attempts(self, req, spec, plan, inputs, out, lat_path, warnings, step_downs, timings, emit, stop):
        """Steps 3-7, retried one rung lower after an out-of-memory, from the last safe point."""
        used: dict[str, object] = {}  # the pipeline this run used, once it has one
        try:
            return self._attempt_loop(req, spec, plan, inputs, out, lat_path, warnings, step_downs, timings,
                                      emit, stop, used)
        finally:
            # Seed 001: nothing of a run may stay behind in a cached pipeline (multistep schedulers keep
            # latent-sized tensors until the next run otherwise), whether the run succeeded or not.
            if "pipe" in used:
                quant.drop_run_state(used.pop("pipe"))

    def _attempt_loop(self, req, spec, plan, inputs, out, lat_path, warnings, step_downs, timings, emit, stop,
                      used):
        z = None  # latents in VAE space once denoising is done: the last safe point
        stage = ["loading"]  # where we are, for the recovery ladder
        while True:
            try:
                # 3. Get the pipeline (lazy, LRU, shared parts).
                stage[0] = "loading"
                emit(ProgressEvent("loading", message=f"loading {req.model} ({req.task})"))
                t0 = time.perf_counter()
                pipe = used["pipe"] = self.cache.get(req.model, req.task, req.quant)
                timings.setdefault("load_s", time.perf_counter() - t0)

                # 4. Apply the plan (idempotent: a step-down re-applies it).
                vram_utils.apply_plan(pipe, plan)
                _check_stop(stop)

                if z is None:
                    # 5. Denoise to latents; after an OOM it restarts with the same seed.
                    stage[0] = "encoding"
                    emit(ProgressEvent("encoding", message="encoding prompt"))
                    if not warnings:
                        warnings += prompt_warnings(pipe, req, spec.family)
                    self._fault("encoding", 0)
                    t0 = time.perf_counter()
                    latents = self._denoise(pipe, req, spec.family, inputs, emit, stop, stage)
                    timings["denoise_s"] = time.perf_counter() - t0
                    z = decode.to_vae_latents(pipe, latents, spec.family, req.frames)  # (B, C, F, H, W)
                    del latents

                    # 6. Latents on disk before decode: a decode failure costs only the decode.
                    _save_or_fail(lat_path, z, req)

                # 7. Decode straight into the video file.
                stage[0] = "decoding"
                stats = self._decode(pipe.vae, z, plan.decode, out, req.fps, emit, stop)
            except Exception as exc:
                if not is_oom(exc):
                    if isinstance(exc, OSError):
                        raise RunFailed(
                            f"could not write {out} ({exc.strerror or exc}); nothing half-written was kept. "
                            f"The denoised latents are saved at {lat_path}; free space and decode them again: "
                            f"`python app.py decode --latents {lat_path} --out {out}`"
                        ) from exc
                    raise
                plan = self._step_down(exc, plan, stage[0], step_downs, req, spec, emit)
            else:
                break
            # Out here the failed attempt's traceback, and the tensors its frames pinned, are gone.
            release_memory()
        del z
        return pipe, stats, plan

    def _fault(self, stage: str, index: int) -> None:
        """Test hook: `runner.fault_hook(stage, index)` may raise (e.g. an injected OOM)."""
        if self.fault_hook is not None:
            self.fault_hook(stage, index)

    @staticmethod
    def _step_down(exc, plan: Plan, stage: str, step_downs: list, req, spec, emit) -> Plan:
        nxt = step_down(plan, stage, torch.cuda.is_available())
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if nxt is None:
            tried = "; ".join(s.change for s in step_downs) or "nothing lower was left"
            raise RunFailed(
                f"out of memory while {stage} ({error}). Tried: {tried}. To fit: {fit_suggestion(req, spec, plan)}"
            ) from exc
        plan, change = nxt
        step_downs.append(StepDown(stage, error, change))
        logger.warning("out of memory while %s; retrying with %s", stage, change)
        emit(ProgressEvent(stage, message=f"out of memory while {stage}: retrying with {change}"))
        return plan

    @staticmethod
    def _read_inputs(req: GenerationRequest) -> dict:
        if req.task == "i2v":
            return {"image": load_image(req.image, req.width, req.height)}
        if req.task == "v2v":
            return {"video": load_video(req.video, req.frames, req.width, req.height), "strength": req.strength}
        return {"num_frames": req.frames}

    def _denoise(self, pipe, req: GenerationRequest, family: str, inputs: dict, emit, stop, stage) -> torch.Tensor:
        total = req.steps
        t_loop = [0.0]

        def on_step_end(_pipe, i, _t, callback_kwargs):
            now = time.perf_counter()
            if i == 0:
                t_loop[0] = now
            done = i + 1
            eta = (now - t_loop[0]) / i * (total - done) if i > 0 else None
            stage[0] = "denoising"
            emit(ProgressEvent("denoising", done, total, f"denoising step {done}/{total}", eta))
            self._fault("denoising", done)
            _check_stop(stop)
            return callback_kwargs

        kwargs = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            height=req.height,
            width=req.width,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            generator=torch.Generator("cpu").manual_seed(req.seed),
            output_type="latent",
            callback_on_step_end=on_step_end,
            max_sequence_length=max_sequence_length(pipe, family),
            **inputs,
        )
        if req.task == "i2v":
            kwargs["num_frames"] = req.frames
        with torch.inference_mode():
            return pipe(**kwargs).frames

    def _decode(self, vae, z, settings: DecodeSettings, out: Path, fps: int, emit, stop) -> decode.DecodeStats:
        def on_chunk(j, m):
            emit(ProgressEvent("decoding", j, m, f"decoding chunk {j}/{m}"))
            self._fault("decoding", j)
            _check_stop(stop)

        emit(ProgressEvent("decoding", 0, 0, "decoding"))
        with decode.VideoWriter(out, fps) as writer:
            return decode.stream_decode(vae, z, settings, writer, on_chunk=on_chunk, stop=stop)


def _safe_emitter(on_progress: Callable[[ProgressEvent], None] | None) -> Callable[[ProgressEvent], None]:
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
    if family == "cogvideox":  # must equal the transformer's max_text_seq_length
        return int(pipe.transformer.config.max_text_seq_length)
    return min(512, int(pipe.tokenizer.model_max_length))


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled("stopped by request")


def _save_or_fail(path: Path, z: torch.Tensor, req: GenerationRequest) -> None:
    try:
        save_latents(path, z, req)
    except OSError as exc:
        decode.partial_path(path).unlink(missing_ok=True)
        raise RunFailed(f"could not save the latents to {path} ({exc.strerror or exc}); free space and run again") from exc


def fit_suggestion(req: GenerationRequest, spec, plan: Plan) -> str:
    """What would make the request fit: the planner's suggestions where it made them, else halve the frames."""
    fewer = plan.suggested_frames or spec.snap_frames(max(1, (req.frames - 1) // 2 + 1))
    parts = [f"fewer frames (e.g. --frames {fewer})"] if fewer < req.frames else []
    if plan.suggested_model:
        parts.append(f"a smaller model ({plan.suggested_model})")
    parts.append(f"a smaller size than {req.height}x{req.width}")
    return ", or ".join(parts)


def save_latents(path: Path, z: torch.Tensor, req: GenerationRequest) -> Path:
    tmp = decode.partial_path(path)
    torch.save({"latents": z.detach().cpu(), "request": req.to_dict(), "format": 1}, tmp)
    tmp.replace(path)
    return path


def write_sidecar(result: RunResult) -> Path:
    data = {
        "video": result.video_path.name,
        "latents": result.latents_path.name if result.latents_path else None,
        "frames": result.frames,
        "request": result.request.to_dict(),
        "plan": result.plan.to_dict(),
        "timings": result.timings,
        "predicted": {
            "peak_gpu_bytes": result.plan.predicted_peak_gpu_bytes,
            "peak_host_bytes": result.plan.predicted_peak_host_bytes,
        },
        "measured": result.measured,
        "warnings": result.warnings,
        "step_downs": result.step_downs,
        "decode": result.decode,
        "quant": result.quant,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return decode.write_json_atomic(result.sidecar_path, data)
