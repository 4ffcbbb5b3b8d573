"""A streaming mp4 writer: frames are encoded as they arrive, under a temporary name
that is renamed when the video is complete, so a crash never leaves a half video."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
PARTIAL_TAG = ".partial"


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under: hidden, same folder, same suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}{PARTIAL_TAG}{path.suffix}")


def write_json_atomic(path: Path, data: dict) -> Path:
    path = Path(path)
    tmp = partial_path(path)
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


class VideoWriter:
    """Encode (T, H, W, 3) uint8 frames into an H.264 mp4 as they come.

    Use as a context manager: on a clean exit the file is renamed into place; on an
    exception the partial file is removed.
    """

    def __init__(self, path: str | Path, fps: int, quality: float = 8.0):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.fps = int(fps)
        self.quality = quality
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height)
        self._gen = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        """frames: (T, H, W, 3) uint8, or one (H, W, 3) frame."""
        import imageio_ffmpeg

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        if self._gen is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.size = (frames.shape[2], frames.shape[1])
            self._gen = imageio_ffmpeg.write_frames(
                str(self.tmp), self.size, fps=self.fps, codec="libx264", pix_fmt_out="yuv420p",
                quality=self.quality, macro_block_size=2, ffmpeg_log_level="error",
            )
            self._gen.send(None)
        elif (frames.shape[2], frames.shape[1]) != self.size:
            raise ValueError(f"frame size changed from {self.size} to {(frames.shape[2], frames.shape[1])}")
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
            self.frames_written += 1

    def close(self) -> Path:
        if self._gen is None:
            raise ValueError(f"no frames were written to {self.path}")
        self._gen.close()
        self._gen = None
        os.replace(self.tmp, self.path)
        logger.info("wrote %s (%d frames at %d fps)", self.path, self.frames_written, self.fps)
        return self.path

    def abort(self) -> None:
        if self._gen is not None:
            try:
                self._gen.close()
            except Exception:  # ffmpeg may already be gone (disk full, killed)
                logger.debug("closing ffmpeg after a failure", exc_info=True)
            self._gen = None
        self.tmp.unlink(missing_ok=True)


def remove_partials(folder: str | Path) -> list[Path]:
    """Delete files left under a temporary name by a killed process."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.glob(f".*{PARTIAL_TAG}*") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
        logger.info("removed leftover partial file %s", p)
    return removed
