"""The headless CLI: `python app.py generate ...` runs the same engine as the UI.

The flags are the page's fields (ui.fields turns them into the request), and the plan is the
page's text (reports.text): `generate --plan` prints it and stops before anything loads.
Exit codes: 0 success, 2 bad input (one line naming the value), 1 anything else.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from configs.schema import PRESETS, QUANTS, TASKS, DecodeSettings, DType, GenerationRequest, OffloadChoice, RequestError
from ui.fields import TILE_FIELDS, decode_overrides, request_from_fields

logger = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Import-time chatter that says nothing to a user: torchao's CUDA-only kernels failing to load on
    # this Python, and torch's deprecation notice about torchao's enums. Set before diffusers imports them.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass


def apply_environment(args: argparse.Namespace) -> None:
    """What the flags ask of the environment, for the web UI and the CLI alike: `--offline` and `--loras-dir` as
    the variables the engine reads (set before huggingface_hub is imported), then logging."""
    if getattr(args, "offline", False):
        os.environ["HF_HUB_OFFLINE"] = "1"
    if getattr(args, "loras_dir", None):
        os.environ["FITVIDEO_LORAS_DIR"] = str(Path(args.loras_dir).expanduser().resolve())
    setup_logging()


def add_offline_flag(parser: argparse.ArgumentParser) -> None:
    """`--offline`, which apply_environment turns into HF_HUB_OFFLINE=1."""
    parser.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE=1)")


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--int8", action="store_true", help="INT8 weight-only quantization (torchao)")
    group.add_argument("--fp8", action="store_true", help="FP8 weights, per-row scaled (torchao, compute capability >= 8.9; else fp8 storage)")


def precision_from_args(args: argparse.Namespace, default: str = "none") -> str:
    return "int8" if getattr(args, "int8", False) else "fp8" if getattr(args, "fp8", False) else default


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
    """Tile flags left out: the planner sizes the tiles (untiled when the frame fits, else the largest that fit;
    272/272/144/128 when memory demands it). Any tile flag given: the tiles as set (`tile_flags`)."""
    d = DecodeSettings()
    parser.add_argument("--no-vae-tiling", dest="vae_tiling", action="store_false", help="decode whole frames")
    parser.add_argument("--tile-x", type=int, default=None, help=f"largest tile width in output pixels (default: the planner's; {d.tile_x} when memory demands it). Any tile flag given: the tiles as set")
    parser.add_argument("--tile-y", type=int, default=None, help=f"largest tile height in output pixels ({d.tile_y})")
    parser.add_argument("--tile-stride-x", type=int, default=None, help=f"largest step between tiles ({d.tile_stride_x}); tile - stride is the smallest overlap")
    parser.add_argument("--tile-stride-y", type=int, default=None, help=f"({d.tile_stride_y})")
    parser.add_argument("--chunk-frames", type=int, default=d.chunk_frames, help="latent frames per decode chunk (0 = auto)")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                        help="progress on stderr: a bar redrawn in place (auto on a terminal), one line per stage "
                             "(auto elsewhere: pipes, log files), or off")


def progress_renderer(args: argparse.Namespace):
    """The progress display of a command (reports.progress), on stderr beside the log."""
    from reports.progress import ProgressRenderer

    return ProgressRenderer(sys.stderr, getattr(args, "progress", "auto"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description="FitVideo headless commands")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one video")
    g.add_argument("--model", default="tiny-cogvideox", help="registry id, local folder, or tiny-cogvideox / tiny-wan / tiny-wan-moe")
    g.add_argument("--task", choices=TASKS, default="t2v")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--frames", type=int, default=None, help="frame count (CogVideoX 8k+1, Wan 4k+1)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--fps", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    g.add_argument("--guidance-2", type=float, default=None,
                   help="two-expert models (Wan 2.2 A14B): guidance of the low-noise expert (default: --guidance)")
    g.add_argument("--preset", choices=PRESETS, default="balanced", help="motion preset")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image", default=None, help="input image (i2v)")
    g.add_argument("--video", default=None, help="input video (v2v)")
    g.add_argument("--strength", type=float, default=0.7, help="how far v2v moves from the input (0-1)")
    g.add_argument("--offload", choices=get_args(OffloadChoice), default="auto")
    g.add_argument("--quant", choices=QUANTS, default=None, help="weight precision (or --int8 / --fp8)")
    add_precision_flags(g)
    add_decode_flags(g)
    g.add_argument("--out", default=None, help="output mp4 (default: outputs/{time}_{task}_{seed}.mp4)")
    g.add_argument("--outputs-dir", default="outputs")
    g.add_argument("--max-cache-size", type=int, default=None)
    add_offline_flag(g)
    g.add_argument("--plan", action="store_true", help="print the memory plan for this request and exit (loads nothing)")
    g.add_argument("--upscale", type=int, default=0, help="finishing step: upscale the result x2 / x4 (0 = off)")
    g.add_argument("--interpolate", type=int, default=0, help="finishing step: interpolate x2 / x4 (0 = off)")
    g.add_argument("--lora", dest="loras", action="append", default=None, metavar="NAME_OR_PATH[:STRENGTH[:LOW]]",
                   help="a LoRA from the LoRA folder, a path or owner/repo/file.safetensors, at STRENGTH (default 1); "
                        "two-expert models take a low-noise expert's strength after a second colon. Repeatable")
    g.add_argument("--loras-dir", default=None, help="the LoRA folder (default $FITVIDEO_HOME/loras)")
    g.add_argument("--shift", type=float, default=None, help="scheduler flow shift (Wan; a distill LoRA's preset)")
    add_speed_flags(g)
    add_progress_flag(g)

    d = sub.add_parser("decode", help="re-run only the decode of a saved run, from its .latents.pt")
    d.add_argument("--latents", required=True, help="the <video>.latents.pt a run saved before decoding")
    d.add_argument("--out", required=True, help="output mp4 (a JSON sidecar is written next to it)")
    d.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="decode in tiles")
    add_decode_flags(d)
    # Flags left out keep the decode settings the run used (saved in the latents file).
    d.set_defaults(vae_tiling=None, tile_x=None, tile_y=None, tile_stride_x=None, tile_stride_y=None, chunk_frames=None)
    d.add_argument("--fps", type=int, default=None, help="frames per second (default: the run's)")
    d.add_argument("--dtype", choices=get_args(DType), default=None, help="VAE precision")
    d.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    add_offline_flag(d)
    add_progress_flag(d)
    add_finishing_parsers(sub)
    return parser


def add_speed_flags(g) -> None:
    """The step cache, attention backend, regional compile and context parallel of `generate`."""
    g.add_argument("--step-cache", default=None, metavar="NAME[:NUMBER]",
                   help="off, first-block[:threshold], taylorseer[:interval], magcache[:threshold], pab[:interval], "
                        "fastercache[:interval] (default: the preset's: fast = taylorseer)")
    g.add_argument("--attention", default="auto", choices=("auto", "native", "flash", "sage"),
                   help="attention backend (flash / sage need their package and a CUDA GPU)")
    g.add_argument("--compile", action="store_true", help="regional compile of Wan's repeated blocks (CUDA only)")
    g.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="share the denoise among N processes, one GPU each (diffusers' context parallel, Ulysses: N "
                        "must divide the transformer's attention heads; gloo processes on the CPU). Default 1")


def add_finishing_parsers(sub) -> None:
    """`upscale` and `interpolate`: finishing steps on any video, streamed frame by frame (postprocess/)."""
    u = sub.add_parser("upscale", help="upscale a video x2 / x4 (Real-ESRGAN when its weights are here, else Lanczos)")
    u.add_argument("--video", required=True, help="input video")
    u.add_argument("--scale", type=int, default=2, help="2 or 4")
    u.add_argument("--method", default="auto", help="auto (learned when its weights are here, else Lanczos), "
                   "realesrgan (fetch the weights if needed), lanczos (no model)")
    u.add_argument("--weights", default=None, help="an ESRGAN-family model file (.pth / .safetensors) to use")
    u.add_argument("--tile", type=int, default=None, help="largest tile in output pixels (0 = whole frames; default 512)")
    u.add_argument("--out", default=None, help="output mp4 (default: <video>_up<scale>.mp4)")
    add_offline_flag(u)
    add_progress_flag(u)
    i = sub.add_parser("interpolate", help="interpolate a video x2 / x4: N frames -> (N-1) x factor + 1 at factor x fps")
    i.add_argument("--video", required=True, help="input video")
    i.add_argument("--factor", type=int, default=2, help="2 or 4")
    i.add_argument("--method", default="auto", help="auto / minterpolate (ffmpeg motion-compensated, no model)")
    i.add_argument("--out", default=None, help="output mp4 (default: <video>_int<factor>.mp4)")
    add_progress_flag(i)


def tile_flags(args: argparse.Namespace) -> dict:
    """The flags as fields, with `fixed_tiles` set when a tile flag was given (even at the default value)."""
    given = any(getattr(args, name, None) is not None for name in TILE_FIELDS)
    return {**vars(args), "fixed_tiles": True if given else None}


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The flags are the page's fields (with --height / --width for its resolution)."""
    return request_from_fields(args.task, {**tile_flags(args), "quant": args.quant or precision_from_args(args)})


def run_generate(args: argparse.Namespace) -> int:
    from engine.cache import PipelineCache
    from engine.resolve import resolve
    from engine.runner import Runner
    from reports.text import plan_line, plan_markdown

    runner = Runner(PipelineCache(args.max_cache_size), outputs_dir=args.outputs_dir)
    runner.previews = False  # a terminal cannot show them
    run = resolve(request_from_args(args), check_files=not args.plan)  # RequestError (exit 2) before anything loads
    plan = runner.plan(run)
    if args.plan:
        print(plan_markdown(run.request, plan))
        return 0
    for note in run.notes:
        logger.warning("%s", note)
    logger.info("%s", plan_line(plan, details="app.py generate --plan shows the full plan"))
    from engine.parallel import close_group

    try:
        with progress_renderer(args) as progress:  # loading, encoding, denoising k/N, decoding j/M, finishing
            result = runner.generate(run, out_path=args.out, on_progress=progress)
    finally:
        close_group()  # --context-parallel's helper processes, when it started them
    print(result.video_path)
    for finished in result.finishing:  # finishing steps' videos, in order; the last is the finished one
        print(finished["video"])
    logger.info("%d frames in %.1f s; sidecar %s", result.frames, result.timings["total_s"], result.sidecar_path)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from engine.redecode import redecode

    # Flags left out (None) keep the decode settings the run used.
    with progress_renderer(args) as progress:
        result = redecode(args.latents, args.out, decode_overrides(tile_flags(args)), fps=args.fps,
                          vae={"dtype": args.dtype, "device": args.device}, on_progress=progress)
    print(result.video_path)
    stats = result.stats
    logger.info(
        "%d frames %dx%d in %.1f s (%s); sidecar %s", stats.frames, stats.width, stats.height, stats.seconds,
        f"{stats.tiles} tiles" if stats.tile_px else "untiled", result.sidecar_path,
    )
    return 0


def run_finishing(args: argparse.Namespace) -> int:
    """`upscale` / `interpolate`: one finishing step; prints the output path, logs which method it used."""

    from engine.finishing import FinishStep, check_steps, run_step

    step = (FinishStep("upscale", args.scale, args.method, args.weights) if args.command == "upscale"
            else FinishStep("interpolate", args.factor, args.method))
    check_steps([step])
    with progress_renderer(args) as progress:  # "upscaling frame 17/49"
        on_frame = lambda i, n, message: progress.update("finishing", i, n, message)  # noqa: E731
        result = run_step(Path(args.video), step, None, on_frame, out=args.out, tile_px=getattr(args, "tile", None))
    print(result.video)
    print(f"method: {result.method}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    logger.info("%s (%.3f s per frame)", result.summary(), result.per_frame_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_environment(args)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "decode":
            return run_decode(args)
        if args.command in ("upscale", "interpolate"):
            return run_finishing(args)
        parser.error(f"unknown command {args.command!r}")
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # RunFailed and anything unexpected: one line here, the trace in the log
        logger.debug("run failed", exc_info=True)
        print(f"error: {exc}" if str(exc) else f"error: {type(exc).__name__}", file=sys.stderr)  # MemoryError has no text
        return 1
    return 1
