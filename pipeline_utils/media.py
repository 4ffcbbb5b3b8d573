"""Read a person's input image or video, with errors that name the file and say what is wrong."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from configs.schema import RequestError


def load_image(path: str | Path, width: int, height: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"image file {str(path)!r} is not a readable image ({exc}); use PNG, JPEG or WebP") from exc
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def load_video(path: str | Path, frames: int, width: int, height: int) -> list[Image.Image]:
    """The first `frames` frames of a video, resized to width x height."""
    import imageio.v2 as imageio

    out: list[Image.Image] = []
    try:
        reader = imageio.get_reader(str(path), format="FFMPEG")
        try:
            for frame in reader:
                image = Image.fromarray(frame).convert("RGB")
                out.append(image if image.size == (width, height) else image.resize((width, height)))
                if len(out) == frames:
                    break
        finally:
            reader.close()
    except (OSError, RuntimeError, ValueError, IndexError) as exc:
        if not out:
            raise RequestError(f"video file {str(path)!r} is not a readable video ({exc}); use MP4, WebM or MOV") from exc
    if not out:
        raise RequestError(f"video file {str(path)!r} has no frames")
    if len(out) < frames:
        raise RequestError(f"video file {str(path)!r} has {len(out)} frames, fewer than the {frames} asked for")
    return out
