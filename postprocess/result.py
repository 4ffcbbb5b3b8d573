"""What a finishing step returns, and where its video goes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FinishResult:
    """One finishing step's output: for the sidecar, the log and the page. Times in seconds, sizes in bytes."""

    step: str  # "upscale" / "interpolate"
    method: str  # e.g. "realesrgan-x4 (learned)", "lanczos (no model)", "minterpolate (ffmpeg, no model)"
    source: str  # the video read
    video: str  # the video written
    factor: int
    frames_in: int
    frames_out: int
    fps_in: float
    fps_out: float
    size_in: tuple[int, int]  # (width, height)
    size_out: tuple[int, int]
    seconds: float = 0.0
    tile_px: int | None = None  # the upscaler's tile (output pixels) it ended with; None untiled
    oom_steps: list[str] = field(default_factory=list)  # tile halvings after an out-of-memory
    notes: list[str] = field(default_factory=list)

    @property
    def per_frame_s(self) -> float:
        return self.seconds / max(1, self.frames_out)

    def to_dict(self) -> dict:
        return asdict(self) | {"per_frame_s": self.per_frame_s}

    def summary(self) -> str:
        w, h = self.size_out
        return (f"{self.step} x{self.factor} with {self.method}: {self.frames_in} -> {self.frames_out} frames, "
                f"{w}x{h} at {self.fps_out:g} fps in {self.seconds:.1f} s")


def finished_path(source: str | Path, step: str, factor: int) -> Path:
    """`x.mp4` -> `x_up2.mp4` / `x_int2.mp4`, beside the source; never an existing file."""
    source = Path(source)
    tag = {"upscale": "up", "interpolate": "int"}[step]
    base = source.with_name(f"{source.stem}_{tag}{factor}{source.suffix}")
    n = 1
    while base.exists():
        base = source.with_name(f"{source.stem}_{tag}{factor}-{n}{source.suffix}")
        n += 1
    return base
