"""The Gallery tab: past results (newest first), a result's details and memory chart, Reuse settings, and finishing
steps on a picked result.

    render()    -> GalleryPanel (the components, by name)
    listen(app) -> wires refresh, pick, details, Reuse and the finishing buttons
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ui.context import GPU_QUEUE, HIDDEN

if TYPE_CHECKING:
    import gradio as gr

    from ui.context import FitVideoApp

logger = logging.getLogger(__name__)

# Reuse opens the result's tab in the page (see listen): the tab's button, found by its name.
SELECT_TAB_JS = """(task) => { const name = task.toUpperCase();
  const button = [...document.querySelectorAll('button[role=tab]')].find(b => b.innerText.trim() === name);
  if (button) button.click(); return []; }"""


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


def render() -> GalleryPanel:
    import gradio as gr

    from ui.charts import render_run_plot

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
    return GalleryPanel(gallery=gallery, pick=pick, details=details, reuse=reuse, refresh=refresh, upscale=upscale,
                        interpolate=interpolate, run_plot=run_plot, reuse_task=reuse_task)


def listen(app: "FitVideoApp") -> None:
    import gradio as gr

    from engine.results import find_result, gallery_items, list_results
    from reports.text import result_details
    from ui.charts import run_plot_update

    ctx, g = app.ctx, app.gallery

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
    g.refresh.click(refresh, None, [g.gallery, g.pick], **HIDDEN)
    g.gallery.select(select, None, g.pick, **HIDDEN)
    g.pick.change(details, g.pick, g.details, api_name="result_details", queue=False).then(
        lambda name: run_plot_update(getattr(find_result(ctx.outputs_dir, name), "data", None)), g.pick, g.run_plot,
        **HIDDEN)

    outputs = [app.active_task, g.reuse_task, *app.optimization.fields().values()]
    for tab in app.task_tabs.values():
        outputs += [*tab.fields().values(), tab.lora_pick]
    # The tab is switched in the page: a gr.Tabs output keeps a loading status on the Tabs, and from then on
    # every event (each timer tick) makes Gradio's frontend copy the value of every component under it
    g.reuse.click(make_reuse(app), g.pick, outputs, api_name="reuse", queue=False).success(
        None, g.reuse_task, None, js=SELECT_TAB_JS, **HIDDEN)
    for button, step in ((g.upscale, "upscale"), (g.interpolate, "interpolate")):
        button.click(make_finish(app, step), g.pick, [g.details], api_name=f"{step}_result",
                     concurrency_id=GPU_QUEUE, concurrency_limit=1).success(refresh, None, [g.gallery, g.pick], **HIDDEN)


def make_finish(app: "FitVideoApp", step: str):
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


def make_reuse(app: "FitVideoApp"):
    """Reuse settings: a past result's fields into its tab and the Optimization tab; the other tabs stay."""
    import gradio as gr

    from configs.registry import get_model_spec
    from engine.results import find_result
    from reports.catalog import offered_models, resolutions_for
    from ui.fields import fields_from_request
    from ui.loras import lora_choices

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
