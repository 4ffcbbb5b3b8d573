"""What the page's events and the API endpoints share: the per-app state, the page's parts, an upload as a request
field, and one Generate from values to a finished job.

    prepare_request(ctx, task, values)  -> the ResolvedRun a Generate asks for (every refusal here, before a job)
    submit_and_wait(ctx, task, ...)      -> (video, seed, what happened, job id): queue the job, show its progress
    plan_texts(ctx, task, values)        -> (the tab's plan line, the Optimization tab's full plan)
    api_endpoints(ctx)                   -> `/t2v`, `/i2v`, `/v2v`, `/plan_*` for programs (typed by ui/api.py)

Gradio is imported inside the functions only: importing this module costs the CLI nothing.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from configs.schema import GenerationRequest, Plan
    from engine.jobs import Job, JobQueue
    from engine.resolve import ResolvedRun
    from engine.runner import ProgressEvent, Runner
    from ui.gallery import GalleryPanel
    from ui.jobs import JobsPanel
    from ui.optimization import OptimizationPanel
    from ui.task_tab import TaskTab

GPU_QUEUE = "gpu"  # one concurrency group for everything that touches the models: one run at a time
PROGRESS_EVERY_S = 0.4  # the newest progress of a run goes to its page this often
UPLOADS = ("image", "video")
# An event that only updates the page: answered at once, not in the API, no spinner.
HIDDEN = dict(queue=False, api_visibility="private", show_progress="hidden")
# Where the bar stands for stages that report no step count.
STAGE_FRACTION = {"loading": 0.0, "encoding": 0.05, "decoding": 0.9, "saving": 0.98, "finishing": 0.99, "done": 1.0}


@dataclass
class AppContext:
    runner: Runner
    outputs_dir: Path
    default_quant: str = "none"
    models_dir: Path | None = None  # diffusers folders here are listed with the registry models
    context_parallel: int = 1  # processes a request shares its denoise among unless it says (--context-parallel)
    queue: JobQueue | None = None  # every generation is a job here (engine/jobs.py); set by build_app
    # Held by the job worker while a job runs, and by the other actions that touch the models (unload, finishing
    # from the gallery): one of them at a time, as Gradio's GPU queue did when it ran the generations itself.
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class FitVideoApp:
    """The page (app.build_app): the Blocks, its parts, the per-app state. Each part's `listen` wires it."""

    demo: gr.Blocks
    ctx: AppContext
    header: gr.Markdown
    tabs: gr.Tabs
    task_tabs: dict[str, TaskTab]
    optimization: OptimizationPanel
    gallery: GalleryPanel
    active_task: gr.State
    queue_size: int
    jobs: JobsPanel


def start_queue(ctx: AppContext, queue_size: int, workers: list | None = None) -> JobQueue:
    """The job queue on `<outputs>/.queue`, read back after a restart, its workers started (this process's runner,
    or `workers`: Ray's, engine/ray_workers.py)."""
    from engine.jobs import QUEUE_SUBDIR, JobQueue, is_complete, latents_saved, run_job

    queue = JobQueue(ctx.outputs_dir / QUEUE_SUBDIR, lambda job: run_job(ctx.runner, job, ctx.gpu_lock),
                     max_waiting=queue_size, workers=workers)
    queue.notes = queue.recover(is_complete, latents_saved)
    queue.start()
    return queue


# =========================================================================== uploads and request fields


def upload_path(payload: Any) -> str | None:
    """The file behind an upload as our events receive it: unprocessed (gradio's FileData as a dict), or a path."""
    path = payload.get("path") if isinstance(payload, dict) else payload
    return str(path) if path else None


def upload_name(payload: Any) -> str:
    """The name the person knows an upload by (its own file name, not gradio's cache path)."""
    name = payload.get("orig_name") if isinstance(payload, dict) else None
    return name or Path(upload_path(payload) or "?").name


def check_input(task: str, payload: Any, frames: int) -> list[str]:
    """An input image / video read as the run will read it, named as the person knows it: RequestError when the
    run could not use it, else the warnings the run will give (a still video is held for every frame).

    Why here and not in gradio: gr.Image opens every upload with Pillow before our function runs, and what fails
    there reaches the page and API clients only as gradio's hidden-error text ("...has not enabled verbose error
    reporting"). So the events that take an upload do not let gradio process their inputs (`preprocess=False`).
    """
    from engine.media import check_image, check_video

    path, name = upload_path(payload), upload_name(payload)
    if not path:
        return []
    if task == "i2v":
        check_image(path, name=name)
        return []
    return check_video(path, frames, name=name)


def with_upload_paths(values: dict[str, Any], task: str = "t2v", ctx: AppContext | None = None) -> dict[str, Any]:
    """The page's values as request fields: uploads as paths, no second guidance for a model with one transformer
    (its hidden slider still sends a value), and the server's context parallel where the request sets none."""
    values = {**values, **{n: upload_path(values[n]) for n in UPLOADS if n in values}}
    if ctx is not None and values.get("context_parallel") is None:
        values["context_parallel"] = ctx.context_parallel
    if values.get("guidance_2") is not None and not two_experts(values.get("model"), task):
        values["guidance_2"] = None
    return values


def two_experts(model: Any, task: Any) -> bool:
    """Whether the (model, task) pipeline runs two experts (Wan 2.2 A14B t2v / i2v): the second guidance applies."""
    from configs.schema import RequestError, task_experts
    from configs.registry import get_model_spec

    try:
        return task_experts(get_model_spec(str(model)), str(task)) == 2
    except (RequestError, OSError, ValueError):  # an unknown model: resolve_request names it
        return False


# =========================================================================== plans


def preview_request(ctx: AppContext, task: str, values: dict[str, Any]) -> tuple[GenerationRequest, Plan]:
    """The resolved request and the plan the runner would make for it, before anything loads.

    The input image/video does not change the plan, so the preview plans before one is uploaded (the
    file is checked when Generate runs). A random seed (-1) plans as seed 0: the seed does not change it either.
    """
    from engine.resolve import resolve
    from ui.fields import request_from_fields, whole

    seed = 0 if whole(values.get("seed")) == -1 else None
    run = resolve(request_from_fields(task, with_upload_paths(values, task, ctx), seed=seed), check_files=False)
    return run.request, ctx.runner.plan(run)


def plan_texts(ctx: AppContext, task: str, values: dict[str, Any]) -> tuple[str, str]:
    """(one line for the tab, the full plan for the Optimization tab), or why these settings cannot run."""
    from configs.schema import RequestError
    from reports.text import plan_line, plan_markdown

    try:
        req, plan = preview_request(ctx, task, values)
    except RequestError as exc:
        text = f"**Cannot plan these settings:** {exc}"
        return text, text
    return plan_line(plan), plan_markdown(req, plan)


# =========================================================================== one Generate, page and API alike


def prepare_request(ctx: AppContext, task: str, values: dict[str, Any]) -> ResolvedRun:
    """The run a Generate press (or an API call) asks for, resolved once (engine/resolve.py): every refusal here,
    before a job is queued. -1 becomes a real seed; an upload is read under the name the person knows it by, then
    kept next to the outputs so that a result's settings can be reused after a restart."""
    import dataclasses

    from engine.media import persist_input
    from engine.resolve import resolve
    from ui.fields import pick_seed, request_from_fields

    names = {n: upload_name(values[n]) for n in UPLOADS if values.get(n)}
    req = request_from_fields(task, with_upload_paths(values, task, ctx), pick_seed(values.get("seed")))
    run = resolve(req, input_names=names)
    kept = {name: persist_input(getattr(run.request, name), ctx.outputs_dir) for name in UPLOADS}
    return dataclasses.replace(run, request=run.request.replace(**{n: p for n, p in kept.items() if p}))


async def submit_and_wait(ctx: AppContext, task: str, values: dict[str, Any], request, progress) -> tuple:
    """Generate, for the page and the API alike: resolve, queue a job (on disk before it runs), wait for it with
    its progress, and return (video path or None, seed, what happened in markdown, job id)."""
    import gradio as gr

    from configs.schema import RequestError
    from engine.jobs import QueueFull

    # 1. The request, resolved; what the person should know about it shows at once.
    try:
        run = prepare_request(ctx, task, values)
    except (RequestError, OSError) as exc:
        raise gr.Error(str(exc)) from None
    for note in run.notes:
        gr.Warning(note)
    # 2. A job in the server's queue: this page only waits for it and shows its progress; a closed or refreshed page
    # loses nothing (the Jobs panel shows it, and its result).
    try:
        job = ctx.queue.submit(run, ctx.runner.default_output(run), owner=getattr(request, "username", None) or "",
                               session=getattr(request, "session_hash", None) or "")
    except QueueFull as exc:
        raise gr.Error(str(exc)) from None
    try:
        await wait_for_job(ctx.queue, job, progress)
    except asyncio.CancelledError:
        # Gradio cancelled the event (the Stop button's `cancels`, or an API client's job.cancel()): stop
        # the job, and hold this slot until a running one has really ended and released its memory.
        ctx.queue.stop(job.id)
        await asyncio.get_running_loop().run_in_executor(None, job.done.wait)
        raise
    # 3. What happened.
    if job.state == "stopped":
        return None, run.request.seed, stopped_text(job), job.id
    if job.state == "failed":
        raise gr.Error(f"job {job.id}: {job.error}")
    return str(job.result.final_path), job.result.request.seed, done_markdown(ctx, job, run.notes), job.id


def done_markdown(ctx: AppContext, job: Job, notes: list[str]) -> str:
    """A finished job's result, its finishing steps' videos, and its id."""
    from reports.text import result_markdown

    result = job.result
    finished = "".join(f"\n\n{f['step']} x{f['factor']} with {f['method']}: {f['frames_out']} frames, "
                       f"{f['size_out'][0]}x{f['size_out'][1]} at {f['fps_out']:g} fps -> **{Path(f['video']).name}**"
                       for f in result.finishing)
    return result_markdown(result, ctx.outputs_dir, notes) + finished + f"\n\njob `{job.id}`"


async def wait_for_job(queue: JobQueue, job: Job, progress) -> None:
    """Until the job ends: its progress into this page's progress bar (waiting: its place in the queue)."""
    shown: Any = None
    sent_at, stages_shown = 0.0, 0
    while not job.done.is_set():
        event = job.last
        if stages_shown < len(job.stages):  # every stage reaches the page, even one shorter than a poll (a quick load)
            event, stages_shown = job.stages[stages_shown], stages_shown + 1
            shown, sent_at = event, time.monotonic()
            _progress_to_gradio(progress, event)
        elif job.state == "waiting":
            ahead = queue.ahead(job)
            if shown != ahead:
                shown = ahead
                progress(0.0, desc=f"waiting in the queue: {ahead} job{'s' if ahead != 1 else ''} ahead")
        # A new stage shows at once; steps within one at most every PROGRESS_EVERY_S: each update makes Gradio's
        # frontend walk every component that was ever an output, and a 2-core machine's browser falls behind
        elif event is not shown and event is not None and (
                getattr(shown, "stage", None) != event.stage or time.monotonic() - sent_at >= PROGRESS_EVERY_S):
            shown, sent_at = event, time.monotonic()
            _progress_to_gradio(progress, shown)
        await asyncio.sleep(0.1)


def _progress_to_gradio(progress, event: ProgressEvent) -> None:
    desc = event.message or event.stage
    if event.eta_s is not None:
        desc += f" · ETA {event.eta_s:.0f} s"
    if event.total:
        unit = {"denoising": "steps", "finishing": "frames"}.get(event.stage, "chunks")
        progress((event.step, event.total), desc=desc, unit=unit)
    else:
        progress(STAGE_FRACTION.get(event.stage, 0.0), desc=desc)


def stopped_text(job: Job) -> str:
    where = job.last.message if job.last else "before the first step"
    return f"**Stopped** at {where}. Nothing was saved; memory was released; ready."


def api_endpoints(ctx: AppContext) -> list:
    """`/t2v`, `/i2v`, `/v2v` and `/plan_t2v`... for programs, typed by the request's fields (ui/api.py)."""
    import gradio as gr

    from reports.catalog import default_model, model_statuses
    from ui.api import Endpoint, typed, with_defaults

    endpoints = []
    for task in ("t2v", "i2v", "v2v"):
        def filled(values: dict, task=task) -> dict:
            return with_defaults(values, task, default_model(model_statuses(task, ctx.models_dir)), ctx.default_quant)

        async def generate(values, request, task=task, filled=filled):
            video, seed, markdown, job_id = await submit_and_wait(ctx, task, filled(values), request, gr.Progress())
            return ({"path": video, "meta": {"_type": "gradio.FileData"}} if video else None), seed, markdown, job_id

        async def plan(values, request, task=task, filled=filled):
            return plan_texts(ctx, task, filled(values))

        endpoints.append(Endpoint(task, typed(generate, task, tuple[dict | None, int, str, str], f"generate_{task}"),
                                  f"queue a {task} job and wait: (video, seed used, what happened, job id)"))
        endpoints.append(Endpoint(f"plan_{task}", typed(plan, task, tuple[str, str], f"plan_{task}"),
                                  "the memory plan for these settings: (one line, the full plan)", job=False))
    return endpoints
