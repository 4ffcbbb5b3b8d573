"""FitVideo: `python app.py` launches the web UI; `python app.py generate ...` runs headless.

Launch flags and the page's layout, nothing else: the CLI subcommands go to ui.cli, and each part of the page is a
module in ui/ (facefusion style) whose `render` returns its components in a dataclass and whose `listen` wires
them: ui.task_tab (T2V / I2V / V2V), ui.optimization, ui.gallery, ui.jobs (and the page timer), ui.charts; what
the page's events and the API share (a Generate, a plan, an upload) is ui.context, the typed API endpoints ui.api,
fields <-> request ui.fields. No model loads until Generate is pressed. Gradio is imported only inside functions,
so the CLI never pays for it.

    build_app(runner)  -> FitVideoApp (the Blocks, its parts, the per-app state)
    serve(app, ...)    -> URL (launch with the queue, auth, upload cap and allowed paths; the HTTP job API mounted)
    main(argv)         -> the `python app.py` entry point (flags, or the CLI subcommands)
"""
import argparse
import dataclasses
import importlib.util
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # gradio is imported lazily: the CLI subcommands never load it
    from engine.runner import Runner
    from ui.context import FitVideoApp

CLI_COMMANDS = ("generate", "decode", "upscale", "interpolate")
logger = logging.getLogger("fitvideo")

DEFAULT_QUEUE_SIZE = 16  # waiting jobs beyond this are refused ("queue full") instead of piling up
DEFAULT_MAX_UPLOAD = "200mb"  # per uploaded file (images, input videos)
PAGE_REFRESH_S = 2.0  # one timer for the page: the Jobs panel, the memory panels (the live chart: ui.jobs)
CSS = """
.fv-plan table, .fv-memory table, #jobs-table table { font-size: 0.9em; }
#jobs-table th, #jobs-table td { white-space: nowrap; padding-top: 2px; padding-bottom: 2px; }
.fv-header { margin-bottom: 0; }
"""


# =========================================================================== launch flags


def build_launch_parser() -> argparse.ArgumentParser:
    from ui.cli import add_offline_flag, add_precision_flags

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
    p.add_argument("--ray", default=None, metavar="local|auto|ADDRESS",
                   help="run jobs on Ray workers, one per GPU: `local` starts Ray here, `auto` or an address joins a "
                        "cluster started with `ray start` (needs: pip install ray==2.60.0)")
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="with --ray: N workers (on CPUs where there is no GPU); default one per GPU")
    p.add_argument("--mcp", action="store_true",
                   help="also serve the API endpoints as MCP tools at /gradio_api/mcp/ (needs: pip install mcp==1.30.0)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="share each video's denoise among N processes, one GPU each (Wan; N must divide its "
                        "attention heads); a request's own context_parallel wins. Default 1")
    add_offline_flag(p)
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
    if args.ray_workers is not None and (args.ray is None or args.ray_workers < 1):
        return f"--ray-workers {args.ray_workers} is not allowed; use 1 or more, with --ray local / auto / ADDRESS"
    if args.mcp and importlib.util.find_spec("mcp") is None:
        return "--mcp needs the MCP package: .venv/bin/pip install mcp==1.30.0"
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        return f"--ray {args.ray} needs Ray: .venv/bin/pip install ray==2.60.0"
    if not 1 <= args.context_parallel <= 16:
        return f"--context-parallel {args.context_parallel} is not allowed; use 1 (off) to 16 processes"
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


# =========================================================================== the page


def build_app(
    runner: "Runner",
    default_quant: str = "none",
    queue_size: int = DEFAULT_QUEUE_SIZE,
    refresh_s: float = PAGE_REFRESH_S,
    models_dir: str | Path | None = None,
    workers: list | None = None,
) -> "FitVideoApp":
    """The whole UI around one runner. Loads no model: everything heavy waits for Generate. Diffusers folders
    under `models_dir` are listed with the registry models. `workers`: Ray's (engine/ray_workers.py) run the jobs
    instead of `runner` (which still plans and answers the page)."""
    import gradio as gr

    from configs.schema import TASKS
    from decode.writer import remove_partials
    from reports.catalog import model_statuses
    from ui import gallery, jobs, optimization, task_tab
    from ui.api import register
    from ui.context import AppContext, FitVideoApp, api_endpoints, start_queue

    ctx = AppContext(runner, Path(runner.outputs_dir), default_quant, models_dir=Path(models_dir) if models_dir else None)
    remove_partials(ctx.outputs_dir)  # a killed run never leaves a half video in the gallery
    ctx.queue = start_queue(ctx, queue_size, workers)  # jobs a restart left waiting run again
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
        jobs_panel = jobs.render()
        with gr.Tabs(selected="t2v") as tabs:
            task_tabs = {task: task_tab.render(task, statuses[task]) for task in TASKS}
            with gr.Tab("Gallery", id="gallery"):
                gallery_panel = gallery.render()
            with gr.Tab("Optimization", id="optimization"):
                optimization_panel = optimization.render(ctx)
        app = FitVideoApp(demo=demo, ctx=ctx, header=header, tabs=tabs, task_tabs=task_tabs,
                          optimization=optimization_panel, gallery=gallery_panel, active_task=active_task,
                          queue_size=queue_size, jobs=jobs_panel)
        for tab in task_tabs.values():
            task_tab.listen(app, tab)
        jobs.listen_page_timer(app, gr.Timer(refresh_s), jobs.listen(app), optimization.listen(app))
        gallery.listen(app)
        register(api_endpoints(ctx), queue_size)
    return app


@dataclass(frozen=True)
class Serving:
    """How the page is served (the launch flags): address, public link, login, upload cap, MCP tools."""

    host: str = "127.0.0.1"
    port: int | None = None
    share: bool = False
    auth: tuple[str, str] | None = None
    max_file_size: str | int = DEFAULT_MAX_UPLOAD
    mcp: bool = False  # the API endpoints (/t2v, /plan_t2v, ...) as MCP tools at /gradio_api/mcp/ too


def serve(app: "FitVideoApp", how: Serving = Serving(), **changes) -> str:
    """Launch with the GPU queue bounded; serve files only from the outputs folder (`changes`: Serving's fields,
    `serve(app, port=7861, auth=("a", "b"))`). Returns the local URL at once (the server runs in its own thread;
    `app.demo.block_thread()` waits on it)."""
    how = dataclasses.replace(how, **changes)
    _, url, _ = app.demo.queue(max_size=app.queue_size, default_concurrency_limit=1).launch(
        server_name=how.host,
        server_port=how.port,
        share=how.share,
        auth=how.auth,
        allowed_paths=[str(app.ctx.outputs_dir.resolve())],
        max_file_size=how.max_file_size,
        prevent_thread_lock=True,
        quiet=True,
        css=CSS,
        # The Gallery and its sidecars are the history; Gradio's own copies every call's inputs and component
        # configs into localStorage on each event, which keeps a 2-core machine's browser busy
        run_history=False,
        mcp_server=how.mcp,
    )
    from ui.http_api import mount

    mount(app, how.auth)  # /v1/videos: the same queue over plain HTTP, behind the same login
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
    from ui.cli import apply_environment, precision_from_args

    apply_environment(args)
    from engine.cache import PipelineCache
    from engine.runner import Runner
    from engine.tiny import fitvideo_home

    runner = Runner(PipelineCache(args.max_cache_size), outputs_dir=args.outputs_dir)
    models_dir = args.models_dir or fitvideo_home() / "models"
    workers = None
    if args.ray:
        from engine.ray_workers import start_workers

        workers = start_workers(args.ray, args.ray_workers, args.outputs_dir, args.max_cache_size)
    app = build_app(runner, precision_from_args(args), queue_size=args.queue_size, models_dir=models_dir,
                    workers=workers)
    app.ctx.context_parallel = args.context_parallel
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    logger.info("outputs in %s; no model is loaded until Generate is pressed", Path(args.outputs_dir).resolve())
    try:
        url = serve(app, host=host, port=args.port, share=args.share, auth=auth, mcp=args.mcp)
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
