"""Frame interpolation x2 / x4, streamed: N frames -> (N-1) x factor + 1 frames at factor x the fps.

Method: ffmpeg's motion-compensated `minterpolate` (the ffmpeg imageio-ffmpeg ships; no weights, works on a
fresh machine). No RIFE-class package fits: the one small library on PyPI (ccvfi 0.0.3, one release, unknown
upkeep) pulls opencv-python and fetches its weights from GitHub on first use, which this offline house cannot
do; the learned interpolators sit inside whole applications. A learned method can plug in beside
`minterpolate` as another `InterpolateMethod`.

ffmpeg decodes, interpolates and hands back raw RGB frames through a pipe one at a time; they go straight
into decode.VideoWriter, so memory does not grow with the frame count. minterpolate puts every original frame
at its own time (frame k x factor of the output is input frame k) but stops before the last original; the
last frame is cloned once in front of it (`tpad`) and what comes after the last original is dropped, which
gives exactly (N-1) x factor + 1.
"""
from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from configs.schema import RequestError
from postprocess.frames import probe_video
from postprocess.result import FinishResult

logger = logging.getLogger(__name__)

INTERPOLATE_FACTORS = (2, 4)
InterpolateMethod = Literal["auto", "minterpolate"]
MINTERPOLATE_LABEL = "minterpolate (ffmpeg motion-compensated, no model)"


def check_factor(factor) -> int:
    if factor not in INTERPOLATE_FACTORS:
        raise RequestError(f"factor={factor!r} is not allowed; use one of {', '.join(map(str, INTERPOLATE_FACTORS))}")
    return int(factor)


def check_method(method: str) -> str:
    if method not in get_args(InterpolateMethod):
        raise RequestError(f"method={method!r} is not allowed; use one of {', '.join(get_args(InterpolateMethod))}")
    return method


def _ffmpeg_command(src: Path, fps_out: float) -> list[str]:
    import imageio_ffmpeg

    # minterpolate needs a frame after each time it fills: the last frame is cloned once so that the output
    # reaches it (without, 9 frames give 15 at x2, not 17).
    vf = f"tpad=stop_mode=clone:stop=1,minterpolate=fps={fps_out:g}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1"
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(src), "-vf", vf,
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]


def interpolate_video(
    src: str | Path,
    dst: str | Path,
    factor: int = 2,
    method: str = "auto",
    on_frame: Callable[[int, int], None] | None = None,
) -> FinishResult:
    """Write `src` with (N-1) x factor + 1 frames at factor x its fps into `dst` (temporary name, renamed when
    complete). `on_frame(i, n)` after each written frame (progress; it may raise to stop)."""
    from decode.writer import VideoWriter

    factor, method = check_factor(factor), check_method(method)
    info = probe_video(src)
    if info.frames < 2:
        raise RequestError(f"{info.path.name!r} has {info.frames} frame; interpolation needs at least 2")
    fps_out = info.fps * factor
    total = (info.frames - 1) * factor + 1
    frame_bytes = info.width * info.height * 3
    t0 = time.perf_counter()
    proc = subprocess.Popen(_ffmpeg_command(info.path, fps_out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=frame_bytes)
    try:
        with VideoWriter(dst, round(fps_out)) as writer:
            for i in range(1, total + 1):
                raw = proc.stdout.read(frame_bytes)
                if len(raw) < frame_bytes:
                    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
                    raise RuntimeError(f"ffmpeg minterpolate stopped after {i - 1} of {total} frames "
                                       f"({err[-1] if err else 'no message'})")
                writer.write(np.frombuffer(raw, np.uint8).reshape(info.height, info.width, 3))
                if on_frame is not None:
                    on_frame(i, total)
    finally:
        proc.kill()  # it has one frame more to give, or the run stopped: either way it is done
        proc.communicate()
    return FinishResult(
        "interpolate", MINTERPOLATE_LABEL, str(src), str(dst), factor, info.frames, writer.frames_written,
        info.fps, float(round(fps_out)), (info.width, info.height), (info.width, info.height),
        time.perf_counter() - t0,
    )
