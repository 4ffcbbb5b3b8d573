"""Re-run only the decode of a saved run: `python app.py decode --latents run.latents.pt --out x.mp4 [tile flags]`.

The runner saves `{"latents": z (VAE space, (B, C, F, H, W)), "request": request.to_dict(), "format": 1}`
before it decodes. Here the VAE alone is loaded (the pipeline folder's "vae" subfolder, with the family's
Autoencoder class), the latents are streamed into a new video, and a JSON sidecar records what was done,
so a person can try decode settings without sampling again.
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
from pipeline_utils.recovery import decode_step_downs
from configs.schema import DecodeSettings, GenerationRequest, RequestError, check_decode, load_registry

logger = logging.getLogger(__name__)

LATENTS_FORMAT = 1
VAE_CLASSES = {"cogvideox": "AutoencoderKLCogVideoX", "wan": "AutoencoderKLWan"}


@dataclass(frozen=True)
class SavedLatents:
    latents: torch.Tensor  # (B, C, F, H, W), VAE space, CPU
    request: GenerationRequest
    path: Path


@dataclass(frozen=True)
class RedecodeResult:
    video_path: Path
    sidecar_path: Path
    stats: decode.DecodeStats
    settings: DecodeSettings
    load_s: float


def load_latents(path: str | Path) -> SavedLatents:
    """Read a `<out>.latents.pt` file, with errors that say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"latents file {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise RequestError(f"latents file {str(path)!r} is not readable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or "latents" not in data or "request" not in data:
        raise RequestError(f"latents file {str(path)!r} is not a FitVideo latents file (no 'latents' and 'request')")
    if data.get("format") != LATENTS_FORMAT:
        raise RequestError(f"latents file {str(path)!r} has format {data.get('format')!r}; this version reads {LATENTS_FORMAT}")
    z = data["latents"]
    if not isinstance(z, torch.Tensor) or z.ndim != 5:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise RequestError(f"latents in {str(path)!r} must be a (B, C, F, H, W) tensor, got {shape}")
    return SavedLatents(z, GenerationRequest.from_dict(data["request"]), path)


def family_of(model: str, folder: Path | None) -> str:
    spec = load_registry().get(model)
    if spec is not None:
        return spec.family
    from pipeline_utils.loaders import folder_family

    return folder_family(folder)


def load_vae(model: str, task: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """The VAE of (model, task) alone, on `device` (default: CUDA when present, else CPU)."""
    import diffusers

    from pipeline_utils.loaders import resolve_dtype, resolve_source

    source = resolve_source(model, task)
    family = family_of(model, source.folder)
    torch_dtype = resolve_dtype(dtype, load_registry().get(model))
    cls = getattr(diffusers, VAE_CLASSES[family])
    where = str(source.folder or source.repo)
    logger.info("loading the %s VAE of %s (%s) from %s", family, model, str(torch_dtype).removeprefix("torch."), where)
    vae = cls.from_pretrained(where, subfolder="vae", dtype=torch_dtype)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return vae.to(device).eval()


def redecode(
    latents_path: str | Path,
    out: str | Path,
    overrides: dict | None = None,
    fps: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    vae=None,
) -> RedecodeResult:
    """Decode a saved latents file into `out` (mp4): the run's own decode settings, with `overrides`
    (DecodeSettings field -> value) applied."""
    # 1. Read the latents and the request they came from; check the settings before anything loads.
    saved = load_latents(latents_path)
    req = saved.request
    settings = dataclasses.replace(req.decode, **(overrides or {}))
    check_decode(settings)
    out = Path(out)
    if out.resolve() == saved.path.resolve():
        raise RequestError(f"--out {str(out)!r} is the latents file itself; choose an .mp4 path")
    # 2. Load the VAE only (not the transformer or text encoder).
    t0 = time.perf_counter()
    if vae is None:
        vae = load_vae(req.model, req.task, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    # 3. Stream-decode into the video file (temporary name, renamed when complete).
    fps = fps or req.fps
    if not fps:
        raise RequestError(f"the request in {str(saved.path)!r} has no fps; pass --fps")
    with vram_utils.PeakMeter() as meter, decode.VideoWriter(out, fps) as writer:
        stats = decode.stream_decode(vae, saved.latents, settings, writer)
    # 4. Sidecar: what was decoded, how, how long, how much memory.
    sidecar = out.with_suffix(".json")
    decode.write_json_atomic(sidecar, {
        "video": out.name,
        "latents": str(saved.path),
        "request": req.to_dict(),
        "decode_settings": dataclasses.asdict(settings),
        "decode": stats.to_dict(),
        "step_downs": [s.to_dict() for s in decode_step_downs(stats)],
        "timings": {"vae_load_s": load_s, "decode_s": stats.seconds},
        "measured": meter.to_dict(),  # peak GPU / host bytes of the decode, as the runner's sidecar has them
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    logger.info("re-decoded %s -> %s (%d frames, %.1f s)", saved.path.name, out, stats.frames, stats.seconds)
    return RedecodeResult(out, sidecar, stats, settings, load_s)
