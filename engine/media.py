"""A person's input image or video: read it with errors that name the file and say what is allowed, and
keep a copy of an upload next to the outputs so a result's settings can be reused after a restart."""
from __future__ import annotations

import hashlib
import itertools
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageSequence

from configs.schema import RequestError

logger = logging.getLogger(__name__)

IMAGE_FORMATS = "PNG, JPEG or WebP (or another still image Pillow reads, such as BMP, GIF or TIFF)"
VIDEO_FORMATS = "MP4, WebM, MOV, an animated GIF, or a still image (held for every frame)"
INPUTS_SUBDIR = "inputs"  # uploads are copied here so a result's settings can be reused after a restart
# What a reader may raise on a file it cannot read (Pillow's UnidentifiedImageError is an OSError).
READ_ERRORS = (OSError, RuntimeError, ValueError, IndexError, SyntaxError, Image.DecompressionBombError)


def _first_line(exc: BaseException, path: str | Path | None = None, name: str | None = None) -> str:
    """What a reader's error says, in one line (ffmpeg's carry its whole banner after the first), with the
    file's path shown as the name the person knows it by."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.replace(str(path), name) if path and name else line


def unreadable_image_message(name: str, exc: BaseException, path: str | Path | None = None) -> str:
    return f"image file {name!r} is not a readable image ({_first_line(exc, path, name)}); use {IMAGE_FORMATS}"


def check_image(path: str | Path, name: str | None = None) -> Image.Image:
    """The image, decoded as RGB; RequestError naming the file (as `name`, default its path) when Pillow
    cannot read it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except READ_ERRORS as exc:
        raise RequestError(unreadable_image_message(name or str(path), exc, path)) from exc


def load_image(path: str | Path, width: int, height: int) -> Image.Image:
    image = check_image(path)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _ffmpeg_frames(path: Path, limit: int, convert: Callable[[Image.Image], Any]) -> list:
    """Up to `limit` frames through ffmpeg (MP4, WebM, MOV, ...); a file that breaks off keeps what came before."""
    import imageio.v2 as imageio

    out: list = []
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        for frame in itertools.islice(reader, limit):
            out.append(convert(Image.fromarray(frame)))
    except READ_ERRORS:
        if not out:
            raise
    finally:
        reader.close()
    return out


def _pillow_frames(path: Path, limit: int, convert: Callable[[Image.Image], Any]) -> list:
    """Up to `limit` frames through Pillow (imageio's reader for these): animated GIF / WebP / APNG, multi-page
    TIFF, or a still image. Pillow composes each GIF frame with the ones before it."""
    with Image.open(path) as im:
        return [convert(frame) for frame in itertools.islice(ImageSequence.Iterator(im), limit)]


def read_frames(
    path: str | Path, limit: int, convert: Callable[[Image.Image], Any] = _rgb, name: str | None = None
) -> list:
    """`convert` of each of the first `limit` frames of a video file (RGB images by default): ffmpeg first,
    then Pillow for what imageio's ffmpeg plugin refuses (GIF, still images). RequestError naming the file
    (as `name`, default its path) when neither reads it."""
    path, name = Path(path), name or str(path)
    errors = []
    for reader_name, reader in (("ffmpeg", _ffmpeg_frames), ("Pillow", _pillow_frames)):
        try:
            frames = reader(path, limit, convert)
        except READ_ERRORS as exc:
            errors.append(f"{reader_name}: {_first_line(exc, path, name)}")
            continue
        if frames:
            return frames
        errors.append(f"{reader_name}: no frames")
    raise RequestError(f"video file {name!r} is not a readable video ({'; '.join(errors)}); use {VIDEO_FORMATS}")


def _check_count(name: str, count: int, frames: int) -> list[str]:
    """The rule for an input's frame count: a still is held for every frame (a warning); more than one frame
    but fewer than asked is refused."""
    if count == 1 and frames > 1:
        return [f"video file {name!r} has a single frame (a still image); it is held for all {frames} frames"]
    if count < frames:
        raise RequestError(f"video file {name!r} has {count} frames, fewer than the {frames} asked for")
    return []


def check_video(path: str | Path, frames: int, name: str | None = None) -> list[str]:
    """What load_video will say about an input, without keeping its frames: RequestError naming the file (as
    `name`, default its path) when it is unreadable or too short, else the warnings (a still is held)."""
    name = name or str(path)
    return _check_count(name, len(read_frames(path, frames, convert=lambda frame: None, name=name)), frames)


def read_video(path: str | Path, frames: int, width: int, height: int) -> tuple[list[Image.Image], list[str]]:
    """The first `frames` frames of a video, resized to width x height, and the warnings for the run. A one-frame
    input (a still) is held for every frame, with a warning; more than one frame but fewer than asked is refused."""
    def fit(frame: Image.Image) -> Image.Image:
        image = frame.convert("RGB")
        return image if image.size == (width, height) else image.resize((width, height))

    images = read_frames(path, frames, convert=fit)
    warnings = _check_count(str(path), len(images), frames)
    return (images * frames if len(images) == 1 else images), warnings


def load_video(path: str | Path, frames: int, width: int, height: int) -> list[Image.Image]:
    """read_video's frames; its warnings go to the log."""
    images, warnings = read_video(path, frames, width, height)
    for warning in warnings:
        logger.warning("%s", warning)
    return images


def persist_input(path: str | None, outputs_dir: Path) -> str | None:
    """Copy an upload next to the outputs (by content hash), so 'reuse settings' still finds it after a restart."""
    if not path or not Path(path).is_file():
        return path
    src = Path(path)
    folder = Path(outputs_dir) / INPUTS_SUBDIR
    if folder.resolve() == src.parent.resolve():
        return str(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    dest = folder / f"{digest}{src.suffix.lower()}"
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return str(dest)
