"""The Jobs panel (every job the server has, this person's with a login: seen from any tab, after any reload) and
the page's one timer.

    render()                        -> JobsPanel (the components, by name)
    listen(app)                     -> Stop for a picked job, `/jobs`; returns the panel's refresh for the timer
    listen_page_timer(app, timer, jobs, memory) -> one tick for the Jobs panel, the memory panels and the live chart
"""
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gradio as gr

    from ui.context import FitVideoApp

LIVE_REFRESH_S = 6.0  # the live memory chart (a redraw costs the browser more than the table)


@dataclass
class JobsPanel:
    table: "gr.Markdown"
    preview: "gr.Image"  # the running job's latent preview
    result: "gr.Video"  # the latest finished job's video (this person's)
    pick: "gr.Dropdown"  # a live job to stop
    stop: "gr.Button"
    data: "gr.JSON"  # the same list for API clients (/jobs)
    shown: "gr.State"  # the result video this page shows (sent once, not every tick)


def render() -> JobsPanel:
    """Every job the server has (this person's, with a login): seen from any tab, after any reload."""
    import gradio as gr

    with gr.Accordion("Jobs", open=True, elem_id="jobs-panel"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                table = gr.Markdown("No jobs yet.", elem_id="jobs-table")
                with gr.Row(equal_height=True):
                    pick = gr.Dropdown([], value=None, label="Running or waiting job", elem_id="jobs-pick", scale=3,
                                       allow_custom_value=True, container=False)
                    stop = gr.Button("Stop job", variant="stop", elem_id="jobs-stop", scale=1, size="sm")
            with gr.Column(scale=2):
                with gr.Row():
                    preview = gr.Image(None, label="Running job (latest preview)", elem_id="jobs-preview",
                                       interactive=False, height=150, type="numpy")
                    result = gr.Video(None, label="Your latest result", elem_id="jobs-result", interactive=False,
                                      height=150)
        data = gr.JSON(visible=False)
    return JobsPanel(table=table, preview=preview, result=result, pick=pick, stop=stop, data=data, shown=gr.State({}))


def listen(app: "FitVideoApp") -> tuple:
    """The Jobs panel: Stop for a picked job, `/jobs`; returns the panel's refresh and its outputs for the page
    timer (`listen_page_timer`)."""
    import gradio as gr

    from reports.jobs import jobs_markdown

    ctx, panel = app.ctx, app.jobs

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
    return make_refresh(app), outputs


def make_refresh(app: "FitVideoApp"):
    """The panel's refresh, one per page tick: the jobs table, the running job's preview (the panel's, and each tab's
    own job's), the latest result, the live jobs to stop, and the gallery when a new result came."""
    import gradio as gr

    from engine.results import gallery_items, list_results
    from reports.jobs import jobs_markdown

    ctx = app.ctx

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
        now = {"table": jobs_markdown(jobs, running_memory(running)), "video": latest, "pick": repr(live), "preview": repr(stamp),
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

    return refresh


def running_memory(job) -> str:
    """The running job's memory for the panel (the process's RSS and the host budget that binds), or ""."""
    if job is None:
        return ""
    import psutil

    from reports.jobs import running_memory_line
    from vram_utils.host_budget import host_limit

    limit = host_limit()
    plan = getattr(getattr(job.result, "plan", None), "host_need_bytes", 0)
    return running_memory_line(psutil.Process().memory_info().rss, limit.text(), plan)


def listen_page_timer(app: "FitVideoApp", timer, jobs: tuple, memory: tuple) -> None:
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
