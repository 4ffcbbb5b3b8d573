"""A task's tab (T2V, I2V, V2V): its settings (the LoRA panel is ui.loras), the plan line, Generate / Stop and the
result column.

    render(task, statuses) -> TaskTab (the components, by name)
    listen(app, tab)       -> wires the dependent fields, the plan preview and Generate / Stop
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ui import loras as lora_panel
from ui.context import (
    HIDDEN, AppContext, check_input, plan_texts, preview_request, stopped_text, submit_and_wait, two_experts,
)

if TYPE_CHECKING:
    import gradio as gr

    from reports.catalog import ModelStatus
    from ui.context import FitVideoApp

DEFAULT_PROMPT = "a cat walks on the beach at sunset, cinematic"  # so the very first click works
STOP_WAIT_S = 60.0  # how long Stop waits for the run to reach its next step before answering
TITLES = {"t2v": "Text to video", "i2v": "Image to video", "v2v": "Video to video"}
FINISH_CHOICES = [("off", 0), ("x2", 2), ("x4", 4)]


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


# =========================================================================== render


def render(task: str, statuses: "list[ModelStatus]") -> TaskTab:
    """The tab: the model, inputs and prompt, then Generate / Stop and the plan line (on the first screen, whatever
    the Jobs panel above holds), then the other settings; the result on the right."""
    import gradio as gr

    with gr.Tab(task.upper(), id=task) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                settings = render_head(task, statuses)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
                plan_line = gr.Markdown(label="Plan", elem_id=f"{task}-plan", elem_classes=["fv-plan"])
                settings.update(render_settings(task, settings["model"].value))
            with gr.Column(scale=1):
                result = render_result(task)
    return TaskTab(task=task, tab=tab, plan_line=plan_line, generate=generate, stop=stop, **settings, **result)


def render_head(task: str, statuses: "list[ModelStatus]") -> dict[str, Any]:
    """The fields above Generate, by name: the model (and what it is), the input image / video, the prompt."""
    import gradio as gr

    from reports.catalog import default_model

    model = default_model(statuses)
    gr.Markdown(f"### {TITLES[task]}")
    parts: dict[str, Any] = {}
    parts["model"] = gr.Dropdown([(s.label, s.model) for s in statuses], value=model, label="Model",
                                 elem_id=f"{task}-model", info="only models that serve this task")
    parts["model_note"] = gr.Markdown(next(s.note for s in statuses if s.model == model), elem_id=f"{task}-model-note")
    parts.update(render_inputs(task))
    parts["prompt"] = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, elem_id=f"{task}-prompt")
    return parts


def render_settings(task: str, model: str) -> dict[str, Any]:
    """The request's fields below Generate, by name: sampling, size, finishing steps, LoRAs."""
    import gradio as gr

    from configs.registry import get_model_spec, load_presets
    from configs.schema import PRESETS, GenerationRequest
    from reports.catalog import resolutions_for

    spec = get_model_spec(model)
    preset = load_presets()["balanced"]
    parts: dict[str, Any] = {}
    parts["negative_prompt"] = gr.Textbox("", label="Negative prompt", lines=1, placeholder="blurry, distorted")
    parts["strength"] = None
    if task == "v2v":
        parts["strength"] = gr.Slider(0.0, 1.0, value=GenerationRequest.strength, step=0.05, label="Strength",
                                      info="how far to move from the input video")
    with gr.Row():
        parts["seed"] = gr.Number(-1, label="Seed", precision=0, info="-1 = random", minimum=-1)
        parts["preset"] = gr.Radio(list(PRESETS), value=preset.name, label="Motion preset",
                                   info="fills steps and guidance")
    parts.update(render_sampling(task, model, preset))
    with gr.Row():
        parts["frames"] = gr.Slider(
            1, spec.max_frames, value=spec.default_frames, step=spec.frame_step, label="Frames",
            info=f"{spec.family}: {spec.frame_rule_text()}", elem_id=f"{task}-frames",
        )
        parts["fps"] = gr.Slider(1, 60, value=spec.fps, step=1, label="FPS")
    resolutions = resolutions_for(model, task)
    parts["resolution"] = gr.Dropdown(resolutions, value=resolutions[0], label="Resolution (height x width)")
    return {**parts, **render_finishing(task), **lora_panel.render(task, model)}


def render_inputs(task: str) -> dict[str, Any]:
    """The tab's input image (I2V) or video (V2V), None where the task takes none. Events read them unprocessed
    (see ui.context.check_input)."""
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
    return dict(image=image, video=video)


def render_sampling(task: str, model: str, preset) -> dict[str, Any]:
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
    return dict(steps=steps, guidance=guidance, guidance_2=guidance_2)


def render_finishing(task: str) -> dict[str, Any]:
    """Finishing steps under the generation settings; the video without them is kept too."""
    import gradio as gr

    with gr.Row():
        upscale = gr.Radio(FINISH_CHOICES, value=0, label="Finish: upscale", elem_id=f"{task}-upscale",
                           info="Real-ESRGAN when its weights are here, else Lanczos (no model)")
        interpolate = gr.Radio(FINISH_CHOICES, value=0, label="Finish: interpolate", elem_id=f"{task}-interpolate",
                               info="ffmpeg minterpolate (no model): N frames -> (N-1) x factor + 1")
    return dict(upscale=upscale, interpolate=interpolate)


def render_result(task: str) -> dict[str, Any]:
    """The result column: the video, the seed used, what happened, the preview while denoising, the memory chart."""
    import gradio as gr

    from ui.charts import render_run_plot

    result = gr.Video(label="Result", interactive=False, autoplay=True, loop=True, buttons=["download"], height=360,
                      elem_id=f"{task}-result")
    used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False)
    info = gr.Markdown(label="Info", elem_id=f"{task}-info")
    preview = gr.Image(None, label="Preview while denoising (the latents, projected to colour)",
                       elem_id=f"{task}-preview", interactive=False, height=200, type="numpy")
    return dict(result=result, used_seed=used_seed, info=info, preview=preview,
                run_plot=render_run_plot(f"{task}-run-chart"))


# =========================================================================== listen


def listen(app: "FitVideoApp", tab: TaskTab) -> None:
    """The tab's events: its dependent fields, the plan preview, Generate and Stop."""
    # Events that take an upload get it unprocessed: check_input reads it and names what is wrong with it.
    raw = dict(preprocess=False) if tab.image is not None or tab.video is not None else {}
    listen_settings(app, tab, raw)
    listen_plan(app, tab, raw)
    listen_run(app, tab, raw)


def listen_settings(app: "FitVideoApp", tab: TaskTab, raw: dict) -> None:
    """Fields that follow others: the model's frames, resolutions, note and second guidance, the preset's steps,
    the LoRAs that fit; an upload checked as it arrives."""
    import gradio as gr

    from reports.catalog import model_status

    # Only the person's own choices change dependent fields (.input), so "reuse settings"
    # can set a model and its frames together without one resetting the other.
    tab.model.input(
        on_model_change(tab.task), [tab.model, tab.frames, tab.resolution], [tab.frames, tab.resolution, tab.fps],
        **HIDDEN,
    )
    tab.model.change(lambda m: model_status(m, tab.task).note, tab.model, tab.model_note, **HIDDEN)
    # The second guidance shows for two-expert models only (.change: also when "reuse settings" sets the model).
    tab.model.change(lambda m: gr.Slider(visible=two_experts(m, tab.task)), tab.model, tab.guidance_2, **HIDDEN)
    tab.preset.input(fill_preset, tab.preset, [tab.steps, tab.guidance], **HIDDEN)
    lora_panel.listen(app, tab)
    upload = tab.image if tab.image is not None else tab.video
    if upload is not None:  # queued, unlike the preview: its errors and warnings show as toasts
        upload.upload(make_check_upload(tab.task), [upload, tab.frames], None, api_visibility="private",
                      show_progress="hidden", **raw)


def listen_plan(app: "FitVideoApp", tab: TaskTab, raw: dict) -> None:
    """The plan follows every setting, before Generate is pressed: the tab's line, and the Optimization tab's plan
    and chart for the active tab."""
    import gradio as gr

    ctx, opt = app.ctx, app.optimization
    kwargs = {**tab.fields(), **opt.fields()}
    gr.on(
        [c.change for c in kwargs.values()] + [app.demo.load], make_preview(ctx, tab.task), inputs=[app.active_task],
        inputs_kwargs=kwargs, outputs=[tab.plan_line, opt.plan], api_visibility="private", queue=False,
        show_progress="hidden", trigger_mode="always_last", **raw,
    ).then(make_plan_chart(ctx, tab.task), inputs=[app.active_task], inputs_kwargs=kwargs, outputs=opt.plan_plot,
           **HIDDEN, **raw)
    tab.tab.select(
        make_select(ctx, tab.task), inputs_kwargs=kwargs, outputs=[app.active_task, tab.plan_line, opt.plan],
        **HIDDEN, **raw,
    ).then(make_plan_chart(ctx, tab.task), inputs=[app.active_task], inputs_kwargs=kwargs, outputs=opt.plan_plot,
           **HIDDEN, **raw)


def listen_run(app: "FitVideoApp", tab: TaskTab, raw: dict) -> None:
    """Generate (a job; afterwards the cache panel, gallery, model labels and the run's chart) and Stop."""
    from ui.charts import run_plot_update

    ctx, opt = app.ctx, app.optimization
    run = tab.generate.click(
        make_generate(ctx, tab.task), inputs_kwargs={**tab.fields(), **opt.fields()},
        outputs=[tab.result, tab.used_seed, tab.info], api_visibility="private", concurrency_id="jobs",
        concurrency_limit=app.queue_size + 1, show_progress_on=[tab.result], **raw,
    )
    run.success(
        lambda: after_run(app, tab.task), None,
        [opt.cache, opt.cache_pick, app.gallery.gallery, app.gallery.pick, tab.model], **HIDDEN,
    )
    run.success(lambda seed: run_plot_update(latest_sidecar(ctx, tab.task, seed)), tab.used_seed, tab.run_plot,
                **HIDDEN)
    # Stop ends a running job at its next step (the flag) and removes a queued one (cancels=).
    tab.stop.click(make_stop(ctx, tab.task), None, tab.info, cancels=[run], queue=False, api_name=f"stop_{tab.task}")


# =========================================================================== event handlers


def on_model_change(task: str):
    import gradio as gr

    from configs.registry import get_model_spec
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
    from configs.registry import load_presets

    preset = load_presets()[name]
    return preset.steps, preset.guidance


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
    from ui.charts import plan_plot_update

    def chart(active: str, **values):
        if active != task:
            return gr.skip()
        try:
            _, plan = preview_request(ctx, task, values)
        except RequestError:
            plan = None
        return plan_plot_update(plan)

    chart.__name__ = f"plan_chart_{task}"
    return chart


def make_generate(ctx: AppContext, task: str):
    """The tab's Generate button (a page event; programs use the typed `/t2v`... endpoints of ui/api.py)."""
    import gradio as gr

    async def generate(request: gr.Request, progress=gr.Progress(), **values):
        video, seed, markdown, _ = await submit_and_wait(ctx, task, values, request, progress)
        return video, seed, markdown

    generate.__name__ = f"generate_{task}"
    return generate


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


def after_run(app: "FitVideoApp", task: str) -> tuple:
    """Cache panel, gallery and model labels (a first run may have downloaded weights) after a run."""
    import gradio as gr

    from engine.results import gallery_items, list_results
    from reports.catalog import model_statuses
    from reports.text import cache_markdown
    from ui.optimization import cache_choices

    results = list_results(app.ctx.outputs_dir)
    return (
        cache_markdown(app.ctx.runner),
        gr.Dropdown(choices=cache_choices(app.ctx.runner)),
        gallery_items(results),
        gr.Dropdown(choices=[r.name for r in results]),
        gr.Dropdown(choices=[(s.label, s.model) for s in model_statuses(task, app.ctx.models_dir)]),
    )


def latest_sidecar(ctx: AppContext, task: str, seed: Any) -> dict | None:
    """The newest result of `task` with `seed` (the one a tab just showed), as its sidecar's JSON."""
    from engine.results import list_results

    for result in list_results(ctx.outputs_dir):
        if result.data["request"].get("task") == task and result.data["request"].get("seed") == seed:
            return result.data
    return None
