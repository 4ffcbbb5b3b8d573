"""One place that owns a generation, in numbered steps (see DESIGN.md).

   1. resolve the request (engine/resolve.py)     5. denoise to latents (progress + stop flag per step)
   2. plan memory (engine/planning.py)            6. save latents next to the output
   3. get the pipeline (cache)                    7. stream-decode into the video file
   4. apply the run's modifiers, in one order     8. finally: modifiers off, per-run state dropped, memory freed

A run's state is one `Run` (engine/run.py). Its modifiers (LoRAs, step cache, attention backend, compile, the
offload rung: engine/modifiers.py) go on after the pipeline is fetched and come off when the attempt ends, whatever
way it ends, so the cached pipeline is as it was loaded before the next run: a run's video depends on its
request alone. After an out-of-memory error, steps 3-7 run again one rung lower on the one ladder
(vram_utils/ladder.py), from the last safe point (decode only, once the latents exist), and from where the
streaming decode left off: no rung twice.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Literal

import torch

import decode
import quant
import vram_utils
from configs.schema import GenerationRequest, Plan, RequestError
from engine import modifiers, stepcache
from engine.cache import PipelineCache
from engine.lora import scheduler_shift
from engine.parallel import denoise_together
from engine.preview import PreviewPolicy, preview_image
from engine.recovery import StepDown, decode_step_downs, is_oom
from engine.resolve import ResolvedRun, resolve
from engine.results import sidecar_path
from engine.run import (  # noqa: F401  (ProgressEvent, Cancelled, RunFailed, RunResult: this module's API too)
    Cancelled, ProgressEvent, Run, RunFailed, RunPaths, RunResult, boundary_timestep, check_host_room, check_writable,
    encode_prompt, expert_names, fit_suggestion, max_sequence_length, prompt_warnings, ratios_facts, read_inputs,
    result_of, safe_emitter, save_latents, save_or_fail,
)
from families import get_family
from vram_utils import release_memory
from vram_utils.host_budget import HostMemoryPressure, HostWatch
from vram_utils.ladder import Ladder, step_host
from vram_utils.sentinel import LeakReport, LeakSentinel
from vram_utils.sizes import objects_of_this_run
from vram_utils.timeline import MemoryTimeline, gpu_index_of

logger = logging.getLogger(__name__)


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
        self.last_leftovers: list[str] = []  # what a run left on the cached pipelines (always [] unless a bug)
        self.worker: dict = {}  # a Ray worker's name, node and device (engine/ray_workers.py): into each sidecar
        self._lock = threading.Lock()

    def default_output(self, request: GenerationRequest | ResolvedRun) -> Path:
        request = getattr(request, "request", request)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = self.outputs_dir / f"{stamp}_{request.task}_{request.seed}.mp4"
        n = 1
        while base.exists() or sidecar_path(base).exists():  # never overwrite a result
            base = self.outputs_dir / f"{stamp}_{request.task}_{request.seed}-{n}.mp4"
            n += 1
        return base

    def plan(self, run: GenerationRequest | ResolvedRun, device: "vram_utils.DeviceInfo | None" = None) -> Plan:
        """The complete plan of a run here (engine/planning.py), the weights the cache holds for it counted."""
        from engine.planning import plan_run

        return plan_run(resolve(run, check_files=False), device, self.cache)

    def generate(
        self,
        request: GenerationRequest | ResolvedRun,
        out_path: str | Path | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RunResult:
        """Run one resolved run (a GenerationRequest is resolved first: RequestError before anything loads)."""
        emit = safe_emitter(on_progress)
        resolved = resolve(request)
        # The objects alive now are set aside from the garbage collector's walk until the run ends: its collections
        # (before the decode, the sentinel's) look at what the run made only, 0.5 s less a run (vram_utils/sizes.py).
        with self._lock, objects_of_this_run():
            baseline = self.sentinel.before()
            loads_before = self.cache.loads
            try:
                return self._generate(resolved, out_path, emit, stop)
            finally:
                # 8. Per-run state is gone with this frame; the modifiers are off. The cached pipelines must be as
                # they were loaded, and the sentinel gives the memory back and checks it came back to the baseline.
                self.last_leftovers = self.cache.leftovers()
                for line in self.last_leftovers:
                    logger.error("a run left this on a cached pipeline: %s", line)
                device_type = "cuda" if baseline[0] == "gpu_allocated" else "cpu"
                self.last_leak = self.sentinel.after(
                    baseline, f"{resolved.request.task} {resolved.request.model} seed {resolved.request.seed}",
                    weight_ids=self.cache.weights_on(device_type)[1],
                    judge=self.cache.loads == loads_before,  # a run that loaded a model is a warm-up
                    leftovers=self.last_leftovers,
                )

    def _generate(self, resolved: ResolvedRun, out_path, emit, stop) -> RunResult:
        # 1. What to run is resolved; where it goes must be writable before any work.
        req = resolved.request
        out = Path(out_path) if out_path else self.default_output(req)
        check_writable(out.parent)
        inputs, notes = read_inputs(req)
        run = Run(resolved, RunPaths.beside(out), emit, stop, inputs=inputs, worker=self.worker)
        for note in (*resolved.notes, *notes):  # e.g. a still image given as the video is held for every frame
            run.warn(note)
        if resolved.step_cache.name != "off":
            run.step_cache = stepcache.StepCache(resolved.step_cache, steps=stepcache.denoising_steps(req))

        # 2. Plan memory: rung, precision, decode settings, with reasons.
        run.plan = self.plan(resolved)
        logger.info("plan: %s", run.plan.summary)
        if run.plan.refused:  # needs more than the device has in all: nothing would be produced
            raise RequestError(run.plan.refused)
        if not run.plan.fits:  # we still try (estimates have margins), but the person is told what would fit
            for reason in run.plan.reasons:
                if reason.startswith("suggestion:"):
                    run.warn(reason)

        # 3-7, with the out-of-memory ladder; memory sampled into a timeline with the stages marked, the room under
        # the host limit watched from the same thread (a run nearing it steps down or stops with a message, never
        # killed without a word).
        check_host_room(run.plan, self.cache.resident_bytes(req.model, req.task, req.quant, "cpu"))
        run.watch = HostWatch()
        with MemoryTimeline(gpu_index=gpu_index_of(run.plan.device), peaks=True, watch=run.watch) as timeline:
            run.emit = timeline.tap(run.emit)
            self._attempts(run)
            return self._finish(run, timeline.measured(), timeline)

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
        self._prepare_ratios(run)
        run.pipe = self._load(run)
        run.timings.setdefault("load_s", time.perf_counter() - t0)
        try:
            if run.latents is None and run.ratios_key and run.step_cache.ratios is None:
                self._calibrate(run)  # MagCache's ratios for these settings: one uncached run on fixed inputs
            # 4. The run's modifiers, in their one order (offload last).
            run.mods = modifiers.for_run(run.resolved, run.plan, run.step_cache)
            self._compile_stage(run)
            modifiers.apply_all(run.pipe, run.mods)
            run.check_stop()
            if run.latents is None:
                # 5. Denoise to latents; after an OOM it restarts with the same seed.
                self._denoise(run)
                # 6. Latents on disk before decode: a decode failure costs only the decode.
                save_or_fail(run)
            # 7. Decode straight into the video file.
            run.stage = "decoding"
            run.stats = self._decode(run)
        finally:
            modifiers.remove_all(run.pipe, run.mods)
            run.mods = []

    def _compile_stage(self, run: Run) -> None:
        if any(m.name == "compile" for m in run.mods):
            run.emit(ProgressEvent("compiling", message="compiling the transformer's repeated block (the first run "
                                   "of this model takes minutes; later runs reuse dynamo's cache)"))

    def _fault(self, stage: str, index: int) -> None:
        """Test hook: `runner.fault_hook(stage, index)` may raise (e.g. an injected OOM)."""
        if self.fault_hook is not None:
            self.fault_hook(stage, index)

    # ---------------------------------------------------------------- MagCache's ratios

    def _prepare_ratios(self, run: Run) -> None:
        """MagCache: the key of the ratios for this run's settings, and the ratios when they were calibrated before."""
        if run.step_cache is None or run.step_cache.choice.name != "magcache" or run.ratios_key:
            return
        run.ratios_facts = ratios_facts(run)
        run.ratios_key = stepcache.ratios_key_for(run.spec, run.ratios_facts)
        run.step_cache.ratios = stepcache.load_ratios(run.ratios_key)

    def _calibrate(self, run: Run) -> None:
        """One run with MagCache's calibration hooks (nothing skipped) on fixed inputs, with every other modifier of
        the run on: the ratios are a function of the run's settings, never of which run came first."""
        run.emit(ProgressEvent("denoising", message="calibrating MagCache for these settings: one uncached run on "
                               "fixed inputs; its ratios are kept for later runs"))
        cal = stepcache.StepCache(run.step_cache.choice, steps=run.step_cache.steps, calibrate=True)
        mods = modifiers.for_run(run.resolved, run.plan, cal)
        modifiers.apply_all(run.pipe, mods)
        try:
            kwargs = self._pipe_kwargs(run, calibration=True) | {"callback_on_step_end": cal.calibration_callback()}
            with torch.inference_mode(), scheduler_shift(run.pipe, run.request.shift):
                run.pipe(**kwargs)
            ratios = cal.recorded
            if len(ratios) != cal.steps:
                raise RuntimeError(f"MagCache's calibration recorded {len(ratios)} ratios for {cal.steps} steps")
        finally:
            modifiers.remove_all(run.pipe, mods)
        stepcache.save_ratios(run.ratios_key, ratios, run.ratios_facts)
        run.step_cache.ratios = ratios

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
        if isinstance(exc, HostMemoryPressure) and self._host_step(run, exc):
            return
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

    def _host_step(self, run: Run, exc: HostMemoryPressure) -> bool:
        """Host RAM neared its limit: one host rung down (the text encoder released, then weights from disk) where
        one is left; else, before the decode, stop and say so (a decode has its own rungs: smaller tiles)."""
        nxt = step_host(run.plan)
        if nxt is None and run.stage == "decoding":
            return False
        if nxt is None:
            saved = f"its latents are saved at {run.paths.latents}" if run.paths.latents.exists() else \
                "nothing was saved (the denoise had not finished)"
            raise RunFailed(f"stopped before the memory limit ended the run while {run.stage}: {exc}; no host rung "
                            f"below {run.plan.host_rung} is left; {saved}. To fit: "
                            f"{fit_suggestion(run.request, run.spec, run.plan)}") from exc
        run.plan, change = nxt
        run.step_downs.append(StepDown(run.stage, f"host RAM: {exc}", change))  # type: ignore[arg-type]
        logger.warning("host RAM near its limit while %s (%s); retrying with %s", run.stage, exc, change)
        run.emit(ProgressEvent(run.stage, message=f"host RAM near its limit while {run.stage}: retrying with {change}"))
        return True

    # ---------------------------------------------------------------- the steps

    def _pipe_kwargs(self, run: Run, calibration: bool = False) -> dict:
        """The pipeline call of this run (`calibration`: MagCache's fixed inputs, seed 0, no callback)."""
        req, family = run.request, run.spec.family
        prompt = stepcache.CALIBRATION_PROMPT if calibration else req.prompt
        kwargs = dict(
            prompt=prompt, negative_prompt=None if calibration else req.negative_prompt or None,
            height=req.height, width=req.width, num_inference_steps=req.steps, guidance_scale=req.guidance,
            generator=torch.Generator("cpu").manual_seed(0 if calibration else req.seed), output_type="latent",
            max_sequence_length=max_sequence_length(run.pipe, family),
            **(stepcache.calibration_inputs(req) if calibration else run.inputs),
        )
        if not calibration:
            kwargs["callback_on_step_end"] = self._on_step_end(run)
        if req.task == "i2v":
            kwargs["num_frames"] = req.frames
        embeds = run.embeds.get("calibration" if calibration else "prompt")
        if embeds:  # the text encoder went first and is freed (plan.release_text_encoder)
            kwargs.update(prompt=None, negative_prompt=None, **embeds)
        if boundary_timestep(run.pipe) is not None:  # two experts: the low-noise one's guidance
            kwargs["guidance_scale_2"] = req.guidance_2
        return kwargs

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
        if run.step_cache is not None:
            run.step_cache.reset_counts()  # a denoise run again after an out-of-memory counts afresh
        if run.plan.encoder_device and "prompt" not in run.embeds:  # the text encoder on its own GPU
            embeds = encode_prompt(run.pipe, req, max_sequence_length(run.pipe, family),
                                   device=run.pipe.text_encoder.device)
            denoiser = getattr(run.pipe, expert_names(run.spec, req.task)[0])  # where the embeddings are read
            run.embeds["prompt"] = {k: v.to(denoiser.device) for k, v in embeds.items()}
        kwargs = self._pipe_kwargs(run)
        with torch.inference_mode(), scheduler_shift(run.pipe, req.shift), denoise_together(run, kwargs) as group:
            run.group = group
            try:
                latents = run.pipe(**kwargs).frames
            finally:
                run.group = None
        run.timings["denoise_s"] = time.perf_counter() - t0
        run.latents = decode.to_vae_latents(run.pipe, latents, family, req.frames)

    def _on_step_end(self, run: Run) -> Callable:
        """The pipeline's per-step callback: progress with an ETA, the test hook, the stop flag."""
        total = run.request.steps
        loop_started = 0.0
        boundary = boundary_timestep(run.pipe)  # two experts: t >= boundary is the high-noise expert's step
        policy, family = (PreviewPolicy() if self.previews else None), get_family(run.spec.family)

        def here(pipe, i, t, callback_kwargs):
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
            run.check_memory()
            if boundary is not None and run.plan.experts_in_ram == 1:
                self._next_expert(run, pipe, i, boundary)
            return callback_kwargs

        def on_step_end(pipe, i, t, callback_kwargs):
            if run.group is None:
                return here(pipe, i, t, callback_kwargs)
            try:  # a shared denoise: every helper learns at this step's end whether this process goes on
                out = here(pipe, i, t, callback_kwargs)
            except BaseException:
                run.group.agree(abort=True)
                raise
            run.group.agree(abort=False)
            return out

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
        placement = modifiers.Placement(plan)
        placement.apply(pipe)
        try:
            run.emit(ProgressEvent("encoding", message="encoding prompt (then the text encoder is freed)"))
            # the text length from the model's configs: a CogVideoX pipeline reads it from the transformer, not loaded
            length = get_family(run.spec.family).text_seq_len(run.spec.config)
            run.embeds["prompt"] = encode_prompt(pipe, req, length)
            if run.ratios_key and run.step_cache.ratios is None:  # MagCache will calibrate on its fixed prompt
                run.embeds["calibration"] = encode_prompt(
                    pipe, req.replace(prompt=stepcache.CALIBRATION_PROMPT, negative_prompt=""), length)
        finally:
            placement.remove(pipe)
        return self.cache.get(*key, without=("text_encoder", *later))

    def _next_expert(self, run: Run, pipe, i: int, boundary: float) -> None:
        """One expert in RAM: after the last high-noise step, free the high-noise expert (the cache drops it, its
        memory goes first) and load the low-noise one; the loop reads the second expert at its next step."""
        timesteps = pipe.scheduler.timesteps
        high, low = expert_names(run.spec, run.request.task)[:2]
        if getattr(pipe, low) is not None or i + 1 >= len(timesteps) or timesteps[i + 1] >= boundary:
            return
        req = run.request
        run.emit(ProgressEvent("denoising", i + 1, req.steps, "switching experts: freeing the high-noise expert, "
                               "loading the low-noise one"))
        for m in run.mods:  # the expert about to be freed: no modifier may keep its weights alive
            if hasattr(m, "forget"):
                m.forget(getattr(pipe, high))
        with torch.inference_mode(False):  # weights loaded here are kept past this run: no inference tensors
            loaded = self.cache.get(req.model, req.task, req.quant, without=(high,))
        if loaded is not pipe:  # the cache let go of this pipeline mid-run (unloaded): hand the expert over
            pipe.register_modules(**{high: None, low: getattr(loaded, low)})
        with torch.inference_mode(False):
            modifiers.apply_all(pipe, run.mods)  # the new expert gets the run's modifiers, the offload rung last

    def _decode(self, run: Run) -> decode.DecodeStats:
        started = time.perf_counter()

        def on_chunk(j, m):
            eta = (time.perf_counter() - started) / j * (m - j) if j else None
            run.emit(ProgressEvent("decoding", j, m, f"decoding chunk {j}/{m}", eta))
            self._fault("decoding", j)
            run.check_stop()
            run.check_memory()

        run.emit(ProgressEvent("decoding", 0, 0, "decoding"))
        # The decode steps down its own rungs only once no offload rung is left: the ladder's order.
        own_rungs = self.ladder_for(run).next_offload(run.plan.offload) is None
        run.stream = decode.StreamingDecode(run.pipe.vae, run.latents, run.plan.decode, step_down=own_rungs)
        with decode.VideoWriter(run.paths.video, run.request.fps) as writer:
            stats = run.stream.write_to(writer, on_chunk=on_chunk, stop=run.stop)
        run.stream = None
        return stats

    def _finish(self, run: Run, measured: dict[str, int], timeline: MemoryTimeline | None = None) -> RunResult:
        """Timings, warnings, the RunResult and its sidecar, then the finishing steps."""
        run.timings["decode_s"] = run.stats.seconds
        run.timings["total_s"] = time.perf_counter() - run.started
        run.emit(ProgressEvent("saving", message=f"saving {run.paths.video.name}"))
        result = result_of(run, measured, timeline.to_dict() if timeline is not None else None)
        # 9. Finishing steps (upscale, interpolate): new files beside the video, which is kept as it is.
        if self._finishing(run, result):
            result.update(memory_timeline=timeline.to_dict() if timeline is not None else None)
        run.emit(ProgressEvent("done", message=str(result.final_path)))
        return result

    def _finishing(self, run: Run, result: RunResult) -> bool:
        """The run's finishing steps on the finished video; a failed step is a warning (the video stays).
        Stop ends them within one frame. The upscaler is held in the pipeline cache like a pipeline."""
        from engine.finishing import run_step

        current = result.video_path
        for step in run.resolved.finishing:
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
        return bool(run.resolved.finishing)
