"""The Optimization tab: memory now and over the last minute, the pipeline cache, the settings every tab shares
(offload, precision, tiling, step cache, attention, compile, previews), the active tab's plan and chart, the leak
sentinel.

    render(ctx) -> OptimizationPanel (the components, by name)
    listen(app) -> wires previews, the memory panels and the cache panel; returns the memory panels' refresh for
                   the page timer (ui.jobs.listen_page_timer)
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from ui.context import GPU_QUEUE, HIDDEN, AppContext

if TYPE_CHECKING:
    import gradio as gr

    from engine.runner import Runner
    from ui.context import FitVideoApp

STEP_CACHE_CHOICES = [  # (label, value); "" = the motion preset's (fast: TaylorSeer)
    ("the preset's (fast: TaylorSeer)", ""), ("off", "off"), ("first-block (threshold 0.05)", "first-block"),
    ("TaylorSeer (interval 5)", "taylorseer"), ("MagCache (threshold 0.06; first run calibrates)", "magcache"),
    ("Pyramid Attention Broadcast (CogVideoX)", "pab"), ("FasterCache (CogVideoX)", "fastercache"),
]
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
STEP_CACHE_HELP = (
    "reuse transformer work between steps: faster, some quality loss (random weights cannot show it). NAME:NUMBER "
    "sets its threshold / interval. Which apply depends on the model and task (Wan: first-block, TaylorSeer, "
    "MagCache; CogVideoX: all; Wan V2V: none; first-block needs 2+ blocks, MagCache one transformer): the plan line "
    "says when one does not"
)


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


def cache_choices(runner: "Runner") -> list[tuple[str, str]]:
    return [(f"{m} · {t} · {q}", f"{m}|{t}|{q}") for m, t, q in runner.cache.keys()]


# =========================================================================== render


def render(ctx: AppContext) -> OptimizationPanel:
    """Memory and the cache on the left, the settings for every tab on the right; the plan and the leak sentinel
    under both."""
    import gradio as gr

    from reports.text import leak_markdown
    from ui.charts import render_plan_plot

    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            memory = render_memory(ctx)
        with gr.Column(scale=1):
            settings = render_settings(ctx)
    gr.Markdown("### Pre-flight plan for the active tab")
    plan = gr.Markdown(label="Pre-flight plan", elem_id="plan-panel", elem_classes=["fv-plan"])
    plan_plot = render_plan_plot()
    gr.Markdown("### Memory after each run (leak sentinel)")
    leaks = gr.Markdown(leak_markdown(ctx.runner), label="Leak sentinel", elem_id="leak-panel")
    return OptimizationPanel(plan=plan, plan_plot=plan_plot, leaks=leaks, **memory, **settings)


def render_memory(ctx: AppContext) -> dict[str, Any]:
    """Memory now and over the last minute; the pipeline cache: what is loaded, unload, MAX_CACHE_SIZE."""
    import gradio as gr

    from reports.text import cache_markdown
    from ui.charts import render_live_plot

    gr.Markdown("### Memory (live)")
    memory = gr.Markdown(label="Memory", elem_id="memory-panel", elem_classes=["fv-memory"])
    live_plot = render_live_plot()
    gr.Markdown("### Pipeline cache")
    cache = gr.Markdown(cache_markdown(ctx.runner), label="Cache", elem_id="cache-panel", elem_classes=["fv-memory"])
    cache_pick = gr.Dropdown(cache_choices(ctx.runner), value=None, label="Loaded pipeline")
    with gr.Row():
        unload = gr.Button("Unload selected")
        unload_all = gr.Button("Unload all")
    max_cache_size = gr.Number(
        ctx.runner.cache.max_size, label="MAX_CACHE_SIZE", precision=0, minimum=1,
        info="pipelines kept loaded; the least recently used goes first",
    )
    return dict(memory=memory, live_plot=live_plot, cache=cache, cache_pick=cache_pick, unload=unload,
                unload_all=unload_all, max_cache_size=max_cache_size)


def render_settings(ctx: AppContext) -> dict[str, Any]:
    """The request's fields that every tab shares, by name (ui.fields), and the runner's previews switch."""
    import gradio as gr

    from configs.schema import QUANTS, DecodeSettings, OffloadChoice

    d = DecodeSettings()
    gr.Markdown("### Settings for every tab")
    parts: dict[str, Any] = {}
    parts["offload"] = gr.Radio([(OFFLOAD_LABELS[o], o) for o in get_args(OffloadChoice)], value="auto",
                                label="Offload strategy")
    parts["quant"] = gr.Radio([(PRECISION_LABELS[q], q) for q in QUANTS], value=ctx.default_quant, label="Precision")
    parts["vae_tiling"] = gr.Checkbox(d.enable_vae_tiling, label="VAE tiling", info=TILING_HELP)
    parts["step_cache"] = gr.Dropdown(STEP_CACHE_CHOICES, value="", label="Step cache", elem_id="step-cache",
                                      allow_custom_value=True, info=STEP_CACHE_HELP)
    parts.update(render_speed_knobs())
    parts["previews"] = gr.Checkbox(
        ctx.runner.previews, label="Latent previews while denoising", elem_id="previews",
        info="a small picture of the latents every few steps (at most 5 % of the step time)",
    )
    with gr.Row():
        parts["tile_x"] = gr.Number(d.tile_x, label="Tile width (px)", precision=0, minimum=32)
        parts["tile_y"] = gr.Number(d.tile_y, label="Tile height (px)", precision=0, minimum=32)
        parts["tile_stride_x"] = gr.Number(d.tile_stride_x, label="Stride x (px)", precision=0, minimum=32)
        parts["tile_stride_y"] = gr.Number(d.tile_stride_y, label="Stride y (px)", precision=0, minimum=32)
    parts["fixed_tiles"] = gr.Checkbox(d.fixed_tiles, label="Tiles as set", elem_id="fixed-tiles",
                                       info="off: at these defaults the planner sizes the tiles; on: exactly these")
    return parts


def render_speed_knobs() -> dict[str, Any]:
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
    return dict(attention=attention, compile=compile_box)


# =========================================================================== listen


def listen(app: "FitVideoApp") -> tuple:
    """The Optimization tab's events; returns its memory panels' refresh and outputs for the page timer."""
    from reports.text import leak_markdown, memory_markdown

    ctx, opt = app.ctx, app.optimization

    def memory_panels():
        import vram_utils

        info = vram_utils.probe()
        return memory_markdown(info), info.summary(), leak_markdown(ctx.runner)

    opt.previews.input(lambda on: setattr(ctx.runner, "previews", bool(on)), opt.previews, None, **HIDDEN)
    panels = [opt.memory, app.header, opt.leaks]
    app.demo.load(memory_panels, None, panels, api_name="memory", queue=False, show_progress="hidden")
    listen_cache(app)
    return memory_panels, [*panels, opt.live_plot]


def listen_cache(app: "FitVideoApp") -> None:
    """The pipeline cache panel: what is loaded, unload one or all, MAX_CACHE_SIZE."""
    import gradio as gr

    from reports.text import cache_markdown, fmt_bytes
    from ui.fields import whole

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
