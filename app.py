"""FitVideo: `python app.py` launches the web UI; `python app.py generate ...` runs headless.

Thin by design: it builds the Gradio Blocks or hands the CLI flags to
ui.cli. No model loads until Generate is pressed. This is the only
module that imports gradio (and only inside functions, so the CLI never pays for it).

Layout (facefusion style): each part of the page is rendered by one `render_*`
function that returns its components in a dataclass, and wired by one `listen_*`
function. Option lists come from the `Literal` types in configs.schema. What is not UI lives below:
the model list in reports.catalog, fields <-> request in ui.fields (the CLI shares
both), the text shown in reports.text, past results in engine.results, input files
in engine.media.

    build_app(runner)  -> FitVideoApp (the Blocks, its parts, the per-app state)
    serve(app, ...)    -> URL (launch with the queue, auth, upload cap and allowed paths)
    main(argv)         -> the `python app.py` entry point (flags, or the CLI subcommands)
"""
import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:  # gradio is imported lazily: the CLI subcommands never load it
    import gradio as gr

    from configs.schema import GenerationRequest, Plan
    from reports.catalog import ModelStatus
    from engine.jobs import Job, JobQueue
    from engine.runner import ProgressEvent, Runner

CLI_COMMANDS = ("generate", "decode", "upscale", "interpolate")
logger = logging.getLogger("fitvideo")

GPU_QUEUE = "gpu"  # one concurrency group for everything that touches the models: one run at a time
DEFAULT_QUEUE_SIZE = 16  # waiting jobs beyond this are refused ("queue full") instead of piling up
DEFAULT_MAX_UPLOAD = "200mb"  # per uploaded file (images, input videos)
PAGE_REFRESH_S = 2.0  # one timer for the page: the Jobs panel, the memory panels (the live chart: LIVE_REFRESH_S)
STEP_CACHE_CHOICES = [  # (label, value); "" = the motion preset's (fast: TaylorSeer)
    ("the preset's (fast: TaylorSeer)", ""), ("off", "off"), ("first-block (threshold 0.05)", "first-block"),
    ("TaylorSeer (interval 5)", "taylorseer"), ("MagCache (threshold 0.06; first run calibrates)", "magcache"),
    ("Pyramid Attention Broadcast (CogVideoX)", "pab"), ("FasterCache (CogVideoX)", "fastercache"),
]
SELECT_TAB_JS = """(task) => { const name = task.toUpperCase();
  const button = [...document.querySelectorAll('button[role=tab]')].find(b => b.innerText.trim() === name);
  if (button) button.click(); return []; }"""
PROGRESS_EVERY_S = 0.4  # the newest progress of a run goes to its page this often
LIVE_REFRESH_S = 6.0  # the live memory chart (a redraw costs the browser more than the table)
STOP_WAIT_S = 60.0  # how long Stop waits for the run to reach its next step before answering
DEFAULT_PROMPT = "a cat walks on the beach at sunset, cinematic"  # so the very first click works

PRECISION_LABELS = {  # keys: configs.schema.Quant
    "none": "bf16 / fp16 (model default, no quantization)",
    "fp8": "FP8 weights, per-row scaled (torchao; compute capability ≥ 8.9, else fp8 storage)",
    "int8": "INT8 weight-only (torchao)",
    "fp8-storage": "FP8 storage (weights kept in fp8, computed in bf16)",
}
OFFLOAD_LABELS = {  # keys: configs.schema.OffloadChoice
    "auto": "auto (the planner picks the fastest rung that fits)",
    "none": "none: everything on the GPU",
    "model": "model: whole components move in and out",
    "group": "group: block-level offload with CUDA streams",
    "sequential": "sequential: leaf-level offload (slowest, smallest)",
}
TILING_HELP = (
    "With the defaults (on, 272 / 272 / 144 / 128) the planner picks the decode's tiles: none when the whole frame "
    "fits, else the largest tiles that fit with the same overlap (fewer pixels through the decoder: faster), and "
    "272 px tiles with a 144 x 128 px stride only when memory demands it. Any other tile values, tiling off, or "
    "\"Tiles as set\" (these tiles exactly, even at the defaults) are used as set. Tile size is the largest tile "
    "and tile - stride the smallest overlap."
)
CSS = """
.fv-plan table, .fv-memory table { font-size: 0.9em; }
.fv-header { margin-bottom: 0; }
"""


# =========================================================================== launch flags


def build_launch_parser() -> argparse.ArgumentParser:
    from ui.cli import add_precision_flags

    p = argparse.ArgumentParser(prog="app.py", description="FitVideo web UI (or: app.py generate --help)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true", help="serve on all network interfaces (needs --auth)")
    p.add_argument("--share", action="store_true", help="create a public Gradio link (needs --auth)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--insecure", action="store_true", help="allow --listen/--share without --auth")
    p.add_argument("--max-cache-size", type=int, default=None, help="pipelines kept loaded (default 2)")
    p.add_argument(
        "--models-dir", default=None, metavar="DIR",
        help="diffusers model folders here are listed with the registry models (default $FITVIDEO_HOME/models)",
    )
    p.add_argument("--outputs-dir", default="outputs", help="where videos and their JSON sidecars go")
    p.add_argument("--loras-dir", default=None, metavar="DIR",
                   help="LoRA .safetensors files here are offered for the models they fit (default $FITVIDEO_HOME/loras)")
    p.add_argument(
        "--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help="waiting jobs before new ones are refused"
    )
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE=1)")
    add_precision_flags(p)
    return p


def check_launch_args(args: argparse.Namespace) -> str | None:
    """The reason these flags must not start a server, or None when they are fine."""
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            return f"--auth {args.auth!r} is not allowed; use --auth user:pass (both parts non-empty)"
    if (args.listen or args.share) and not args.auth and not args.insecure:
        flag = "--listen" if args.listen else "--share"
        return (
            f"{flag} exposes FitVideo to other machines; add --auth user:pass "
            "(or --insecure if you really want it open to anyone who can reach it)"
        )
    if not 1 <= args.port <= 65535:
        return f"--port {args.port} is not allowed; use 1 to 65535"
    if args.queue_size < 1:
        return f"--queue-size {args.queue_size} is not allowed; use 1 or more"
    return None


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on (host, port). Binds the way uvicorn does (SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# =========================================================================== per-app state


@dataclass
class AppContext:
    runner: "Runner"
    outputs_dir: Path
    default_quant: str = "none"
    models_dir: Path | None = None  # diffusers folders here are listed with the registry models
    queue: "JobQueue | None" = None  # every generation is a job here (engine/jobs.py); set by build_app
    # Held by the job worker while a job runs, and by the other actions that touch the models (unload, finishing
    # from the gallery): one of them at a time, as Gradio's GPU queue did when it ran the generations itself.
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)


# =========================================================================== requests and plans


UPLOADS = ("image", "video")


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


def with_upload_paths(values: dict[str, Any], task: str = "t2v") -> dict[str, Any]:
    """The page's values as request fields: uploads as paths, and no second guidance for a model with one
    transformer (its hidden slider still sends a value)."""
    values = {**values, **{n: upload_path(values[n]) for n in UPLOADS if n in values}}
    if values.get("guidance_2") is not None and not two_experts(values.get("model"), task):
        values["guidance_2"] = None
    return values


def two_experts(model: Any, task: Any) -> bool:
    """Whether the (model, task) pipeline runs two experts (Wan 2.2 A14B t2v / i2v): the second guidance applies."""
    from configs.schema import RequestError, get_model_spec, task_experts

    try:
        return task_experts(get_model_spec(str(model)), str(task)) == 2
    except (RequestError, OSError, ValueError):  # an unknown model: resolve_request names it
        return False


def preview_request(ctx: AppContext, task: str, values: dict[str, Any]) -> "tuple[GenerationRequest, Plan]":
    """The resolved request and the plan the runner would make for it, before anything loads.

    The input image/video does not change the plan, so the preview plans before one is uploaded (the
    file is checked when Generate runs). A random seed (-1) plans as seed 0: the seed does not change it either.
    """
    from engine.resolve import resolve
    from ui.fields import request_from_fields, whole

    seed = 0 if whole(values.get("seed")) == -1 else None
    run = resolve(request_from_fields(task, with_upload_paths(values, task), seed=seed), check_files=False)
    return run.request, ctx.runner.plan(run)


def cache_choices(runner: "Runner") -> list[tuple[str, str]]:
    return [(f"{m} · {t} · {q}", f"{m}|{t}|{q}") for m, t, q in runner.cache.keys()]


# =========================================================================== UI parts


@dataclass
class TaskTab:
    task: str
    tab: "gr.Tab"
    model: "gr.Dropdown"
    model_note: "gr.Markdown"
    prompt: "gr.Textbox"
    negative_prompt: "gr.Textbox"
    image: "gr.Image | None"
    video: "gr.File | None"  # see render_inputs
    strength: "gr.Slider | None"
    seed: "gr.Number"
    preset: "gr.Radio"
    steps: "gr.Slider"
    guidance: "gr.Slider"
    frames: "gr.Slider"
    fps: "gr.Slider"
    resolution: "gr.Dropdown"
    plan_line: "gr.Markdown"
    generate: "gr.Button"
    stop: "gr.Button"
    result: "gr.Video"
    used_seed: "gr.Number"
    info: "gr.Markdown"
    guidance_2: "gr.Slider | None" = None  # the low-noise expert's guidance: shown for two-expert models only
    upscale: "gr.Radio | None" = None  # finishing steps after the decode (0 off, 2, 4)
    interpolate: "gr.Radio | None" = None
    loras: "gr.Dataframe | None" = None  # rows: LoRA, strength, low-noise strength (the request's field)
    shift: "gr.Number | None" = None
    lora_pick: "gr.Dropdown | None" = None  # picks the table's rows from the LoRAs that fit the model
    lora_preset: "gr.Button | None" = None  # a picked LoRA's run settings (a distill LoRA's steps and guidance)
    run_plot: "gr.LinePlot | None" = None  # the finished run's memory over time, with its stages
    preview: "gr.Image | None" = None  # this page's running job's latest latent preview

    def fields(self) -> dict[str, Any]:
        """API parameter name -> component, for the request fields this tab owns (in ui.fields' order)."""
        from ui.fields import REQUEST_FIELDS

        return {n: getattr(self, n) for n in REQUEST_FIELDS if getattr(self, n) is not None}


@dataclass
class OptimizationPanel:
    memory: "gr.Markdown"
    cache: "gr.Markdown"
    cache_pick: "gr.Dropdown"
    unload: "gr.Button"
    unload_all: "gr.Button"
    max_cache_size: "gr.Number"
    offload: "gr.Radio"
    quant: "gr.Radio"
    vae_tiling: "gr.Checkbox"
    tile_x: "gr.Number"
    tile_y: "gr.Number"
    tile_stride_x: "gr.Number"
    tile_stride_y: "gr.Number"
    plan: "gr.Markdown"
    leaks: "gr.Markdown"
    plan_plot: "gr.BarPlot | None" = None  # the plan per stage: predicted GPU / RAM peaks against the budgets
    live_plot: "gr.LinePlot | None" = None  # the last minute of memory
    previews: "gr.Checkbox | None" = None  # latent previews on / off (the runner's setting, for every page)
    step_cache: "gr.Dropdown | None" = None  # the request's step cache ("" = the motion preset's)
    attention: "gr.Radio | None" = None  # attention backend (only those that run here)
    compile: "gr.Checkbox | None" = None  # regional compile (Wan, CUDA)
    fixed_tiles: "gr.Checkbox | None" = None  # the tiles as set, even at the defaults

    def fields(self) -> dict[str, Any]:
        names = ("offload", "quant", "vae_tiling", "tile_x", "tile_y", "tile_stride_x", "tile_stride_y", "step_cache",
                 "attention", "compile", "fixed_tiles")
        return {n: getattr(self, n) for n in names}


@dataclass
class GalleryPanel:
    gallery: "gr.Gallery"
    pick: "gr.Dropdown"
    details: "gr.Markdown"
    reuse: "gr.Button"
    refresh: "gr.Button"
    upscale: "gr.Button | None" = None  # finishing steps on the picked result
    interpolate: "gr.Button | None" = None
    run_plot: "gr.LinePlot | None" = None  # the picked result's memory over time
    reuse_task: "gr.Textbox | None" = None  # hidden: the tab Reuse opens, read by SELECT_TAB_JS


@dataclass
class JobsPanel:
    table: "gr.Markdown"
    preview: "gr.Image"  # the running job's latent preview
    result: "gr.Video"  # the latest finished job's video (this person's)
    pick: "gr.Dropdown"  # a live job to stop
    stop: "gr.Button"
    data: "gr.JSON"  # the same list for API clients (/jobs)
    shown: "gr.State"  # the result video this page shows (sent once, not every tick)


@dataclass
class FitVideoApp:
    demo: "gr.Blocks"
    ctx: AppContext
    header: "gr.Markdown"
    tabs: "gr.Tabs"
    task_tabs: dict[str, TaskTab]
    optimization: OptimizationPanel
    gallery: GalleryPanel
    active_task: "gr.State"
    queue_size: int = DEFAULT_QUEUE_SIZE
    jobs: "JobsPanel | None" = None


def render_inputs(task: str) -> "tuple[gr.Image | None, gr.File | None]":
    """The tab's input image (I2V) or video (V2V). Events read them unprocessed (see check_input)."""
    import gradio as gr

    image = video = None
    if task == "i2v":
        image = gr.Image(
            label="Input image", type="filepath", sources=["upload", "clipboard"], height=220, elem_id="i2v-image"
        )
    if task == "v2v":  # a file, not gr.Video: the page's video upload takes video/* only, and GIFs are welcome
        video = gr.File(
            label="Input video (MP4, WebM, MOV, GIF; a still image is held for every frame)", type="filepath",
            file_types=["video", "image"], file_count="single", elem_id="v2v-video",
        )
    return image, video


def render_sampling(task: str, model: str, preset) -> "tuple[gr.Slider, gr.Slider, gr.Slider]":
    """Steps and guidance in one row, with the low-noise expert's guidance shown for two-expert models
    (Wan 2.2 A14B t2v / i2v) only."""
    import gradio as gr

    with gr.Row():
        steps = gr.Slider(1, 100, value=preset.steps, step=1, label="Steps", elem_id=f"{task}-steps")
        guidance = gr.Slider(0.0, 20.0, value=preset.guidance, step=0.5, label="Guidance")
        guidance_2 = gr.Slider(
            0.0, 20.0, value=preset.guidance, step=0.5, label="Guidance, low-noise expert",
            elem_id=f"{task}-guidance-2", info="Wan 2.2 A14B: the second expert's guidance",
            visible=two_experts(model, task),
        )
    return steps, guidance, guidance_2


def render_task_tab(task: str, statuses: "list[ModelStatus]") -> TaskTab:
    import gradio as gr

    from configs.schema import PRESETS, GenerationRequest, get_model_spec, load_presets
    from reports.catalog import default_model, resolutions_for

    model = default_model(statuses)
    spec = get_model_spec(model)
    preset = load_presets()["balanced"]
    titles = {"t2v": "Text to video", "i2v": "Image to video", "v2v": "Video to video"}
    with gr.Tab(task.upper(), id=task) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                gr.Markdown(f"### {titles[task]}")
                model_dd = gr.Dropdown(
                    [(s.label, s.model) for s in statuses], value=model, label="Model", elem_id=f"{task}-model",
                    info="only models that serve this task",
                )
                note = gr.Markdown(next(s.note for s in statuses if s.model == model), elem_id=f"{task}-model-note")
                image, video = render_inputs(task)
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=3, elem_id=f"{task}-prompt")
                negative = gr.Textbox("", label="Negative prompt", lines=1, placeholder="blurry, distorted")
                strength = None
                if task == "v2v":
                    strength = gr.Slider(
                        0.0, 1.0, value=GenerationRequest.strength, step=0.05, label="Strength",
                        info="how far to move from the input video",
                    )
                with gr.Row():
                    seed = gr.Number(-1, label="Seed", precision=0, info="-1 = random", minimum=-1)
                    preset_radio = gr.Radio(
                        list(PRESETS), value=preset.name, label="Motion preset", info="fills steps and guidance"
                    )
                steps, guidance, guidance_2 = render_sampling(task, model, preset)
                with gr.Row():
                    frames = gr.Slider(
                        1, spec.max_frames, value=spec.default_frames, step=spec.frame_step, label="Frames",
                        info=f"{spec.family}: {spec.frame_rule_text()}", elem_id=f"{task}-frames",
                    )
                    fps = gr.Slider(1, 60, value=spec.fps, step=1, label="FPS")
                resolutions = resolutions_for(model, task)
                resolution = gr.Dropdown(resolutions, value=resolutions[0], label="Resolution (height x width)")
                upscale, interpolate = render_finishing(task)
                lora = render_loras(task, model)
                plan = gr.Markdown(label="Plan", elem_id=f"{task}-plan", elem_classes=["fv-plan"])
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
            with gr.Column(scale=1):
                result, used_seed, info, preview, run_plot = render_result(task)
    return TaskTab(
        task, tab, model_dd, note, prompt, negative, image, video, strength, seed, preset_radio, steps, guidance,
        frames, fps, resolution, plan, generate, stop, result, used_seed, info, guidance_2=guidance_2,
        upscale=upscale, interpolate=interpolate, run_plot=run_plot, preview=preview, **lora,
    )


def render_result(task: str) -> tuple:
    """The result column: the video, the seed used, what happened, the preview while denoising, the memory chart."""
    import gradio as gr

    result = gr.Video(label="Result", interactive=False, autoplay=True, loop=True, buttons=["download"], height=360,
                      elem_id=f"{task}-result")
    used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False)
    info = gr.Markdown(label="Info", elem_id=f"{task}-info")
    preview = gr.Image(None, label="Preview while denoising (the latents, projected to colour)",
                       elem_id=f"{task}-preview", interactive=False, height=200, type="numpy")
    return result, used_seed, info, preview, render_run_plot(f"{task}-run-chart")


def render_run_plot(elem_id: str) -> "gr.LinePlot":
    """A run's memory over time (its sidecar's memory_timeline), stage by stage."""
    import gradio as gr

    from reports.charts import TIMELINE_PLOT

    # Created empty (None), not with an empty DataFrame: Gradio 6 then draws no line when data arrives.
    return gr.LinePlot(None, **TIMELINE_PLOT, label="Memory during the run", elem_id=elem_id, height=220)


def run_plot_update(sidecar_data: dict | None) -> "gr.LinePlot":
    import gradio as gr

    from reports.charts import marks_caption, timeline_chart

    timeline = (sidecar_data or {}).get("memory_timeline")
    return gr.LinePlot(timeline_chart(timeline), caption=marks_caption(timeline) or None)


LORA_HEADERS = ["LoRA", "strength", "low-noise strength"]


def lora_choices(model: str) -> list[str]:
    """The LoRA folder's files that fit `model` (by their shapes, not their names)."""
    from configs.schema import RequestError
    from engine.lora import list_loras

    try:
        return [f.name for f in list_loras(model)]
    except (RequestError, OSError, ValueError):  # an unknown model: the plan names it
        return []


def render_loras(task: str, model: str) -> dict[str, Any]:
    """LoRAs: pick from those that fit the model, a strength per row (and per expert on Wan 2.2 A14B), and a
    preset button when a picked LoRA carries run settings; the scheduler shift next to them."""
    import gradio as gr

    from engine.lora import loras_dir

    with gr.Accordion("LoRAs", open=True):
        lora_pick = gr.Dropdown(
            lora_choices(model), value=[], multiselect=True, label="LoRAs", elem_id=f"{task}-lora-pick",
            info=f"the .safetensors files in {loras_dir()} that fit this model",
        )
        loras = gr.Dataframe(
            value=[], headers=LORA_HEADERS, datatype=["str", "number", "number"], column_count=(3, "fixed"),
            type="array", interactive=True, label="Strengths (low-noise: Wan 2.2 A14B's second expert; empty = same)",
            elem_id=f"{task}-loras",
        )
        with gr.Row():
            shift = gr.Number(0, label="Shift", info="scheduler flow shift (Wan); 0 = the model's",
                              elem_id=f"{task}-shift")
            lora_preset = gr.Button("Use LoRA preset", visible=False, elem_id=f"{task}-lora-preset", size="sm")
    return dict(loras=loras, shift=shift, lora_pick=lora_pick, lora_preset=lora_preset)


def lora_rows(picked: list[str] | None, table: Any) -> tuple[list[list], Any]:
    """The table for the picked LoRAs (strengths already set are kept, a new one starts at 1), and the preset
    button for the first picked LoRA that has run settings."""
    import gradio as gr

    from configs.schema import RequestError
    from ui.fields import loras_from_field
    from engine.lora import lora_file

    old = {c.name: c for c in loras_from_field(table)}
    rows, preset = [], None
    for name in picked or []:
        c = old.get(name)
        rows.append([name, c.strength if c else 1.0, c.strength_2 if c else None])
        try:
            found = None if preset else lora_file(name).preset  # each file read once, only until one has a preset
            preset = preset or (found and (name, found))
        except RequestError:
            pass
    label = f"Use preset: {preset[1].text(preset[0])}" if preset else "Use LoRA preset"
    return rows, gr.Button(label, visible=bool(preset))


def use_lora_preset(picked: list[str] | None, steps, guidance, shift) -> tuple:
    """The first picked LoRA's run settings into steps, guidance and shift (what it leaves out stays)."""
    from configs.schema import RequestError
    from engine.lora import lora_file

    for name in picked or []:
        try:
            p = lora_file(name).preset
        except RequestError:
            continue
        if p:
            return (p.steps or steps, guidance if p.guidance is None else p.guidance,
                    shift if p.shift is None else p.shift)
    return steps, guidance, shift


FINISH_CHOICES = [("off", 0), ("x2", 2), ("x4", 4)]


def render_finishing(task: str) -> "tuple[gr.Radio, gr.Radio]":
    """Finishing steps under the generation settings; the video without them is kept too."""
    import gradio as gr

    with gr.Row():
        upscale = gr.Radio(FINISH_CHOICES, value=0, label="Finish: upscale", elem_id=f"{task}-upscale",
                           info="Real-ESRGAN when its weights are here, else Lanczos (no model)")
        interpolate = gr.Radio(FINISH_CHOICES, value=0, label="Finish: interpolate", elem_id=f"{task}-interpolate",
                               info="ffmpeg minterpolate (no model): N frames -> (N-1) x factor + 1")
    return upscale, interpolate


def render_optimization(ctx: AppContext) -> OptimizationPanel:
    import gradio as gr

    from configs.schema import QUANTS, DecodeSettings, OffloadChoice
    from reports.charts import LIVE_PLOT, PLAN_PLOT
    from reports.text import cache_markdown, leak_markdown

    d = DecodeSettings()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Memory (live)")
            memory = gr.Markdown(label="Memory", elem_id="memory-panel", elem_classes=["fv-memory"])
            live_plot = gr.LinePlot(None, **LIVE_PLOT, label="Last minute", elem_id="live-chart", height=200)
            gr.Markdown("### Pipeline cache")
            cache = gr.Markdown(
                cache_markdown(ctx.runner), label="Cache", elem_id="cache-panel", elem_classes=["fv-memory"]
            )
            cache_pick = gr.Dropdown(cache_choices(ctx.runner), value=None, label="Loaded pipeline")
            with gr.Row():
                unload = gr.Button("Unload selected")
                unload_all = gr.Button("Unload all")
            max_cache = gr.Number(
                ctx.runner.cache.max_size, label="MAX_CACHE_SIZE", precision=0, minimum=1,
                info="pipelines kept loaded; the least recently used goes first",
            )
        with gr.Column(scale=1):
            gr.Markdown("### Settings for every tab")
            offload = gr.Radio(
                [(OFFLOAD_LABELS[o], o) for o in get_args(OffloadChoice)], value="auto", label="Offload strategy",
            )
            quant = gr.Radio([(PRECISION_LABELS[q], q) for q in QUANTS], value=ctx.default_quant, label="Precision")
            vae_tiling = gr.Checkbox(d.enable_vae_tiling, label="VAE tiling", info=TILING_HELP)
            step_cache = gr.Dropdown(
                STEP_CACHE_CHOICES, value="", label="Step cache", elem_id="step-cache", allow_custom_value=True,
                info="reuse transformer work between steps: faster, some quality loss (random weights cannot show "
                     "it). NAME:NUMBER sets its threshold / interval. Which apply depends on the model and task (Wan: "
                     "first-block, TaylorSeer, MagCache; CogVideoX: all; Wan V2V: none; first-block needs 2+ blocks, "
                     "MagCache one transformer): the plan line says when one does not",
            )
            attention, compile_box = render_speed_knobs()
            previews = gr.Checkbox(ctx.runner.previews, label="Latent previews while denoising", elem_id="previews",
                                   info="a small picture of the latents every few steps (at most 5 % of the step time)")
            with gr.Row():
                tile_x = gr.Number(d.tile_x, label="Tile width (px)", precision=0, minimum=32)
                tile_y = gr.Number(d.tile_y, label="Tile height (px)", precision=0, minimum=32)
                stride_x = gr.Number(d.tile_stride_x, label="Stride x (px)", precision=0, minimum=32)
                stride_y = gr.Number(d.tile_stride_y, label="Stride y (px)", precision=0, minimum=32)
            fixed_tiles = gr.Checkbox(d.fixed_tiles, label="Tiles as set", elem_id="fixed-tiles",
                                      info="off: at these defaults the planner sizes the tiles; on: exactly these")
    gr.Markdown("### Pre-flight plan for the active tab")
    plan = gr.Markdown(label="Pre-flight plan", elem_id="plan-panel", elem_classes=["fv-plan"])
    plan_plot = gr.BarPlot(None, **PLAN_PLOT, label="Predicted peaks per stage against the budgets",
                           elem_id="plan-chart", height=260)
    gr.Markdown("### Memory after each run (leak sentinel)")
    leaks = gr.Markdown(leak_markdown(ctx.runner), label="Leak sentinel", elem_id="leak-panel")
    return OptimizationPanel(
        memory, cache, cache_pick, unload, unload_all, max_cache, offload, quant, vae_tiling,
        tile_x, tile_y, stride_x, stride_y, plan, leaks, plan_plot, live_plot, previews, step_cache, attention,
        compile_box, fixed_tiles,
    )


def render_speed_knobs() -> "tuple[gr.Radio, gr.Checkbox]":
    """Attention backend (only those that run on this machine) and regional compile."""
    import gradio as gr

    from engine.attention import backend_problems

    runnable = [b for b, problem in backend_problems().items() if problem is None]
    attention = gr.Radio(runnable, value="auto", label="Attention backend", elem_id="attention",
                         info="auto = the fastest here (sage, then flash, then torch SDPA); flash / sage are offered "
                              "when their package and a CUDA GPU are present. CogVideoX goes through the same "
                              "dispatcher (its own processor does not: FitVideo swaps in one that does)")
    compile_box = gr.Checkbox(False, label="Regional compile (Wan, CUDA)", elem_id="compile",
                              info="compiles Wan's repeated block once: the first run takes minutes longer, later "
                                   "runs are faster; CogVideoX declares no repeated blocks")
    return attention, compile_box


def render_jobs() -> JobsPanel:
    """Every job the server has (this person's, with a login): seen from any tab, after any reload."""
    import gradio as gr

    with gr.Accordion("Jobs", open=True, elem_id="jobs-panel"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                table = gr.Markdown("No jobs yet.", elem_id="jobs-table")
                with gr.Row():
                    pick = gr.Dropdown([], value=None, label="Job", elem_id="jobs-pick", scale=3, allow_custom_value=True,
                                       info="a running or waiting job")
                    stop = gr.Button("Stop job", variant="stop", elem_id="jobs-stop", scale=1)
            with gr.Column(scale=2):
                preview = gr.Image(None, label="Running job (latest preview)", elem_id="jobs-preview",
                                   interactive=False, height=180, type="numpy")
                result = gr.Video(None, label="Your latest result", elem_id="jobs-result", interactive=False,
                                  height=180)
        data = gr.JSON(visible=False)
    return JobsPanel(table, preview, result, pick, stop, data, gr.State({}))


def render_gallery() -> GalleryPanel:
    import gradio as gr

    gallery = gr.Gallery(
        label="Past results (newest first)", columns=4, fit_columns=False, height=420, allow_preview=True,
        elem_id="gallery",
    )
    with gr.Row():
        pick = gr.Dropdown([], label="Result", scale=3, elem_id="gallery-pick")
        reuse = gr.Button("Reuse settings", variant="primary", scale=1)
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        upscale = gr.Button("Upscale ×2", scale=1, elem_id="gallery-upscale")
        interpolate = gr.Button("Interpolate ×2", scale=1, elem_id="gallery-interpolate")
    details = gr.Markdown(label="Details", elem_id="gallery-details")
    run_plot = render_run_plot("gallery-run-chart")
    reuse_task = gr.Textbox(visible=False)
    return GalleryPanel(gallery, pick, details, reuse, refresh, upscale, interpolate, run_plot, reuse_task)


# =========================================================================== event handlers


# Where the bar stands for stages that report no step count.
STAGE_FRACTION = {"loading": 0.0, "encoding": 0.05, "decoding": 0.9, "saving": 0.98, "finishing": 0.99, "done": 1.0}


def _progress_to_gradio(progress, event: "ProgressEvent") -> None:
    desc = event.message or event.stage
    if event.eta_s is not None:
        desc += f" · ETA {event.eta_s:.0f} s"
    if event.total:
        unit = {"denoising": "steps", "finishing": "frames"}.get(event.stage, "chunks")
        progress((event.step, event.total), desc=desc, unit=unit)
    else:
        progress(STAGE_FRACTION.get(event.stage, 0.0), desc=desc)


def prepare_request(ctx: AppContext, task: str, values: dict[str, Any]):
    """The run a Generate press (or an API call) asks for, resolved once (engine/resolve.py): every refusal here,
    before a job is queued. -1 becomes a real seed; an upload is read under the name the person knows it by, then
    kept next to the outputs so that a result's settings can be reused after a restart."""
    import dataclasses

    from engine.media import persist_input
    from engine.resolve import resolve
    from ui.fields import pick_seed, request_from_fields

    names = {n: upload_name(values[n]) for n in UPLOADS if values.get(n)}
    req = request_from_fields(task, with_upload_paths(values, task), pick_seed(values.get("seed")))
    run = resolve(req, input_names=names)
    kept = {name: persist_input(getattr(run.request, name), ctx.outputs_dir) for name in UPLOADS}
    return dataclasses.replace(run, request=run.request.replace(**{n: p for n, p in kept.items() if p}))


async def submit_and_wait(ctx: AppContext, task: str, values: dict[str, Any], request, progress) -> tuple:
    """Generate, for the page and the API alike: resolve, queue a job (on disk before it runs), wait for it with
    its progress, and return (video path or None, seed, what happened in markdown, job id)."""
    import gradio as gr

    from configs.schema import RequestError
    from engine.jobs import QueueFull
    from reports.text import result_markdown

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
    if job.state == "stopped":
        return None, run.request.seed, stopped_text(job), job.id
    if job.state == "failed":
        raise gr.Error(f"job {job.id}: {job.error}")
    result = job.result
    finished = "".join(f"\n\n{f['step']} x{f['factor']} with {f['method']}: {f['frames_out']} frames, "
                       f"{f['size_out'][0]}x{f['size_out'][1]} at {f['fps_out']:g} fps -> **{Path(f['video']).name}**"
                       for f in result.finishing)
    markdown = result_markdown(result, ctx.outputs_dir, run.notes) + finished + f"\n\njob `{job.id}`"
    return str(result.final_path), result.request.seed, markdown, job.id


def make_generate(ctx: AppContext, task: str):
    """The tab's Generate button (a page event; programs use the typed `/t2v`... endpoints of ui/api.py)."""
    import gradio as gr

    async def generate(request: gr.Request, progress=gr.Progress(), **values):
        video, seed, markdown, _ = await submit_and_wait(ctx, task, values, request, progress)
        return video, seed, markdown

    generate.__name__ = f"generate_{task}"
    return generate


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


async def wait_for_job(queue: "JobQueue", job: "Job", progress) -> None:
    """Until the job ends: its progress into this page's progress bar (waiting: its place in the queue)."""
    shown: Any = None
    sent_at = 0.0
    while not job.done.is_set():
        event = job.last
        if job.state == "waiting":
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


def stopped_text(job: "Job") -> str:
    where = job.last.message if job.last else "before the first step"
    return f"**Stopped** at {where}. Nothing was saved; memory was released; ready."


def make_stop(ctx: AppContext, task: str):
    import gradio as gr

    def stop(request: gr.Request) -> str:
        job = ctx.queue.find(request.session_hash or "", task)
        if job is not None:
            ctx.queue.stop(job.id)
        if job is None:
            return "Nothing was running in this tab."
        if not job.done.wait(STOP_WAIT_S):
            return "Stop requested; the run ends at its next step."
        return stopped_text(job)

    stop.__name__ = f"stop_{task}"
    return stop


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


def make_preview(ctx: AppContext, task: str):
    import gradio as gr

    def preview(active: str, **values) -> tuple[str, str]:
        line, full = plan_texts(ctx, task, values)
        return line, (full if active == task else gr.skip())  # the Optimization tab shows the active tab's plan

    preview.__name__ = f"page_plan_{task}"
    return preview


def make_select(ctx: AppContext, task: str):
    def select(**values) -> tuple[str, str, str]:
        return (task, *plan_texts(ctx, task, values))

    select.__name__ = f"select_{task}"
    return select


def make_plan_chart(ctx: AppContext, task: str):
    """The Optimization tab's plan chart for the active tab's settings (after the plan text)."""
    import gradio as gr

    from configs.schema import RequestError
    from reports.charts import plan_chart

    def chart(active: str, **values):
        if active != task:
            return gr.skip()
        try:
            _, plan = preview_request(ctx, task, values)
        except RequestError:
            plan = None
        df = plan_chart(plan)
        return gr.BarPlot(df, sort=list(df["bar"]))

    chart.__name__ = f"plan_chart_{task}"
    return chart


def latest_sidecar(ctx: AppContext, task: str, seed: Any) -> dict | None:
    """The newest result of `task` with `seed` (the one a tab just showed), as its sidecar's JSON."""
    from engine.results import list_results

    for result in list_results(ctx.outputs_dir):
        if result.data["request"].get("task") == task and result.data["request"].get("seed") == seed:
            return result.data
    return None


def make_check_upload(task: str):
    """Checks an upload as it arrives, so what is wrong with it shows at once as a toast, before Generate.
    A queued event: gradio shows the errors of unqueued ones (the plan preview) nowhere."""
    import gradio as gr

    from configs.schema import RequestError
    from ui.fields import whole

    def check_upload(payload, frames) -> None:
        frames = whole(frames)
        try:
            notes = check_input(task, payload, frames if isinstance(frames, int) and frames > 0 else 1)
        except RequestError as exc:
            raise gr.Error(str(exc)) from None
        for note in notes:
            gr.Warning(note)

    check_upload.__name__ = f"check_upload_{task}"
    return check_upload


def on_model_change(task: str):
    import gradio as gr

    from configs.schema import get_model_spec
    from reports.catalog import resolutions_for

    def change(model: str, frames, resolution: str):
        spec = get_model_spec(model)
        choices = resolutions_for(model, task)
        return (
            gr.Slider(
                maximum=spec.max_frames, step=spec.frame_step, value=spec.snap_frames(int(frames)),
                info=f"{spec.family}: {spec.frame_rule_text()}",
            ),
            gr.Dropdown(choices=choices, value=resolution if resolution in choices else choices[0]),
            spec.fps,
        )

    return change


def fill_preset(name: str) -> tuple[int, float]:
    from configs.schema import load_presets

    preset = load_presets()[name]
    return preset.steps, preset.guidance


# =========================================================================== wiring


def listen_task_tab(app: FitVideoApp, tab: TaskTab) -> None:
    import gradio as gr

    from reports.catalog import model_status

    ctx, opt = app.ctx, app.optimization
    kwargs = {**tab.fields(), **opt.fields()}
    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")

    # Only the person's own choices change dependent fields (.input), so "reuse settings"
    # can set a model and its frames together without one resetting the other.
    tab.model.input(
        on_model_change(tab.task), [tab.model, tab.frames, tab.resolution], [tab.frames, tab.resolution, tab.fps],
        **hidden,
    )
    tab.model.change(lambda m: model_status(m, tab.task).note, tab.model, tab.model_note, **hidden)
    # The second guidance shows for two-expert models only (.change: also when "reuse settings" sets the model).
    tab.model.change(lambda m: gr.Slider(visible=two_experts(m, tab.task)), tab.model, tab.guidance_2, **hidden)
    tab.preset.input(fill_preset, tab.preset, [tab.steps, tab.guidance], **hidden)
    # LoRAs: the list follows the model (only those that fit); picking fills the strengths table.
    tab.model.change(lambda m, picked: gr.Dropdown(choices=lora_choices(m), value=[
        p for p in picked or [] if p in lora_choices(m)]), [tab.model, tab.lora_pick], tab.lora_pick, **hidden)
    app.demo.load(lambda m: gr.Dropdown(choices=lora_choices(m)), tab.model, tab.lora_pick, **hidden)  # new files
    tab.lora_pick.change(lambda picked, table: lora_rows(picked, table), [tab.lora_pick, tab.loras],
                         [tab.loras, tab.lora_preset], **hidden)
    tab.lora_preset.click(use_lora_preset, [tab.lora_pick, tab.steps, tab.guidance, tab.shift],
                          [tab.steps, tab.guidance, tab.shift], **hidden)
    # Events that take an upload get it unprocessed: check_input reads it and names what is wrong with it.
    upload = tab.image if tab.image is not None else tab.video
    raw = dict(preprocess=False) if upload is not None else {}
    if upload is not None:  # queued, unlike the preview: its errors and warnings show as toasts
        upload.upload(make_check_upload(tab.task), [upload, tab.frames], None, api_visibility="private",
                      show_progress="hidden", **raw)

    # The plan follows every setting, before Generate is pressed.
    gr.on(
        [c.change for c in kwargs.values()] + [app.demo.load], make_preview(ctx, tab.task), inputs=[app.active_task],
        inputs_kwargs=kwargs, outputs=[tab.plan_line, opt.plan], api_visibility="private", queue=False,
        show_progress="hidden", trigger_mode="always_last", **raw,
    ).then(make_plan_chart(ctx, tab.task), inputs=[app.active_task], inputs_kwargs=kwargs, outputs=opt.plan_plot,
           **hidden, **raw)
    tab.tab.select(
        make_select(ctx, tab.task), inputs_kwargs=kwargs, outputs=[app.active_task, tab.plan_line, opt.plan],
        **hidden, **raw,
    ).then(make_plan_chart(ctx, tab.task), inputs=[app.active_task], inputs_kwargs=kwargs, outputs=opt.plan_plot,
           **hidden, **raw)

    run = tab.generate.click(
        make_generate(ctx, tab.task), inputs_kwargs=kwargs, outputs=[tab.result, tab.used_seed, tab.info],
        api_visibility="private", concurrency_id="jobs", concurrency_limit=app.queue_size + 1,
        show_progress_on=[tab.result], **raw,
    )
    run.success(
        lambda: after_run(app, tab.task), None,
        [opt.cache, opt.cache_pick, app.gallery.gallery, app.gallery.pick, tab.model], **hidden,
    )
    run.success(lambda seed: run_plot_update(latest_sidecar(ctx, tab.task, seed)), tab.used_seed, tab.run_plot,
                **hidden)
    # Stop ends a running job at its next step (the flag) and removes a queued one (cancels=).
    tab.stop.click(make_stop(ctx, tab.task), None, tab.info, cancels=[run], queue=False, api_name=f"stop_{tab.task}")


def listen_jobs(app: FitVideoApp) -> tuple:
    """The Jobs panel: Stop for a picked job, `/jobs`; returns the panel's refresh and its outputs for the page
    timer (`listen_page_timer`)."""
    import gradio as gr

    from engine.jobs import jobs_markdown
    from engine.results import gallery_items, list_results

    ctx, panel = app.ctx, app.jobs

    def refresh(shown: dict, request: gr.Request):
        """Only what changed since this page's last tick goes out (a reloaded page starts from nothing)."""
        jobs = ctx.queue.jobs(owner=request.username if request.username else None)
        running = next((j for j in jobs if j.state == "running"), None)
        # the newest finished job's video (None, never "": gradio reads "" as the working folder)
        latest = next((video for j in jobs if j.state == "done" and (video := j.view()["video"])), None)
        live = [(f"{j.id} · {j.task.upper()} · {j.state}", j.id) for j in jobs if j.state in ("running", "waiting")]
        mine = [running.preview if running is not None and running.session == request.session_hash
                and running.task == task else None for task in app.task_tabs]  # each tab: its own job's preview
        panel_preview = running.preview if running is not None else None
        stamp = (running.id, running.preview_n) if running is not None else None  # ids of arrays get reused
        now = {"table": jobs_markdown(jobs), "video": latest, "pick": repr(live), "preview": repr(stamp),
               "tabs": repr([stamp if m is not None else None for m in mine])}
        old = shown or {}
        same = {k: old.get(k) == v for k, v in now.items()}
        results = list_results(ctx.outputs_dir) if not same["video"] else []
        return (now["table"] if not same["table"] else gr.skip(),
                panel_preview if not same["preview"] else gr.skip(),
                latest if not same["video"] else gr.skip(), now,
                gr.Dropdown(choices=live, value=live[0][1] if live else None) if not same["pick"] else gr.skip(),
                *(m if not same["tabs"] else gr.skip() for m in mine),
                gallery_items(results) if not same["video"] else gr.skip(),
                gr.Dropdown(choices=[r.name for r in results]) if not same["video"] else gr.skip())

    def listing(request: gr.Request) -> list[dict]:
        return [j.view() for j in ctx.queue.jobs(owner=request.username if request.username else None)]

    def stop(job_id: str | None, request: gr.Request) -> str:
        job = ctx.queue.stop(job_id or "", owner=request.username if request.username else None)
        if job is None:
            raise gr.Error(f"no job {job_id!r} of yours is running or waiting")
        gr.Info(f"job {job_id}: {'removed from the queue' if job.state == 'stopped' else 'stops at its next step'}")
        return jobs_markdown(ctx.queue.jobs(owner=request.username if request.username else None))

    outputs = [panel.table, panel.preview, panel.result, panel.shown, panel.pick,
               *(tab.preview for tab in app.task_tabs.values()), app.gallery.gallery, app.gallery.pick]
    app.demo.load(listing, None, panel.data, api_name="jobs", queue=False)
    panel.stop.click(stop, panel.pick, panel.table, api_name="stop_job", queue=False)
    return refresh, outputs


def after_run(app: FitVideoApp, task: str) -> tuple:
    """Cache panel, gallery and model labels (a first run may have downloaded weights) after a run."""
    import gradio as gr

    from reports.catalog import model_statuses
    from reports.text import cache_markdown
    from engine.results import gallery_items, list_results

    results = list_results(app.ctx.outputs_dir)
    return (
        cache_markdown(app.ctx.runner),
        gr.Dropdown(choices=cache_choices(app.ctx.runner)),
        gallery_items(results),
        gr.Dropdown(choices=[r.name for r in results]),
        gr.Dropdown(choices=[(s.label, s.model) for s in model_statuses(task, app.ctx.models_dir)]),
    )


def listen_optimization(app: FitVideoApp) -> tuple:
    """The Optimization tab's events; returns its memory panels' refresh and outputs for the page timer."""
    from reports.text import leak_markdown, memory_markdown

    ctx, opt = app.ctx, app.optimization
    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")

    def memory_panels():
        import vram_utils

        info = vram_utils.probe()
        return memory_markdown(info), info.summary(), leak_markdown(ctx.runner)

    opt.previews.input(lambda on: setattr(ctx.runner, "previews", bool(on)), opt.previews, None, **hidden)
    panels = [opt.memory, app.header, opt.leaks]
    app.demo.load(memory_panels, None, panels, api_name="memory", queue=False, show_progress="hidden")
    listen_cache(app)
    return memory_panels, [*panels, opt.live_plot]


def listen_page_timer(app: FitVideoApp, timer, jobs: tuple, memory: tuple) -> None:
    """One tick for the whole page. Gradio's frontend walks every component with a loading status on each event,
    so each extra timer costs the browser a pass over the page: the Jobs panel and the memory panels share this
    one, and the live chart (a costly redraw) goes out every LIVE_REFRESH_S of it."""
    import gradio as gr

    from reports.charts import LIVE

    (jobs_refresh, jobs_outputs), (memory_panels, memory_outputs) = jobs, memory
    shown_at = jobs_outputs.index(app.jobs.shown)

    def tick(shown: dict, request: gr.Request):
        panel = list(jobs_refresh(shown, request))
        last = (shown or {}).get("live_at", 0.0)
        due = time.monotonic() - last >= LIVE_REFRESH_S
        if due:
            LIVE.sample()
        panel[shown_at] = {**panel[shown_at], "live_at": time.monotonic() if due else last}
        # a page's first call (its load) leaves the memory panels to the load event that also serves /memory
        memory = memory_panels() if shown else (gr.skip(),) * (len(memory_outputs) - 1)
        return *panel, *memory, LIVE.frame() if due else gr.skip()

    gr.on([timer.tick, app.demo.load], tick, app.jobs.shown, [*jobs_outputs, *memory_outputs],
          queue=False, api_visibility="private", show_progress="hidden")


def listen_cache(app: FitVideoApp) -> None:
    """The pipeline cache panel: what is loaded, unload one or all, MAX_CACHE_SIZE."""
    import gradio as gr

    from ui.fields import whole
    from reports.text import cache_markdown, fmt_bytes

    ctx, opt = app.ctx, app.optimization

    def refresh_cache():
        return cache_markdown(ctx.runner), gr.Dropdown(choices=cache_choices(ctx.runner), value=None)

    def unload(choice: str | None):
        if choice:
            with ctx.gpu_lock:  # never from under a running job
                freed = ctx.runner.cache.unload(*choice.split("|"))
            gr.Info(f"unloaded {choice.replace('|', ' · ')}: {fmt_bytes(freed)} freed")
        return refresh_cache()

    def unload_all():
        with ctx.gpu_lock:
            freed = ctx.runner.cache.unload_all()
        gr.Info(f"unloaded every pipeline: {fmt_bytes(freed)} freed")
        return refresh_cache()

    def set_max_cache_size(n):
        n = whole(n)
        if not isinstance(n, int) or n < 1:
            raise gr.Error(f"MAX_CACHE_SIZE={n!r} is not allowed; use a whole number of 1 or more")
        cache = ctx.runner.cache
        cache.max_size = n
        with ctx.gpu_lock:
            while len(cache) > n:  # least recently used first
                cache.unload(*cache.keys()[0])
        return refresh_cache()

    # Unloads take the lock the job worker holds while a job runs: never a pipeline from under a run.
    gpu = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
    outputs = [opt.cache, opt.cache_pick]
    opt.unload.click(unload, opt.cache_pick, outputs, api_name="unload", **gpu)
    opt.unload_all.click(unload_all, None, outputs, api_name="unload_all", **gpu)
    # On Enter or leaving the field, not per keystroke: typing "10" must not evict down to 1 first.
    gr.on(
        [opt.max_cache_size.submit, opt.max_cache_size.blur], set_max_cache_size, opt.max_cache_size, outputs,
        api_name="set_max_cache_size", **gpu,
    )
    app.demo.load(refresh_cache, None, outputs, api_name="cache", queue=False, show_progress="hidden")


def listen_gallery(app: FitVideoApp) -> None:
    import gradio as gr

    from reports.text import result_details
    from engine.results import find_result, gallery_items, list_results

    ctx, g = app.ctx, app.gallery
    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")

    def refresh():
        results = list_results(ctx.outputs_dir)
        return gallery_items(results), gr.Dropdown(choices=[r.name for r in results])

    def select(evt: gr.SelectData):
        results = list_results(ctx.outputs_dir)
        return results[evt.index].name if evt.index < len(results) else gr.skip()

    def details(name: str | None) -> str:
        result = find_result(ctx.outputs_dir, name)
        return result_details(result) if result else ""

    app.demo.load(refresh, None, [g.gallery, g.pick], api_name="gallery", queue=False)
    g.refresh.click(refresh, None, [g.gallery, g.pick], **hidden)
    g.gallery.select(select, None, g.pick, **hidden)
    g.pick.change(details, g.pick, g.details, api_name="result_details", queue=False).then(
        lambda name: run_plot_update(getattr(find_result(ctx.outputs_dir, name), "data", None)), g.pick, g.run_plot,
        **hidden)

    outputs = [app.active_task, g.reuse_task, *app.optimization.fields().values()]
    for tab in app.task_tabs.values():
        outputs += [*tab.fields().values(), tab.lora_pick]
    # The tab is switched in the page: a gr.Tabs output keeps a loading status on the Tabs, and from then on
    # every event (each timer tick) makes Gradio's frontend copy the value of every component under it
    g.reuse.click(make_reuse(app), g.pick, outputs, api_name="reuse", queue=False).success(
        None, g.reuse_task, None, js=SELECT_TAB_JS, **hidden)
    for button, step in ((g.upscale, "upscale"), (g.interpolate, "interpolate")):
        button.click(make_finish(app, step), g.pick, [g.details], api_name=f"{step}_result",
                     concurrency_id=GPU_QUEUE, concurrency_limit=1).success(refresh, None, [g.gallery, g.pick], **hidden)


def make_finish(app: FitVideoApp, step: str):
    """Gallery buttons: a finishing step (x2) on the picked result, in the GPU queue; the new video gets its
    own sidecar and shows in the gallery."""
    import gradio as gr

    from configs.schema import RequestError
    from engine.finishing import FinishStep, run_step
    from engine.results import find_result

    ctx = app.ctx

    def finish(name: str | None, progress=gr.Progress()) -> str:
        result = find_result(ctx.outputs_dir, name)
        if result is None:
            raise gr.Error(f"no saved result named {name!r} in {ctx.outputs_dir}; pick one from the gallery")
        try:
            with ctx.gpu_lock:
                done = run_step(result.video, FinishStep(step, 2), ctx.runner.cache,
                                lambda i, n, message: progress((i, n), desc=message, unit="frames"))
        except RequestError as exc:  # e.g. a 1-frame video for interpolation: named, and the app stays up
            raise gr.Error(str(exc)) from None
        except Exception as exc:
            logger.exception("%s of %s failed", step, name)
            raise gr.Error(f"{step} failed: {type(exc).__name__}: {exc}") from None
        notes = "".join(f"\n- {n}" for n in done.notes)
        return f"**{Path(done.video).name}**: {done.summary()}{notes}"

    finish.__name__ = f"{step}_result"
    return finish


def make_reuse(app: FitVideoApp):
    """Reuse settings: a past result's fields into its tab and the Optimization tab; the other tabs stay."""
    import gradio as gr

    from configs.schema import get_model_spec
    from reports.catalog import offered_models, resolutions_for
    from ui.fields import fields_from_request
    from engine.results import find_result

    ctx = app.ctx

    def reuse(name: str | None):
        result = find_result(ctx.outputs_dir, name)
        if result is None:
            raise gr.Error(f"no saved result named {name!r} in {ctx.outputs_dir}; pick one from the gallery")
        req = result.request
        tab, values = app.task_tabs[req.task], fields_from_request(req)
        components = {**app.optimization.fields(), **tab.fields()}
        dependent = ("model", "frames", "resolution", "image", "video")  # set below, when they still apply
        updates = {c: values[n] for n, c in components.items() if n not in dependent}
        if values.get("guidance_2") is None:  # one transformer: the hidden slider keeps its value
            updates.pop(tab.guidance_2, None)
        names = [row[0] for row in values["loras"]]  # the picker shows the LoRAs the table holds
        updates[tab.lora_pick] = gr.Dropdown(choices=sorted({*lora_choices(req.model), *names}), value=names)
        updates.update({app.active_task: req.task, app.gallery.reuse_task: req.task})  # SELECT_TAB_JS opens it
        if req.model in offered_models(req.task, ctx.models_dir):  # a model still offered for the task
            spec = get_model_spec(req.model)
            updates[tab.model] = req.model
            updates[tab.frames] = gr.Slider(maximum=spec.max_frames, step=spec.frame_step, value=req.frames)
            choices = resolutions_for(req.model, req.task)
            updates[tab.resolution] = gr.Dropdown(choices=choices, value=values["resolution"])
        for n in ("image", "video"):  # a kept input, when it is still on disk
            if n in components and values[n] and Path(values[n]).is_file():
                updates[components[n]] = values[n]
        gr.Info(f"settings of {name} loaded into the {req.task.upper()} tab")
        return updates

    return reuse


# =========================================================================== build and serve


def register_api(endpoints: list, queue_size: int) -> None:
    from ui.api import register

    register(endpoints, queue_size)


def start_queue(ctx: AppContext, queue_size: int) -> "JobQueue":
    """The job queue on `<outputs>/.queue`, read back after a restart, its worker started."""
    from engine.jobs import QUEUE_SUBDIR, JobQueue, is_complete, latents_saved, run_job

    queue = JobQueue(ctx.outputs_dir / QUEUE_SUBDIR, lambda job: run_job(ctx.runner, job, ctx.gpu_lock),
                     max_waiting=queue_size)
    queue.notes = queue.recover(is_complete, latents_saved)
    queue.start()
    return queue


def build_app(
    runner: "Runner",
    default_quant: str = "none",
    queue_size: int = DEFAULT_QUEUE_SIZE,
    refresh_s: float = PAGE_REFRESH_S,
    models_dir: str | Path | None = None,
) -> FitVideoApp:
    """The whole UI around one runner. Loads no model: everything heavy waits for Generate. Diffusers folders
    under `models_dir` are listed with the registry models."""
    import gradio as gr

    from configs.schema import TASKS
    from decode.writer import remove_partials
    from reports.catalog import model_statuses

    ctx = AppContext(runner, Path(runner.outputs_dir), default_quant, models_dir=Path(models_dir) if models_dir else None)
    remove_partials(ctx.outputs_dir)  # a killed run never leaves a half video in the gallery
    ctx.queue = start_queue(ctx, queue_size)  # jobs a restart left waiting run again
    statuses = {task: model_statuses(task, ctx.models_dir) for task in TASKS}
    demo_only = not any(s.ready and not s.tiny for ss in statuses.values() for s in ss)

    with gr.Blocks(title="FitVideo", delete_cache=(3600, 86400)) as demo:
        with gr.Row():
            gr.Markdown("## FitVideo", elem_classes=["fv-header"])
            header = gr.Markdown(label="Memory summary", elem_id="memory-line")
        if demo_only:
            gr.Markdown(
                "No model weights on this machine yet: the **tiny demo model** (random weights, the video is noise) "
                "is selected so Generate works on the first click. Real models are one choice away in the model list."
            )
        active_task = gr.State("t2v")
        jobs = render_jobs()
        with gr.Tabs(selected="t2v") as tabs:
            task_tabs = {task: render_task_tab(task, statuses[task]) for task in TASKS}
            with gr.Tab("Gallery", id="gallery"):
                gallery = render_gallery()
            with gr.Tab("Optimization", id="optimization"):
                optimization = render_optimization(ctx)
        app = FitVideoApp(demo, ctx, header, tabs, task_tabs, optimization, gallery, active_task, queue_size, jobs)
        for tab in task_tabs.values():
            listen_task_tab(app, tab)
        listen_page_timer(app, gr.Timer(refresh_s), listen_jobs(app), listen_optimization(app))
        listen_gallery(app)
        register_api(api_endpoints(ctx), queue_size)
    return app


def serve(
    app: FitVideoApp,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    max_file_size: str | int = DEFAULT_MAX_UPLOAD,
) -> str:
    """Launch with the GPU queue bounded; serve files only from the outputs folder. Returns the local URL
    at once (the server runs in its own thread; `app.demo.block_thread()` waits on it)."""
    _, url, _ = app.demo.queue(max_size=app.queue_size, default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        allowed_paths=[str(app.ctx.outputs_dir.resolve())],
        max_file_size=max_file_size,
        prevent_thread_lock=True,
        quiet=True,
        css=CSS,
        # The Gallery and its sidecars are the history; Gradio's own copies every call's inputs and component
        # configs into localStorage on each event, which keeps a 2-core machine's browser busy
        run_history=False,
    )
    return url


def launch(argv: list[str]) -> int:
    args = build_launch_parser().parse_args(argv)
    # Checks first: a refusal costs no imports and no model.
    problem = check_launch_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if port_in_use(host, args.port):
        print(
            f"error: port {args.port} is already in use (another FitVideo or another server); "
            f"pick a free one with --port {args.port + 1}",
            file=sys.stderr,
        )
        return 2
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported
    if args.loras_dir:
        os.environ["FITVIDEO_LORAS_DIR"] = str(Path(args.loras_dir).expanduser().resolve())
    from ui.cli import precision_from_args, setup_logging

    setup_logging()
    from engine.cache import PipelineCache
    from engine.runner import Runner

    runner = Runner(PipelineCache(args.max_cache_size), outputs_dir=args.outputs_dir)
    from engine.tiny import fitvideo_home

    models_dir = args.models_dir or fitvideo_home() / "models"
    app = build_app(runner, precision_from_args(args), queue_size=args.queue_size, models_dir=models_dir)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    logger.info("outputs in %s; no model is loaded until Generate is pressed", Path(args.outputs_dir).resolve())
    try:
        url = serve(app, host=host, port=args.port, share=args.share, auth=auth)
    except OSError as exc:  # lost a race for the port after the check
        print(f"error: cannot serve on {host}:{args.port}: {exc}; try --port {args.port + 1}", file=sys.stderr)
        return 2
    logger.info("FitVideo is running on %s%s", url, f" (public link: {app.demo.share_url})" if args.share else "")
    app.demo.block_thread()  # until Ctrl+C
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLI_COMMANDS:
        from ui.cli import main as cli_main

        return cli_main(argv)
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
