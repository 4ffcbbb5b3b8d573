"""Re-run only the decode of a saved run: `python app.py decode --latents run.latents.pt --out x.mp4 [tile flags]`.

The runner saves the latents (engine/results.py: `SavedLatents`) before it decodes. Here the VAE
alone is loaded (the pipeline folder's "vae" subfolder, with the family's Autoencoder class), the latents are
streamed into a new video, and a sidecar in the runner's format (`Sidecar`, kind "decode") records what was
done, so a person can try decode settings without sampling again.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import decode
import vram_utils
from configs.schema import DecodeSettings, RequestError
from configs.validate import check_decode
from configs.registry import get_model_spec
from engine.recovery import decode_step_downs
from engine.results import LATENTS_FORMAT, SavedLatents, Sidecar, sidecar_path, versions  # noqa: F401

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class RedecodeResult:
    video_path: Path
    sidecar_path: Path
    stats: decode.DecodeStats
    settings: DecodeSettings
    load_s: float


def load_latents(path: str | Path) -> SavedLatents:
    """Read a `<out>.latents.pt` file, with errors that say what is wrong with it."""
    return SavedLatents.read(path)


def load_vae(model: str, task: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """The VAE of (model, task) alone, on `device` (default: CUDA when present, else CPU)."""
    import diffusers

    from engine.loaders import resolve_dtype, resolve_source

    source = resolve_source(model, task)
    spec = get_model_spec(model)  # a registry id or a local folder: its family names the VAE class
    torch_dtype = resolve_dtype(dtype, spec)
    cls = getattr(diffusers, spec.family_module.vae_class)
    where = str(source.folder or source.repo)
    logger.info("loading the %s VAE of %s (%s) from %s", spec.family, model, str(torch_dtype).removeprefix("torch."), where)
    vae = cls.from_pretrained(where, subfolder="vae", dtype=torch_dtype)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return vae.to(device).eval()


def redecode(
    latents_path: str | Path,
    out: str | Path,
    overrides: dict | None = None,
    fps: int | None = None,
    vae: dict | None = None,
    on_progress=None,
) -> RedecodeResult:
    """Decode a saved latents file into `out` (mp4): the run's own decode settings, with `overrides`
    (DecodeSettings field -> value) applied. `vae`: {"dtype": ..., "device": ...} for the VAE (None: the
    run's dtype, the best device); `on_progress(ProgressEvent)`: loading, then each decode chunk."""
    from engine.runner import ProgressEvent

    emit = on_progress or (lambda event: None)
    # 1. Read the latents and the request they came from; check the settings before anything loads.
    saved = load_latents(latents_path)
    req = saved.request
    settings = dataclasses.replace(req.decode, **(overrides or {}))
    check_decode(settings)
    out = Path(out)
    if out.resolve() == saved.path.resolve():
        raise RequestError(f"--out {str(out)!r} is the latents file itself; choose an .mp4 path")
    fps = fps or req.fps
    if not fps:
        raise RequestError(f"the request in {str(saved.path)!r} has no fps; pass --fps")
    # 2. Load the VAE only (not the transformer or text encoder).
    t0 = time.perf_counter()
    emit(ProgressEvent("loading", message=f"loading the VAE of {req.model}"))
    vae_module = load_vae(req.model, req.task, dtype=(vae or {}).get("dtype"), device=(vae or {}).get("device"))
    load_s = time.perf_counter() - t0
    # 3. Stream-decode into the video file (temporary name, renamed when complete).
    with vram_utils.PeakMeter() as meter, decode.VideoWriter(out, fps) as writer:
        stats = decode.stream_decode(vae_module, saved.latents, settings, writer, on_chunk=lambda j, m: emit(
            ProgressEvent("decoding", j, m, f"decoding chunk {j}/{m}")))
    # 4. Sidecar, in the runner's format: what was decoded, how, how long, how much memory.
    sidecar = Sidecar(
        video=out.name, request=req, kind="decode", latents=str(saved.path), frames=stats.frames,
        decode_settings=settings, decode=stats.to_dict(),
        step_downs=[s.to_dict() for s in decode_step_downs(stats)],
        timings={"vae_load_s": load_s, "decode_s": stats.seconds},
        measured=meter.to_dict(),  # peak GPU / host bytes of the decode, as the runner's sidecar has them
        versions=versions(),
    ).write(sidecar_path(out))
    logger.info("re-decoded %s -> %s (%d frames, %.1f s)", saved.path.name, out, stats.frames, stats.seconds)
    return RedecodeResult(out, sidecar, stats, settings, load_s)
