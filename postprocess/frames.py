"""Reading a video one frame at a time, with errors that name the file and what is allowed."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.schema import RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, fps and size of a video; RequestError for a missing file or one ffmpeg cannot read as video.

    The count is ffmpeg's exact one (it decodes the stream once, discarding frames: no memory per frame).
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise RequestError(f"video {str(path)!r} does not exist; give an mp4 / webm / mov file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        reader.close()
        frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError, StopIteration) as exc:
        raise RequestError(f"{path.name!r} is not a video ffmpeg can read ({str(exc).splitlines()[0][:160]}); "
                           "give an mp4 / webm / mov file") from exc
    width, height = meta.get("size") or (0, 0)
    fps = float(meta.get("fps") or 0)
    if frames < 1 or width < 1 or height < 1 or fps <= 0:
        raise RequestError(f"{path.name!r} has no video frames (frames={frames}, size={width}x{height}, fps={fps}); "
                           "give an mp4 / webm / mov file")
    return VideoInfo(path, int(frames), fps, int(width), int(height))


def iter_frames(info: VideoInfo) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames, one at a time (ffmpeg decodes ahead through a pipe; nothing accumulates)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(info.path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        for raw in reader:
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    finally:
        reader.close()
