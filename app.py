"""FitVideo: `python app.py` launches the web UI; `python app.py generate ...` runs headless.

Thin by design: it builds the Gradio Blocks or hands the CLI flags to
pipeline_utils.cli. No model loads until Generate is pressed. This is the only
module that imports gradio (and only inside functions, so the CLI never pays for it).

Layout (facefusion style): each part of the page is rendered by one `render_*`
function that returns its components in a dataclass, and wired by one `listen_*`
function. Option lists come from the `Literal` types in configs.schema.

    build_app(runner)  -> FitVideoApp (the Blocks, its parts, the per-app state)
    serve(app, ...)    -> URL (launch with the queue, auth, upload cap and allowed paths)
    main(argv)         -> the `python app.py` entry point (flags, or the CLI subcommands)
"""
import argparse
import asyncio
import contextvars
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:  # gradio is imported lazily: the CLI subcommands never load it
    import gradio as gr

    from configs.schema import GenerationRequest, Plan
    from pipeline_utils.runner import ProgressEvent, Runner, RunResult

CLI_COMMANDS = ("generate", "decode")
logger = logging.getLogger("fitvideo")

GPU_QUEUE = "gpu"  # one concurrency group for everything that touches the models: one run at a time
DEFAULT_QUEUE_SIZE = 16  # waiting jobs beyond this are refused ("queue full") instead of piling up
DEFAULT_MAX_UPLOAD = "200mb"  # per uploaded file (images, input videos)
MEMORY_REFRESH_S = 2.0
GALLERY_LIMIT = 60  # newest results shown; older ones stay on disk
STOP_WAIT_S = 60.0  # how long Stop waits for the run to reach its next step before answering
DOWNLOAD_MB_PER_S = 50  # for the "first run fetches N GB, about M min" estimate
INPUTS_SUBDIR = "inputs"  # uploads are copied here so a result's settings can be reused after a restart
FALLBACK_MODEL = "tiny-cogvideox"
PLAN_PLACEHOLDER_INPUT = Path(__file__)  # see preview_request
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
    "VAE tiling decodes the video in overlapping tiles instead of whole frames. "
    "272 px tiles with a 144 x 128 px stride (about 47% overlap, so no seams) cut the decode peak "
    "by about 60% (1280x720, 61 frames: ~20 GB -> ~8 GB) for 15-20% more decode time. "
    "Tile size is the largest tile and tile - stride the smallest overlap; tiles shrink to the smallest size "
    "that keeps it. Frames smaller than a tile are decoded whole. Turn it off only when memory is plentiful."
)
CSS = """
.fv-plan table, .fv-memory table { font-size: 0.9em; }
.fv-header { margin-bottom: 0; }
"""


# =========================================================================== launch flags


def build_launch_parser() -> argparse.ArgumentParser:
    from pipeline_utils.cli import add_precision_flags

    p = argparse.ArgumentParser(prog="app.py", description="FitVideo web UI (or: app.py generate --help)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--listen", action="store_true", help="serve on all network interfaces (needs --auth)")
    p.add_argument("--share", action="store_true", help="create a public Gradio link (needs --auth)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--insecure", action="store_true", help="allow --listen/--share without --auth")
    p.add_argument("--max-cache-size", type=int, default=None, help="pipelines kept loaded (default 2)")
    p.add_argument("--outputs-dir", default="outputs", help="where videos and their JSON sidecars go")
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
class Job:
    """One running generation: its stop flag, a done signal, and the last progress it reported."""

    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    last: "ProgressEvent | None" = None


class Jobs:
    """Running jobs by (browser session, task), so each tab's Stop reaches its own run."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], Job] = {}
        self._lock = threading.Lock()

    def start(self, key: tuple[str, str]) -> Job:
        job = Job()
        with self._lock:
            self._jobs[key] = job
        return job

    def finish(self, key: tuple[str, str], job: Job) -> None:
        job.done.set()
        with self._lock:
            if self._jobs.get(key) is job:
                del self._jobs[key]

    def stop(self, key: tuple[str, str]) -> Job | None:
        with self._lock:
            job = self._jobs.get(key)
        if job is not None:
            job.stop.set()
        return job


@dataclass
class AppContext:
    runner: "Runner"
    outputs_dir: Path
    default_quant: str = "none"
    jobs: Jobs = field(default_factory=Jobs)


# =========================================================================== models and requests


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class ModelStatus:
    model: str
    ready: bool  # weights on this machine (or built in)
    tiny: bool  # the random-weight demo family
    label: str  # for the dropdown
    note: str  # markdown shown under the dropdown


def model_status(model: str, task: str) -> ModelStatus:
    """Whether a model's weights are here, and if not, the download and the command that fetches it."""
    from configs.schema import get_model_spec
    from pipeline_utils.loaders import ModelUnavailableError, is_offline, resolve_source

    spec = get_model_spec(model)
    if spec.tiny:
        return ModelStatus(
            model, True, True, f"{spec.label} · built in, no download",
            "**Demo model with random weights**: built in, no download, the video is noise. "
            "It checks the machinery (queue, progress, memory plan, decode, saving) in about a second.",
        )
    repo = spec.tasks[task].repo
    fetch = f"`hf download {repo}`"
    minutes = max(1, round(spec.download_gb * 1000 / DOWNLOAD_MB_PER_S / 60))
    try:
        source = resolve_source(model, task)  # a file-system look-up; nothing loads
    except ModelUnavailableError:  # offline with no complete copy, or an incomplete download
        detail = "offline mode, no complete local copy" if is_offline() else "the local copy is incomplete"
        return ModelStatus(
            model, False, False, f"{spec.label} · not on this machine ({spec.download_gb:.0f} GB)",
            f"**Not on this machine** ({detail}). Fetch it with {fetch} "
            f"({spec.download_gb:.1f} GB, about {minutes} min at {DOWNLOAD_MB_PER_S} MB/s).",
        )
    if source.folder is not None:
        return ModelStatus(
            model, True, False, f"{spec.label} · on this machine", f"**On this machine**: `{source.folder}`"
        )
    return ModelStatus(
        model, False, False, f"{spec.label} · download {spec.download_gb:.0f} GB on first run",
        f"**Not on this machine yet**: the first Generate downloads {spec.download_gb:.1f} GB "
        f"(about {minutes} min at {DOWNLOAD_MB_PER_S} MB/s). To fetch it ahead: {fetch}.",
    )


def model_statuses(task: str) -> list[ModelStatus]:
    from configs.schema import models_for_task

    return [model_status(m, task) for m in models_for_task(task)]


def default_model(statuses: list[ModelStatus]) -> str:
    """The first real model whose weights are here; else the tiny demo, so Generate works on the first click."""
    for s in statuses:
        if s.ready and not s.tiny:
            return s.model
    tiny = [s.model for s in statuses if s.tiny]
    return FALLBACK_MODEL if FALLBACK_MODEL in tiny else tiny[0]


def resolutions_for(model: str, task: str) -> list[str]:
    from configs.schema import get_model_spec

    spec = get_model_spec(model)
    fixed = spec.tasks[task].fixed_size
    sizes = [fixed] if fixed else list(spec.resolutions)
    return [f"{h}x{w}" for h, w in sizes]


def parse_resolution(text: str) -> tuple[int, int]:
    """'480x720' -> (height=480, width=720)."""
    from configs.schema import RequestError

    try:
        h, w = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise RequestError(f"resolution={text!r} is not allowed; use HEIGHTxWIDTH such as 480x720") from None
    return h, w


def _whole(value):
    """UI numbers arrive as floats; pass whole ones on as int and anything else as is, for the check to name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def pick_seed(seed) -> int:
    """-1 means a random seed over the full 32-bit range."""
    from configs.schema import SEED_MAX

    seed = _whole(seed)
    return secrets.randbelow(SEED_MAX + 1) if seed == -1 else seed


def persist_input(path: str | None, outputs_dir: Path) -> str | None:
    """Copy an upload next to the outputs (by content hash), so 'reuse settings' still finds it after a restart."""
    if not path or not Path(path).is_file():
        return path
    src = Path(path)
    folder = outputs_dir / INPUTS_SUBDIR
    if folder.resolve() == src.parent.resolve():
        return str(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    dest = folder / f"{digest}{src.suffix.lower()}"
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return str(dest)


def request_from_values(task: str, values: dict[str, Any], seed: int | None = None) -> "GenerationRequest":
    """The UI's field values (API parameter names) -> a GenerationRequest. Validation stays in the schema."""
    from configs.schema import DecodeSettings, GenerationRequest

    height, width = parse_resolution(values["resolution"])
    inputs = {name: values[name] for name in ("image", "video") if values.get(name)}
    if "strength" in values:
        inputs["strength"] = float(values["strength"])
    return GenerationRequest(
        model=values["model"],
        task=task,
        prompt=values.get("prompt") or "",
        negative_prompt=values.get("negative_prompt") or "",
        frames=_whole(values["frames"]),
        height=height,
        width=width,
        fps=_whole(values["fps"]),
        steps=_whole(values["steps"]),
        guidance=float(values["guidance"]),
        preset=values["preset"],
        seed=_whole(values["seed"]) if seed is None else seed,
        offload=values["offload"],
        quant=values["quant"],
        decode=DecodeSettings(
            enable_vae_tiling=bool(values["vae_tiling"]),
            tile_x=_whole(values["tile_x"]),
            tile_y=_whole(values["tile_y"]),
            tile_stride_x=_whole(values["tile_stride_x"]),
            tile_stride_y=_whole(values["tile_stride_y"]),
        ),
        **inputs,
    )


def preview_request(task: str, values: dict[str, Any]) -> "tuple[GenerationRequest, Plan]":
    """The resolved request and the plan the runner would make for it, before anything loads.

    The input image/video does not change the plan, so until one is uploaded a stand-in
    file satisfies the schema's file check (the real file is checked when Generate runs).
    """
    import vram_utils
    from configs.schema import get_model_spec, resolve_request

    req = request_from_values(task, values, seed=0 if _whole(values["seed"]) == -1 else None)
    if task == "i2v" and not req.image:
        req = req.replace(image=str(PLAN_PLACEHOLDER_INPUT))
    if task == "v2v" and not req.video:
        req = req.replace(video=str(PLAN_PLACEHOLDER_INPUT))
    req = resolve_request(req)
    return req, vram_utils.plan(req, get_model_spec(req.model))


# =========================================================================== text shown in the page


def plan_markdown(req: "GenerationRequest", plan: "Plan") -> str:
    """The pre-flight plan: rung, precision, decode, predicted peaks per stage, and why."""
    on_gpu = plan.device.startswith("cuda")
    d = plan.decode
    tiling = "off"
    if d.enable_vae_tiling:
        tiling = f"on ({d.tile_x}x{d.tile_y} px tiles, stride {d.tile_stride_x}x{d.tile_stride_y})"
    budget_on = "GPU" if on_gpu else "host RAM"
    verdict = "fits" if plan.fits else "**does not fit**"
    lines = [
        f"**{req.task.upper()} · {req.model}** · {req.frames} frames · {req.height}x{req.width} · "
        f"{req.steps} steps · runs on `{plan.device}`",
        "",
        f"**Rung:** offload `{plan.offload}` · precision `{plan.quant}` · VAE tiling {tiling}",
        "",
        f"**Predicted peak:** GPU {fmt_bytes(plan.predicted_peak_gpu_bytes) if on_gpu else '- (no GPU used)'} · "
        f"RAM {fmt_bytes(plan.predicted_peak_host_bytes)} · {verdict} in {fmt_bytes(plan.budget_bytes)} of "
        f"{budget_on} (after the safety margin)",
    ]
    if plan.stages:
        lines += ["", "| stage | predicted peak GPU | predicted peak RAM |", "|---|---|---|"]
        for stage, peak in plan.stages.items():
            # GPU backend: stages are GPU peaks, host RAM holds the weights throughout; CPU: stages are RAM peaks.
            host = fmt_bytes(plan.predicted_peak_host_bytes)
            gpu, ram = (fmt_bytes(peak), host) if on_gpu else ("-", fmt_bytes(peak))
            name = f"**{stage}** (peak)" if stage == plan.peak_stage else stage
            lines.append(f"| {name} | {gpu} | {ram} |")
    if plan.reasons:
        lines += ["", "**Why:**"] + [f"- {reason}" for reason in plan.reasons]
    return "\n".join(lines)


def plan_line(plan: "Plan") -> str:
    hints = [f"{plan.suggested_frames} frames" if plan.suggested_frames else "", plan.suggested_model or ""]
    hints = [h for h in hints if h]
    warn = "" if plan.fits else " · **does not fit**" + (f": try {' or '.join(hints)}" if hints else "")
    return f"**Plan:** {plan.summary}{warn} (details in the Optimization tab)"


def memory_markdown(info) -> str:
    """The live memory table from a `vram_utils.probe()` DeviceInfo."""
    lines = [f"**{info.summary()}**", "", "| memory | used | free | total |", "|---|---|---|---|"]
    for gpu in info.gpus:
        lines.append(
            f"| GPU {gpu.index}: {gpu.name} | {fmt_bytes(gpu.used_bytes)} | {fmt_bytes(gpu.free_bytes)} | "
            f"{fmt_bytes(gpu.total_bytes)} |"
        )
    if not info.cuda:
        lines.append("| GPU | no CUDA GPU | | |")
    host_used, host_free = info.host_total_bytes - info.host_available_bytes, info.host_available_bytes
    lines.append(f"| host RAM | {fmt_bytes(host_used)} | {fmt_bytes(host_free)} | {fmt_bytes(info.host_total_bytes)} |")
    lines.append(f"| this process (RSS) | {fmt_bytes(info.process_rss_bytes)} | | |")
    return "\n".join(lines)


def measured_text(measured: dict) -> str:
    """Measured peaks from the sidecar; '+N' is what this run added above the app's baseline (the planner's figure)."""
    parts = []
    for kind, label in (("gpu", "GPU"), ("host", "RAM")):
        peak, base = measured.get(f"peak_{kind}_bytes"), measured.get(f"baseline_{kind}_bytes")
        if peak:
            parts.append(f"peak {label} {fmt_bytes(peak)}" + (f" (+{fmt_bytes(peak - base)} this run)" if base else ""))
    return " · ".join(parts)


def leak_markdown(runner: "Runner", last: int = 8) -> str:
    """The leak sentinel's last reports, newest first: what each run left behind after its cleanup."""
    reports = list(runner.sentinel.history)[-last:][::-1]
    if not reports:
        return "No run yet: after each run, memory is compared with its baseline here."
    lines = ["| run | measured | after − before | verdict | largest live tensors |", "|---|---|---|---|---|"]
    for r in reports:
        verdict = "**LEAK**" if r.leaked else "ok" if r.judged else "warm-up (a model loaded; not judged)"
        metric = "GPU allocated" if r.metric == "gpu_allocated" else "process RSS"
        holders = "; ".join(r.holders) if r.leaked else ""
        lines.append(f"| {r.label} | {metric} | {r.delta_bytes / 2**20:+.1f} MiB | {verdict} | {holders} |")
    threshold = reports[0].threshold_bytes / 2**20
    lines.append(f"\nA run leaks when it leaves more than {threshold:.0f} MiB above its baseline (weights the cache holds excluded).")
    return "\n".join(lines)


def cache_markdown(runner: "Runner") -> str:
    cache = runner.cache
    rows = cache.info()
    head = f"**{len(rows)} of {cache.max_size} loaded** · {fmt_bytes(cache.total_bytes())} (shared parts counted once)"
    if not rows:
        return head + "\n\nNothing loaded: models load when Generate is pressed."
    lines = [head, "", "| model | task | precision | bytes | shared with others |", "|---|---|---|---|---|"]
    for r in rows:
        shared = ", ".join(r["shared"]) or "-"
        lines.append(f"| {r['model']} | {r['task']} | {r['quant']} | {fmt_bytes(r['bytes'])} | {shared} |")
    return "\n".join(lines)


def cache_choices(runner: "Runner") -> list[tuple[str, str]]:
    return [(f"{m} · {t} · {q}", f"{m}|{t}|{q}") for m, t, q in runner.cache.keys()]


def result_markdown(result: "RunResult", outputs_dir: Path) -> str:
    req, t = result.request, result.timings
    where = result.video_path
    try:
        where = result.video_path.relative_to(outputs_dir.parent)
    except ValueError:
        pass
    timing = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items() if k != "total_s")
    peak = measured_text(result.measured)
    lines = [
        f"**Saved** `{where}` (+ `{result.sidecar_path.name}`)",
        "",
        f"seed **{req.seed}** · {result.frames} frames · {req.height}x{req.width} @ {req.fps} fps · "
        f"{t.get('total_s', 0):.1f} s ({timing})" + (f" · {peak}" if peak else ""),
        "",
        f"plan: {result.plan.summary}",
    ]
    lines += [f"- out of memory while {s['stage']}: retried with {s['change']}" for s in result.step_downs]
    lines += [f"- warning: {w}" for w in result.warnings]
    return "\n".join(lines)


# =========================================================================== past results


@dataclass(frozen=True)
class PastResult:
    name: str  # the video file name, unique in the folder
    video: Path
    sidecar: Path
    data: dict

    @property
    def request(self) -> "GenerationRequest":
        from configs.schema import GenerationRequest

        return GenerationRequest.from_dict(self.data["request"])

    def caption(self) -> str:
        r = self.data["request"]
        prompt = r.get("prompt", "")
        short = prompt if len(prompt) <= 40 else prompt[:40] + "…"
        return f"{r.get('task', '?').upper()} · seed {r.get('seed')} · {short}"


def read_result(sidecar: Path) -> PastResult | None:
    """The result a sidecar describes, or None when it is unreadable or its video is gone."""
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        video = sidecar.parent / data["video"]
        data["request"]["task"]  # noqa: B018 -- a sidecar without a request is not a result
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("skipping %s: %s", sidecar, exc)
        return None
    return PastResult(video.name, video, sidecar, data) if video.is_file() else None


def list_results(outputs_dir: Path, limit: int = GALLERY_LIMIT) -> list[PastResult]:
    """Finished results in the folder, newest first (hidden partial files left out)."""
    folder = Path(outputs_dir)
    sidecars = [p for p in folder.glob("*.json") if not p.name.startswith(".")] if folder.is_dir() else []
    sidecars.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    results = (r for r in map(read_result, sidecars) if r is not None)
    return list(itertools.islice(results, limit))


def find_result(outputs_dir: Path, name: str) -> PastResult | None:
    """A result by its video's file name; only a bare name inside the outputs folder is looked up."""
    if not name or Path(name).name != name:
        return None
    return read_result((Path(outputs_dir) / name).with_suffix(".json"))


def gallery_items(results: list[PastResult]) -> list[tuple[str, str]]:
    return [(str(r.video), r.caption()) for r in results]


def result_details(result: PastResult) -> str:
    d = result.data
    r = d["request"]
    predicted = d.get("predicted") or {}
    lines = [
        f"**{result.name}** · {r['task'].upper()} · `{r['model']}` · created {d.get('created', '?')}",
        "",
        f"> {r.get('prompt', '')}",
        "",
        f"seed {r.get('seed')} · {d.get('frames', r.get('frames'))} frames · {r.get('height')}x{r.get('width')} @ "
        f"{r.get('fps')} fps · {r.get('steps')} steps · guidance {r.get('guidance')} · preset {r.get('preset')}",
        "",
        f"plan: {(d.get('plan') or {}).get('summary', '')}",
        "",
        f"predicted peak: GPU {fmt_bytes(predicted.get('peak_gpu_bytes'))} · "
        f"RAM {fmt_bytes(predicted.get('peak_host_bytes'))}",
        "",
        f"measured: {measured_text(d.get('measured') or {}) or '-'}",
        "",
        "timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in (d.get("timings") or {}).items()),
    ]
    return "\n".join(lines)


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
    video: "gr.Video | None"
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

    def fields(self) -> dict[str, Any]:
        """API parameter name -> component, for the request fields this tab owns."""
        names = ["model", "prompt", "negative_prompt", "seed", "preset", "steps", "guidance", "frames", "fps"]
        names += ["resolution"] + [n for n in ("image", "video", "strength") if getattr(self, n) is not None]
        return {n: getattr(self, n) for n in names}


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

    def fields(self) -> dict[str, Any]:
        names = ("offload", "quant", "vae_tiling", "tile_x", "tile_y", "tile_stride_x", "tile_stride_y")
        return {n: getattr(self, n) for n in names}


@dataclass
class GalleryPanel:
    gallery: "gr.Gallery"
    pick: "gr.Dropdown"
    details: "gr.Markdown"
    reuse: "gr.Button"
    refresh: "gr.Button"


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


def render_task_tab(task: str, statuses: list[ModelStatus]) -> TaskTab:
    import gradio as gr

    from configs.schema import PRESETS, GenerationRequest, get_model_spec, load_presets

    model = default_model(statuses)
    spec = get_model_spec(model)
    presets = load_presets()
    preset = presets["balanced"]
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
                image = video = strength = None
                if task == "i2v":
                    image = gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"], height=220)
                if task == "v2v":
                    video = gr.Video(label="Input video", sources=["upload"], height=220)
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=3, elem_id=f"{task}-prompt")
                negative = gr.Textbox("", label="Negative prompt", lines=1, placeholder="blurry, distorted")
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
                with gr.Row():
                    steps = gr.Slider(1, 100, value=preset.steps, step=1, label="Steps", elem_id=f"{task}-steps")
                    guidance = gr.Slider(0.0, 20.0, value=preset.guidance, step=0.5, label="Guidance")
                with gr.Row():
                    frames = gr.Slider(
                        1, spec.max_frames, value=spec.default_frames, step=spec.frame_step, label="Frames",
                        info=f"{spec.family}: {spec.frame_rule_text()}", elem_id=f"{task}-frames",
                    )
                    fps = gr.Slider(1, 60, value=spec.fps, step=1, label="FPS")
                resolutions = resolutions_for(model, task)
                resolution = gr.Dropdown(resolutions, value=resolutions[0], label="Resolution (height x width)")
                plan = gr.Markdown(label="Plan", elem_id=f"{task}-plan", elem_classes=["fv-plan"])
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id=f"{task}-stop")
            with gr.Column(scale=1):
                result = gr.Video(
                    label="Result", interactive=False, autoplay=True, loop=True, buttons=["download"],
                    height=360, elem_id=f"{task}-result",
                )
                used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False)
                info = gr.Markdown(label="Info", elem_id=f"{task}-info")
    return TaskTab(
        task, tab, model_dd, note, prompt, negative, image, video, strength, seed, preset_radio, steps, guidance,
        frames, fps, resolution, plan, generate, stop, result, used_seed, info,
    )


def render_optimization(ctx: AppContext) -> OptimizationPanel:
    import gradio as gr

    from configs.schema import QUANTS, DecodeSettings, OffloadChoice

    d = DecodeSettings()
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown("### Memory (live)")
            memory = gr.Markdown(label="Memory", elem_id="memory-panel", elem_classes=["fv-memory"])
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
            with gr.Row():
                tile_x = gr.Number(d.tile_x, label="Tile width (px)", precision=0, minimum=32)
                tile_y = gr.Number(d.tile_y, label="Tile height (px)", precision=0, minimum=32)
                stride_x = gr.Number(d.tile_stride_x, label="Stride x (px)", precision=0, minimum=32)
                stride_y = gr.Number(d.tile_stride_y, label="Stride y (px)", precision=0, minimum=32)
    gr.Markdown("### Pre-flight plan for the active tab")
    plan = gr.Markdown(label="Pre-flight plan", elem_id="plan-panel", elem_classes=["fv-plan"])
    gr.Markdown("### Memory after each run (leak sentinel)")
    leaks = gr.Markdown(leak_markdown(ctx.runner), label="Leak sentinel", elem_id="leak-panel")
    return OptimizationPanel(
        memory, cache, cache_pick, unload, unload_all, max_cache, offload, quant, vae_tiling,
        tile_x, tile_y, stride_x, stride_y, plan, leaks,
    )


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
    details = gr.Markdown(label="Details", elem_id="gallery-details")
    return GalleryPanel(gallery, pick, details, reuse, refresh)


# =========================================================================== event handlers


# Where the bar stands for stages that report no step count.
STAGE_FRACTION = {"loading": 0.0, "encoding": 0.05, "decoding": 0.9, "saving": 0.98, "done": 1.0}


def _progress_to_gradio(progress, event: "ProgressEvent") -> None:
    desc = event.message or event.stage
    if event.eta_s is not None:
        desc += f" · ETA {event.eta_s:.0f} s"
    if event.total:
        unit = "steps" if event.stage == "denoising" else "chunks"
        progress((event.step, event.total), desc=desc, unit=unit)
    else:
        progress(STAGE_FRACTION.get(event.stage, 0.0), desc=desc)


def make_generate(ctx: AppContext, task: str):
    import gradio as gr

    from configs.schema import RequestError
    from pipeline_utils.runner import Cancelled, RunFailed

    async def generate(request: gr.Request, progress=gr.Progress(), **values):
        # 1. The request (-1 becomes a real seed; uploads are kept next to the outputs). The runner checks it.
        seed = pick_seed(values["seed"])
        try:
            for name in ("image", "video"):
                if name in values:
                    values[name] = persist_input(values[name], ctx.outputs_dir)
            req = request_from_values(task, values, seed)
        except (RequestError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        # 2. Run in a worker thread with this event's context (gr.Progress lives in a contextvar).
        key = (request.session_hash or "", task)
        job = ctx.jobs.start(key)

        def on_progress(event) -> None:
            job.last = event
            _progress_to_gradio(progress, event)

        call = contextvars.copy_context().run
        future = asyncio.get_running_loop().run_in_executor(
            None, call, lambda: ctx.runner.generate(req, on_progress=on_progress, stop=job.stop)
        )
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            # Gradio cancelled the event (the Stop button's `cancels`, or an API client's job.cancel()).
            # Cancelling the task alone would leave the thread running: raise the stop flag and hold
            # the GPU slot until the run has really ended and released its memory.
            job.stop.set()
            await asyncio.wait([future])
            raise
        except Cancelled:
            return None, seed, stopped_text(job)
        except (RequestError, RunFailed) as exc:  # messages written for the person: name the value, say what to do
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # the app stays up after any failed run
            logger.exception("%s generation failed", task)
            raise gr.Error(f"generation failed: {type(exc).__name__}: {exc}") from None
        finally:
            ctx.jobs.finish(key, job)
        return str(result.video_path), result.request.seed, result_markdown(result, ctx.outputs_dir)

    generate.__name__ = f"generate_{task}"
    return generate


def stopped_text(job: Job) -> str:
    where = job.last.message if job.last else "before the first step"
    return f"**Stopped** at {where}. Nothing was saved; memory was released; ready."


def make_stop(ctx: AppContext, task: str):
    import gradio as gr

    def stop(request: gr.Request) -> str:
        job = ctx.jobs.stop((request.session_hash or "", task))
        if job is None:
            return "Nothing was running in this tab."
        if not job.done.wait(STOP_WAIT_S):
            return "Stop requested; the run ends at its next step."
        return stopped_text(job)

    stop.__name__ = f"stop_{task}"
    return stop


def plan_texts(task: str, values: dict[str, Any]) -> tuple[str, str]:
    """(one line for the tab, the full plan for the Optimization tab), or why these settings cannot run."""
    from configs.schema import RequestError

    try:
        req, plan = preview_request(task, values)
    except RequestError as exc:
        text = f"**Cannot plan these settings:** {exc}"
        return text, text
    return plan_line(plan), plan_markdown(req, plan)


def make_preview(task: str):
    import gradio as gr

    def preview(active: str, **values) -> tuple[str, str]:
        line, full = plan_texts(task, values)
        return line, (full if active == task else gr.skip())  # the Optimization tab shows the active tab's plan

    preview.__name__ = f"plan_{task}"
    return preview


def make_select(task: str):
    def select(**values) -> tuple[str, str, str]:
        return (task, *plan_texts(task, values))

    select.__name__ = f"select_{task}"
    return select


def on_model_change(task: str):
    import gradio as gr

    from configs.schema import get_model_spec

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
    tab.preset.input(fill_preset, tab.preset, [tab.steps, tab.guidance], **hidden)

    # The plan follows every setting, before Generate is pressed.
    gr.on(
        [c.change for c in kwargs.values()] + [app.demo.load], make_preview(tab.task), inputs=[app.active_task],
        inputs_kwargs=kwargs, outputs=[tab.plan_line, opt.plan], api_name=f"plan_{tab.task}", queue=False,
        show_progress="hidden", trigger_mode="always_last",
    )
    tab.tab.select(
        make_select(tab.task), inputs_kwargs=kwargs, outputs=[app.active_task, tab.plan_line, opt.plan], **hidden
    )

    run = tab.generate.click(
        make_generate(ctx, tab.task), inputs_kwargs=kwargs, outputs=[tab.result, tab.used_seed, tab.info],
        api_name=tab.task, concurrency_id=GPU_QUEUE, concurrency_limit=1, show_progress_on=[tab.result],
    )
    run.success(
        lambda: after_run(app, tab.task), None,
        [opt.cache, opt.cache_pick, app.gallery.gallery, app.gallery.pick, tab.model], **hidden,
    )
    # Stop ends a running job at its next step (the flag) and removes a queued one (cancels=).
    tab.stop.click(make_stop(ctx, tab.task), None, tab.info, cancels=[run], queue=False, api_name=f"stop_{tab.task}")


def after_run(app: FitVideoApp, task: str) -> tuple:
    """Cache panel, gallery and model labels (a first run may have downloaded weights) after a run."""
    import gradio as gr

    results = list_results(app.ctx.outputs_dir)
    return (
        cache_markdown(app.ctx.runner),
        gr.Dropdown(choices=cache_choices(app.ctx.runner)),
        gallery_items(results),
        gr.Dropdown(choices=[r.name for r in results]),
        gr.Dropdown(choices=[(s.label, s.model) for s in model_statuses(task)]),
    )


def listen_optimization(app: FitVideoApp, timer) -> None:
    import gradio as gr

    ctx, opt = app.ctx, app.optimization
    hidden = dict(queue=False, api_visibility="private", show_progress="hidden")

    def memory_panels():
        import vram_utils

        info = vram_utils.probe()
        return memory_markdown(info), info.summary(), leak_markdown(ctx.runner)

    panels = [opt.memory, app.header, opt.leaks]
    timer.tick(memory_panels, None, panels, **hidden)
    app.demo.load(memory_panels, None, panels, api_name="memory", queue=False, show_progress="hidden")

    def refresh_cache():
        return cache_markdown(ctx.runner), gr.Dropdown(choices=cache_choices(ctx.runner), value=None)

    def unload(choice: str | None):
        if choice:
            freed = ctx.runner.cache.unload(*choice.split("|"))
            gr.Info(f"unloaded {choice.replace('|', ' · ')}: {fmt_bytes(freed)} freed")
        return refresh_cache()

    def unload_all():
        freed = ctx.runner.cache.unload_all()
        gr.Info(f"unloaded every pipeline: {fmt_bytes(freed)} freed")
        return refresh_cache()

    def set_max_cache_size(n):
        n = _whole(n)
        if not isinstance(n, int) or n < 1:
            raise gr.Error(f"MAX_CACHE_SIZE={n!r} is not allowed; use a whole number of 1 or more")
        cache = ctx.runner.cache
        cache.max_size = n
        while len(cache) > n:  # least recently used first
            cache.unload(*cache.keys()[0])
        return refresh_cache()

    # Loading and unloading share the GPU queue: an unload never pulls a pipeline from under a run.
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
    g.pick.change(details, g.pick, g.details, api_name="result_details", queue=False)

    tabs = app.task_tabs
    outputs = [app.tabs, app.active_task, *app.optimization.fields().values()]
    for tab in tabs.values():
        outputs += list(tab.fields().values())

    def reuse(name: str | None):
        from configs.schema import get_model_spec, models_for_task

        result = find_result(ctx.outputs_dir, name)
        if result is None:
            raise gr.Error(f"no saved result named {name!r} in {ctx.outputs_dir}; pick one from the gallery")
        req = result.request
        tab = tabs[req.task]
        updates = {app.tabs: gr.Tabs(selected=req.task), app.active_task: req.task}
        opt = app.optimization
        updates.update(
            {
                opt.offload: req.offload, opt.quant: req.quant, opt.vae_tiling: req.decode.enable_vae_tiling,
                opt.tile_x: req.decode.tile_x, opt.tile_y: req.decode.tile_y,
                opt.tile_stride_x: req.decode.tile_stride_x, opt.tile_stride_y: req.decode.tile_stride_y,
            }
        )
        if req.model in models_for_task(req.task):
            spec = get_model_spec(req.model)
            choices = resolutions_for(req.model, req.task)
            updates[tab.model] = req.model
            updates[tab.frames] = gr.Slider(maximum=spec.max_frames, step=spec.frame_step, value=req.frames)
            updates[tab.resolution] = gr.Dropdown(choices=choices, value=f"{req.height}x{req.width}")
        updates.update(
            {
                tab.prompt: req.prompt, tab.negative_prompt: req.negative_prompt, tab.seed: req.seed,
                tab.preset: req.preset, tab.steps: req.steps, tab.guidance: req.guidance, tab.fps: req.fps,
            }
        )
        if tab.image is not None and req.image and Path(req.image).is_file():
            updates[tab.image] = req.image
        if tab.video is not None and req.video and Path(req.video).is_file():
            updates[tab.video] = req.video
        if tab.strength is not None:
            updates[tab.strength] = req.strength
        gr.Info(f"settings of {name} loaded into the {req.task.upper()} tab")
        return updates

    g.reuse.click(reuse, g.pick, outputs, api_name="reuse", queue=False)


# =========================================================================== build and serve


def build_app(
    runner: "Runner",
    default_quant: str = "none",
    queue_size: int = DEFAULT_QUEUE_SIZE,
    memory_refresh_s: float = MEMORY_REFRESH_S,
) -> FitVideoApp:
    """The whole UI around one runner. Loads no model: everything heavy waits for Generate."""
    import gradio as gr

    from configs.schema import TASKS
    from decode.writer import remove_partials

    ctx = AppContext(runner, Path(runner.outputs_dir), default_quant)
    remove_partials(ctx.outputs_dir)  # a killed run never leaves a half video in the gallery
    statuses = {task: model_statuses(task) for task in TASKS}
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
        with gr.Tabs(selected="t2v") as tabs:
            task_tabs = {task: render_task_tab(task, statuses[task]) for task in TASKS}
            with gr.Tab("Gallery", id="gallery"):
                gallery = render_gallery()
            with gr.Tab("Optimization", id="optimization"):
                optimization = render_optimization(ctx)
        timer = gr.Timer(memory_refresh_s)
        app = FitVideoApp(demo, ctx, header, tabs, task_tabs, optimization, gallery, active_task, queue_size)
        for tab in task_tabs.values():
            listen_task_tab(app, tab)
        listen_optimization(app, timer)
        listen_gallery(app)
    return app


def serve(
    app: FitVideoApp,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    max_file_size: str | int = DEFAULT_MAX_UPLOAD,
    block: bool = False,
) -> str:
    """Launch with the GPU queue bounded; serve files only from the outputs folder. Returns the URL."""
    _, url, _ = app.demo.queue(max_size=app.queue_size, default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        allowed_paths=[str(app.ctx.outputs_dir.resolve())],
        max_file_size=max_file_size,
        prevent_thread_lock=not block,
        quiet=not block,
        css=CSS,
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
    from pipeline_utils.cli import precision_from_args, setup_logging

    setup_logging()
    from pipeline_utils.cache import PipelineCache
    from pipeline_utils.runner import Runner

    runner = Runner(PipelineCache(args.max_cache_size), outputs_dir=args.outputs_dir)
    app = build_app(runner, precision_from_args(args), queue_size=args.queue_size)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    logger.info("outputs in %s; no model is loaded until Generate is pressed", Path(args.outputs_dir).resolve())
    try:
        serve(app, host=host, port=args.port, share=args.share, auth=auth, block=True)
    except OSError as exc:  # lost a race for the port after the check
        print(f"error: cannot serve on {host}:{args.port}: {exc}; try --port {args.port + 1}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLI_COMMANDS:
        from pipeline_utils.cli import main as cli_main

        return cli_main(argv)
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
