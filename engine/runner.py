"""One place that owns a generation, in numbered steps (see DESIGN.md).

   1. check the request            5. denoise to latents (progress + stop flag per step)
   2. plan memory                  6. save latents next to the output
   3. get the pipeline (cache)     7. stream-decode into the video file
   4. apply the plan               8. finally: drop per-run state, free memory

A run's state is one `Run`: the request, its plan, its paths, where it is, what it warned about and stepped
down, its timings, progress and stop, and the pipeline and latents once it has them. After an out-of-memory
error, steps 3-7 run again one rung lower on the one ladder (vram_utils/ladder.py), from the last safe point
(decode only, once the latents exist), and from where the streaming decode left off: no rung twice.
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
import quant
import vram_utils
from configs.schema import (
    GenerationRequest, ModelSpec, Plan, RequestError, get_model_spec, resolve_request, task_experts,
)
from families import get_family
from engine import attention
from engine import stepcache
from engine.cache import PipelineCache
from engine.lora import apply_loras, lora_reason, resolve_loras, scheduler_shift, with_lora_params
from engine.media import load_image, read_video
from engine.preview import PreviewPolicy, preview_image
from engine.recovery import StepDown, decode_step_downs, is_oom
from engine.results import SavedLatents, Sidecar, latents_path, sidecar_path, versions
from vram_utils import release_memory
from vram_utils.ladder import Ladder
from vram_utils.sentinel import LeakReport, LeakSentinel
from vram_utils.timeline import MemoryTimeline, gpu_index_of

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
    experts: dict | None = None  # two-expert models: boundary, the first low-noise step, both guidances
    finishing: list[dict] = field(default_factory=list)  # finishing steps (upscale, interpolate), in order
    loras: list[dict] = field(default_factory=list)  # the LoRAs applied (engine/lora.py ActiveLora.record)
    memory_timeline: dict | None = None  # RSS / GPU samples with stage marks (vram_utils/timeline.py)
    step_cache: dict | None = None  # the step cache and its counts: blocks computed of those called

    @property
    def final_path(self) -> Path:
        """The finished video: the last finishing step's output, else the decoded video."""
        return Path(self.finishing[-1]["video"]) if self.finishing else self.video_path


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
    """One generation's state, owned by the Runner from the checked request to the written sidecar."""

    request: GenerationRequest  # resolved: no default left open
    spec: ModelSpec
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
    latents: torch.Tensor | None = None  # (B, C, F, H, W) in VAE space once denoised: the last safe point
    stream: decode.StreamingDecode | None = None  # the decode under way (or the one that just failed)
    stats: decode.DecodeStats | None = None  # the finished decode's
    # The text encoder run first and freed (plan.release_text_encoder): the prompt's embeddings, kept for retries.
    embeds: dict = field(default_factory=dict)
    switch_step: int | None = None  # two-expert models: index of the first low-noise denoising step
    loras: tuple = ()  # the request's LoRAs, found and checked (engine/lora.py ActiveLora)
    step_cache: tuple = ("off", None)  # (name, threshold) of the run's step cache (engine/stepcache.py)
    cache_state: Any = None  # the applied step cache's state (its counters go to the sidecar)

    def check_stop(self) -> None:
        _check_stop(self.stop)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


class Runner:
    """Runs requests against a pipeline cache. One run at a time per runner (a lock)."""

    def __init__(self, cache: PipelineCache | None = None, outputs_dir: str | Path = "outputs"):
        self.cache = cache or PipelineCache()
        self.outputs_dir = Path(outputs_dir)
        self.fault_hook: Callable[[str, int], None] | None = None  # tests inject failures here
        # The ladder out-of-memory recovery walks: None = the plan's device's. Tests set "cuda" to walk the
        # GPU ladder's offload rungs on a CPU-only machine, where those rungs run (onloading to the CPU).
        self.ladder_backend: Literal["cuda", "cpu"] | None = None
        # Latent previews while denoising (engine/preview.py), at most 5 % of the step time; the app's
        # Optimization tab switches them; the CLI, which cannot show them, turns them off.
        self.previews = True
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

    def plan(self, request: GenerationRequest, device: "vram_utils.DeviceInfo | None" = None) -> Plan:
        """The memory plan for a resolved request here, counting the weights the pipeline cache already
        holds for it on the device as available (a second run of a cached model needs no second copy), with
        an upscale finishing step as a stage of its own (engine/finishing.py)."""
        from engine.finishing import with_finishing

        active = resolve_loras(request.loras, get_model_spec(request.model), request.task)
        spec = with_lora_params(get_model_spec(request.model), active)  # adapters count with their layers
        info = device if device is not None else vram_utils.probe()
        device_type = "cuda" if info.cuda and info.gpus else "cpu"
        resident = self.cache.resident_bytes(request.model, request.task, request.quant, device_type)
        resident_host = self.cache.resident_bytes(request.model, request.task, request.quant, "cpu")  # RAM budget
        plan = vram_utils.plan(request, spec, info, resident_bytes=resident, resident_host_bytes=resident_host)
        name, threshold, _ = stepcache.resolve_step_cache(request, spec)
        if name != "off":
            from vram_utils.archs import arch_for
            from vram_utils.estimate import step_cache_bytes, workload_for

            kept = step_cache_bytes(arch_for(spec, request.task), workload_for(request, spec).replace(step_cache=name))
            note = stepcache.plan_note(name, threshold, request.steps or 1, kept)
            plan = plan.replace(reasons=(*plan.reasons, note), summary=f"{plan.summary}, step cache {name}")
        if active:
            plan = plan.replace(reasons=(*plan.reasons, lora_reason(active, spec)),
                                summary=f"{plan.summary}, {len(active)} LoRA{'s' if len(active) > 1 else ''}")
        return with_finishing(plan, request)

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

    def _generate(self, request: GenerationRequest, out_path, emit, stop) -> RunResult:
        # 1. Check the request (RequestError names the bad value) before anything loads.
        req = resolve_request(request)
        out = Path(out_path) if out_path else self.default_output(req)
        check_writable(out.parent)
        inputs, notes = self._read_inputs(req)
        run = Run(req, get_model_spec(req.model), RunPaths.beside(out), emit, stop, inputs=inputs)
        run.loras = resolve_loras(req.loras, run.spec, req.task)  # LoraError names a missing or unfitting one
        name, threshold, note = stepcache.resolve_step_cache(req, run.spec)
        run.step_cache = (name, threshold)
        if note:
            run.warn(note)
        attention.resolve_backend(req.attention)  # RequestError where it cannot run here
        for note in notes:  # e.g. a still image given as the video is held for every frame
            run.warn(note)

        # 2. Plan memory: rung, precision, decode settings, with reasons.
        run.plan = self.plan(req)
        if req.compile and attention.compile_problem_for(run.spec, run.plan.device):
            raise RequestError(f"compile=True: {attention.compile_problem_for(run.spec, run.plan.device)}")
        logger.info("plan: %s", run.plan.summary)
        if run.plan.refused:  # needs more than the device has in all: nothing would be produced
            raise RequestError(run.plan.refused)
        if not run.plan.fits:  # we still try (estimates have margins), but the person is told what would fit
            for reason in run.plan.reasons:
                if reason.startswith("suggestion:"):
                    run.warn(reason)

        # 3-7, with the out-of-memory ladder; memory sampled into a timeline with the stages marked.
        with MemoryTimeline(gpu_index=gpu_index_of(run.plan.device)) as timeline:
            run.emit = timeline.tap(run.emit)
            with vram_utils.PeakMeter() as meter:
                self._attempts(run)
            return self._finish(run, meter.to_dict(), timeline)

    def _attempts(self, run: Run) -> None:
        """Steps 3-7, retried one rung lower after an out-of-memory, from the last safe point."""
        try:
            while True:
                try:
                    self._attempt(run)
                    break
                except Exception as exc:
                    self._recover(run, exc)  # raises unless a rung is left
                # Out here the failed attempt's traceback, and the tensors its frames pinned, are gone.
                release_memory()
        finally:
            run.latents = run.stream = None
            # Seed 001: nothing of a run may stay behind in a cached pipeline (multistep schedulers keep
            # latent-sized tensors until the next run otherwise), whether the run succeeded or not.
            if run.pipe is not None:
                quant.drop_run_state(run.pipe)

    def _attempt(self, run: Run) -> None:
        req = run.request
        # 3. Get the pipeline (lazy, LRU, shared parts).
        run.stage = "loading"
        run.emit(ProgressEvent("loading", message=f"loading {req.model} ({req.task})"))
        t0 = time.perf_counter()
        run.pipe = self._load(run)
        apply_loras(run.pipe, run.loras)  # adapters swapped on the cached transformer(s); offload hooks come off
        if not stepcache.needs_calibration(run.pipe, run.step_cache[0]):  # else _denoise calibrates it first
            run.cache_state = stepcache.apply_step_cache(run.pipe, *run.step_cache, steps=req.steps)
        attention.apply_attention_backend(run.pipe, req.attention)
        if req.compile and attention.needs_compile(run.pipe):
            run.emit(ProgressEvent("compiling", message="compiling the transformer's repeated block (first run of "
                                   "this model: its first steps take minutes; later runs reuse it)"))
            attention.compile_regions(run.pipe, run.plan.device)
        run.timings.setdefault("load_s", time.perf_counter() - t0)

        # 4. Apply the plan (idempotent: a step-down re-applies it).
        vram_utils.apply_plan(run.pipe, run.plan)
        run.check_stop()

        if run.latents is None:
            # 5. Denoise to latents; after an OOM it restarts with the same seed.
            self._denoise(run)
            # 6. Latents on disk before decode: a decode failure costs only the decode.
            _save_or_fail(run)

        # 7. Decode straight into the video file.
        run.stage = "decoding"
        run.stats = self._decode(run)

    def _fault(self, stage: str, index: int) -> None:
        """Test hook: `runner.fault_hook(stage, index)` may raise (e.g. an injected OOM)."""
        if self.fault_hook is not None:
            self.fault_hook(stage, index)

    # ---------------------------------------------------------------- out of memory

    def ladder_for(self, run: Run) -> Ladder:
        """The ladder of this run: offload rungs only where they free memory (a CUDA plan), chunk rungs
        from the family's own decode chunk, tile rungs that change something at this frame size."""
        backend = self.ladder_backend or ("cuda" if run.plan.device.startswith("cuda") else "cpu")
        frame_px = (run.request.height, run.request.width)
        if run.pipe is None:
            return Ladder(cuda=backend == "cuda", frame_px=frame_px)
        return decode.decode_ladder(run.pipe.vae, frame_px, cuda=backend == "cuda")

    def _recover(self, run: Run, exc: Exception) -> None:
        """Raise what cannot be recovered from; after an out-of-memory, lower `run.plan` one rung."""
        if not is_oom(exc):
            if isinstance(exc, OSError):
                lat = run.paths.latents
                raise RunFailed(
                    f"could not write {run.paths.video} ({exc.strerror or exc}); nothing half-written was kept. "
                    f"The denoised latents are saved at {lat}; free space and decode them again: "
                    f"`python app.py decode --latents {lat} --out {run.paths.video}`"
                ) from exc
            raise exc
        ladder = self.ladder_for(run)
        if run.stream is not None:
            # The decode's own rungs are behind the run now: record them, and go on from where it ended.
            run.step_downs += decode_step_downs(run.stream)
            run.plan = run.plan.replace(decode=run.stream.position)
            run.stream = None
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        nxt = ladder.step(run.plan, run.stage)  # type: ignore[arg-type]
        if nxt is None:
            left = "nothing lower was left" if ladder.cuda else "nothing: without a GPU no lower rung frees host RAM"
            tried = "; ".join(s.change for s in run.step_downs) or left
            raise RunFailed(
                f"out of memory while {run.stage} ({error}). Tried: {tried}. "
                f"To fit: {fit_suggestion(run.request, run.spec, run.plan)}"
            ) from exc
        run.plan, change = nxt
        run.step_downs.append(StepDown(run.stage, error, change))  # type: ignore[arg-type]
        logger.warning("out of memory while %s; retrying with %s", run.stage, change)
        run.emit(ProgressEvent(run.stage, message=f"out of memory while {run.stage}: retrying with {change}"))

    # ---------------------------------------------------------------- the steps

    @staticmethod
    def _read_inputs(req: GenerationRequest) -> tuple[dict, list[str]]:
        """The pipeline's input arguments, and what the person should know about the inputs."""
        if req.task == "i2v":
            return {"image": load_image(req.image, req.width, req.height)}, []
        if req.task == "v2v":
            video, notes = read_video(req.video, req.frames, req.width, req.height)
            return {"video": video, "strength": req.strength}, notes
        return {"num_frames": req.frames}, []

    def _denoise(self, run: Run) -> None:
        """Encode the prompt and denoise; `run.latents` ends in VAE space, (B, C, F, H, W)."""
        req, family = run.request, run.spec.family
        run.stage = "encoding"
        run.emit(ProgressEvent("encoding", message="encoding prompt"))
        if not run.prompt_checked:  # once per run, whatever else the run has warned about
            for message in prompt_warnings(run.pipe, req, family):
                run.warn(message)
            run.prompt_checked = True
        self._fault("encoding", 0)
        t0 = time.perf_counter()
        kwargs = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            height=req.height,
            width=req.width,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            generator=torch.Generator("cpu").manual_seed(req.seed),
            output_type="latent",
            callback_on_step_end=self._on_step_end(run),
            max_sequence_length=max_sequence_length(run.pipe, family),
            **run.inputs,
        )
        if req.task == "i2v":
            kwargs["num_frames"] = req.frames
        if run.embeds:  # the text encoder went first and is freed (plan.release_text_encoder)
            kwargs.update(prompt=None, negative_prompt=None, **run.embeds)
        if boundary_timestep(run.pipe) is not None:  # two experts: the low-noise one's guidance
            kwargs["guidance_scale_2"] = req.guidance_2
        if stepcache.needs_calibration(run.pipe, run.step_cache[0]):
            self._calibrate_magcache(run, kwargs)
        with torch.inference_mode(), scheduler_shift(run.pipe, req.shift):
            latents = run.pipe(**kwargs).frames
        run.timings["denoise_s"] = time.perf_counter() - t0
        run.latents = decode.to_vae_latents(run.pipe, latents, family, req.frames)

    def _calibrate_magcache(self, run: Run, kwargs: dict) -> None:
        """MagCache's first run on a model: one uncached run records its ratios (kept for later runs)."""
        run.emit(ProgressEvent("denoising", message="calibrating MagCache for this model: one uncached run, "
                               "its ratios are kept for later runs"))
        call = {k: v for k, v in kwargs.items() if k not in ("num_inference_steps", "callback_on_step_end",
                                                              "generator")}
        with torch.inference_mode(), scheduler_shift(run.pipe, run.request.shift):
            stepcache.calibrate_magcache(run.pipe, run.request.steps, generator=torch.Generator("cpu").manual_seed(
                run.request.seed), **call)
        run.cache_state = stepcache.apply_step_cache(run.pipe, *run.step_cache, steps=run.request.steps)
        vram_utils.apply_plan(run.pipe, run.plan)  # the cache hooks went on under the offload hooks

    def _on_step_end(self, run: Run) -> Callable:
        """The pipeline's per-step callback: progress with an ETA, the test hook, the stop flag."""
        total = run.request.steps
        loop_started = 0.0
        boundary = boundary_timestep(run.pipe)  # two experts: t >= boundary is the high-noise expert's step
        policy, family = (PreviewPolicy() if self.previews else None), get_family(run.spec.family)

        def on_step_end(pipe, i, t, callback_kwargs):
            nonlocal loop_started
            now = time.perf_counter()
            if i == 0:
                loop_started = now
            done = i + 1
            eta = (now - loop_started) / i * (total - done) if i > 0 else None
            run.stage = "denoising"
            expert = "" if boundary is None else " · high-noise expert" if t >= boundary else " · low-noise expert"
            if expert == " · low-noise expert" and run.switch_step is None:
                run.switch_step = i
            image = policy.maybe(i, preview_image, callback_kwargs["latents"], family, pipe=pipe) if policy else None
            run.emit(ProgressEvent("denoising", done, total, f"denoising step {done}/{total}{expert}", eta, image))
            self._fault("denoising", done)
            run.check_stop()
            if boundary is not None and run.plan.experts_in_ram == 1:
                self._next_expert(run, pipe, i, boundary)
            return callback_kwargs

        return on_step_end

    def _load(self, run: Run):
        """Step 3 with the plan's host-RAM flags. `release_text_encoder`: the pipeline without its transformers
        encodes the prompt, then the text encoder is freed before they load. `experts_in_ram == 1`: only the
        high-noise expert loads; the low-noise one replaces it at the switch (`_next_expert`)."""
        req, plan = run.request, run.plan
        key = (req.model, req.task, req.quant)
        experts = expert_names(run.spec, req.task)
        later = experts[1:] if plan.experts_in_ram == 1 else ()
        if not plan.release_text_encoder or run.embeds or run.latents is not None:
            return self.cache.get(*key, without=later)
        pipe = self.cache.get(*key, without=experts)
        vram_utils.apply_plan(pipe, plan)
        run.emit(ProgressEvent("encoding", message="encoding prompt (then the text encoder is freed)"))
        # the text length from the model's configs: a CogVideoX pipeline reads it from the transformer, not loaded yet
        run.embeds = encode_prompt(pipe, req, get_family(run.spec.family).text_seq_len(run.spec.config))
        return self.cache.get(*key, without=("text_encoder", *later))

    def _next_expert(self, run: Run, pipe, i: int, boundary: float) -> None:
        """One expert in RAM: after the last high-noise step, free the high-noise expert (the cache drops it, its
        memory goes first) and load the low-noise one; the loop reads `pipe.transformer_2` at its next step."""
        timesteps = pipe.scheduler.timesteps
        if pipe.transformer_2 is not None or i + 1 >= len(timesteps) or timesteps[i + 1] >= boundary:
            return
        req = run.request
        run.emit(ProgressEvent("denoising", i + 1, req.steps, "switching experts: freeing the high-noise expert, "
                               "loading the low-noise one"))
        with torch.inference_mode(False):  # weights loaded here are kept past this run: no inference tensors
            loaded = self.cache.get(req.model, req.task, req.quant, without=("transformer",))
        if loaded is not pipe:  # the cache let go of this pipeline mid-run (unloaded): hand the expert over
            pipe.register_modules(transformer=None, transformer_2=loaded.transformer_2)
        with torch.inference_mode(False):
            apply_loras(pipe, run.loras)  # the low-noise expert's own adapters and strengths
        vram_utils.apply_plan(pipe, run.plan)  # the new expert joins the offload rung

    def _decode(self, run: Run) -> decode.DecodeStats:
        def on_chunk(j, m):
            run.emit(ProgressEvent("decoding", j, m, f"decoding chunk {j}/{m}"))
            self._fault("decoding", j)
            run.check_stop()

        run.emit(ProgressEvent("decoding", 0, 0, "decoding"))
        # The decode steps down its own rungs only once no offload rung is left: the ladder's order.
        own_rungs = self.ladder_for(run).next_offload(run.plan.offload) is None
        run.stream = decode.StreamingDecode(run.pipe.vae, run.latents, run.plan.decode, step_down=own_rungs)
        with decode.VideoWriter(run.paths.video, run.request.fps) as writer:
            stats = run.stream.write_to(writer, on_chunk=on_chunk, stop=run.stop)
        run.stream = None
        return stats

    def _finish(self, run: Run, measured: dict[str, int], timeline: MemoryTimeline | None = None) -> RunResult:
        """Timings, warnings, the RunResult and its sidecar."""
        stats, paths = run.stats, run.paths
        run.timings["decode_s"] = stats.seconds
        run.timings["total_s"] = time.perf_counter() - run.started
        expert = run.pipe.transformer if run.pipe.transformer is not None else getattr(run.pipe, "transformer_2", None)
        quant_result = quant.last_result(expert)
        if quant_result is not None and quant_result.reason:
            run.warn(quant_result.reason)  # e.g. fp8 fell back to fp8-storage on this GPU

        run.emit(ProgressEvent("saving", message=f"saving {paths.video.name}"))
        result = RunResult(paths.video, paths.sidecar, paths.latents, run.request, run.plan, stats.frames,
                           run.timings, measured, run.warnings)
        # The runner's rungs (and those of failed decodes), then the decode's own of the attempt that finished.
        result.step_downs = [s.to_dict() for s in [*run.step_downs, *decode_step_downs(stats)]]
        result.decode = stats.to_dict()
        result.experts = experts_record(run)
        result.loras = [dict(a.record) for a in run.loras]
        result.memory_timeline = timeline.to_dict() if timeline is not None else None
        result.step_cache = run.cache_state.stats() if run.cache_state is not None and run.cache_state.name != "off" \
            else None
        result.quant = dataclasses.asdict(quant_result) | {"ratio": quant_result.ratio} if quant_result else None
        write_sidecar(result)
        # 9. Finishing steps (upscale, interpolate): new files beside the video, which is kept as it is.
        if self._finishing(run, result):
            result.memory_timeline = timeline.to_dict() if timeline is not None else None
            write_sidecar(result)
        run.emit(ProgressEvent("done", message=str(result.final_path)))
        return result

    def _finishing(self, run: Run, result: RunResult) -> bool:
        """The request's finishing steps on the finished video; a failed step is a warning (the video stays).
        Stop ends them within one frame. The upscaler is held in the pipeline cache like a pipeline."""
        from engine.finishing import run_step, steps_from_request

        current = result.video_path
        for step in steps_from_request(run.request):
            run.stage = "finishing"

            def on_frame(i: int, n: int, message: str) -> None:
                run.emit(ProgressEvent("finishing", i, n, message))
                run.check_stop()

            try:
                done = run_step(current, step, self.cache, on_frame)
            except Cancelled:
                raise
            except Exception as exc:  # the decoded video is safe on disk: say what failed and keep it
                logger.exception("%s failed", step.step)
                run.warn(f"{step.step} x{step.factor} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"the video without it is {current.name}")
                break
            result.finishing.append(done.to_dict())
            for note in done.notes:
                run.warn(note)
            current = Path(done.video)
        return bool(result.finishing) or bool(steps_from_request(run.request))


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
    """Text tokens the family's pipeline encodes (families/: CogVideoX's must equal the transformer's)."""
    return get_family(family).max_sequence_length(pipe)


def boundary_timestep(pipe) -> float | None:
    """Two-expert pipelines (Wan 2.2 A14B): the timestep at and above which the high-noise expert runs, as the
    pipeline computes it (boundary_ratio * num_train_timesteps); None for one transformer."""
    ratio = pipe.config.get("boundary_ratio") if "transformer_2" in pipe.config else None
    return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps


def expert_names(spec: ModelSpec, task: str) -> tuple[str, ...]:
    """The transformers of a (model, task) pipeline, in the order they run."""
    return ("transformer", "transformer_2") if task_experts(spec, task) == 2 else ("transformer",)


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


def encode_prompt(pipe, req: GenerationRequest, max_length: int) -> dict:
    """The prompt's (and the negative prompt's) embeddings, as the pipeline itself makes them."""
    with torch.inference_mode():
        embeds, negative = pipe.encode_prompt(
            prompt=req.prompt, negative_prompt=req.negative_prompt or None, do_classifier_free_guidance=True,
            max_sequence_length=max_length, device=pipe._execution_device,
        )
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled("stopped by request")


def _save_or_fail(run: Run) -> None:
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


def write_sidecar(result: RunResult) -> Path:
    """The run's sidecar, in the one sidecar format (results.Sidecar)."""
    return Sidecar(
        video=result.video_path.name,
        request=result.request,
        latents=result.latents_path.name if result.latents_path else None,
        frames=result.frames,
        plan=result.plan,
        decode_settings=result.plan.decode,
        decode=result.decode,
        timings=result.timings,
        measured=result.measured,
        warnings=result.warnings,
        step_downs=result.step_downs,
        quant=result.quant,
        experts=result.experts,
        versions=versions(),
        finishing=result.finishing,
        loras=result.loras,
        memory_timeline=result.memory_timeline,
        step_cache=result.step_cache,
    ).write(result.sidecar_path)
