"""Finishing steps after a run, streamed frame by frame: upscale (x2 / x4) and interpolate (x2 / x4).

Frames are read from a video one at a time and written into the new mp4 as they come (decode.VideoWriter:
a temporary name renamed when complete), so memory does not grow with the number of frames.
Nothing heavy is imported here: torch and spandrel load inside the functions that need them.
"""
from postprocess.frames import VideoInfo, iter_frames, probe_video
from postprocess.interpolate import INTERPOLATE_FACTORS, InterpolateMethod, interpolate_video
from postprocess.upscale import (
    UPSCALE_SCALES,
    UPSCALERS,
    UpscaleMethod,
    Upscaler,
    load_upscaler,
    resolve_upscaler,
    upscale_video,
)
from postprocess.result import FinishResult, finished_path

__all__ = [
    "FinishResult", "INTERPOLATE_FACTORS", "InterpolateMethod", "UPSCALERS", "UPSCALE_SCALES", "UpscaleMethod",
    "Upscaler", "VideoInfo", "finished_path", "interpolate_video", "iter_frames", "load_upscaler", "probe_video",
    "resolve_upscaler", "upscale_video",
]
