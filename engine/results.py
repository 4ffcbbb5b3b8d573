"""What a run leaves next to its video, written and read in one place.

- `Sidecar`: `<video>.json`, what was made and how (request, plan, timings, predicted and measured peaks,
  warnings, every out-of-memory step down, the decode's stats, versions). The runner and `app.py decode`
  write it; the gallery reads it. Versioned: version 1 is the layout written before the field existed
  (no "version" key), read as it is.
- `SavedLatents`: `<video>.latents.pt`, the denoised latents in VAE space and the request, on disk before
  the decode starts, so a decode failure costs only the decode.
- Past results: the finished results in an outputs folder, newest first, for the gallery.

Both files are written under a temporary name and renamed when complete (decode.partial_path).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

import decode
from configs.schema import DecodeSettings, GenerationRequest, Plan, RequestError

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 2  # 1: no "version" key (written before it existed); 2: "version" and "kind" added
LATENTS_FORMAT = 1
GALLERY_LIMIT = 60  # newest results shown; older ones stay on disk
SidecarKind = Literal["generate", "decode", "upscale", "interpolate"]  # the last two: finishing steps


LATENTS_SUFFIX = ".latents.pt"


def sidecar_path(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(".json")


def latents_path(video_path: str | Path) -> Path:
    return Path(video_path).with_suffix(LATENTS_SUFFIX)


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a result, for the sidecar."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchao", "gradio"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


# =========================================================================== the sidecar


@dataclass(frozen=True)
class Sidecar:
    """`<video>.json`. Sizes in bytes, times in seconds."""

    video: str  # the video's file name, in the sidecar's folder
    request: GenerationRequest
    kind: SidecarKind = "generate"  # "decode": `app.py decode` re-decoded saved latents
    latents: str | None = None  # generate: the latents' file name next to the video; decode: the path read
    frames: int = 0
    plan: Plan | None = None  # generate only
    decode_settings: DecodeSettings | None = None  # what the decode started with
    decode: dict | None = None  # the streaming decode's stats (DecodeStats.to_dict())
    timings: dict[str, float] = field(default_factory=dict)
    measured: dict[str, int] = field(default_factory=dict)  # PeakMeter: peak and baseline GPU / host bytes
    warnings: list[str] = field(default_factory=list)
    step_downs: list[dict] = field(default_factory=list)  # every out-of-memory step down, in order
    quant: dict | None = None  # what quantization did
    experts: dict | None = None  # two-expert models: boundary_ratio, switch_step (first low-noise step), guidances
    versions: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    version: int = SIDECAR_VERSION
    finishing: list[dict] = field(default_factory=list)  # finishing steps (postprocess.FinishResult.to_dict())
    loras: list[dict] = field(default_factory=list)  # the LoRAs applied: name, file, bytes, strength(s)
    memory_timeline: dict | None = None  # samples (t, rss, GPU) a few times a second, with stage marks
    step_cache: dict | None = None  # the step cache and its counts (engine/stepcache.py stats())
    worker: dict = field(default_factory=dict)  # the Ray worker that ran it (name, node, device, pid); {}: this app

    @property
    def predicted(self) -> dict[str, int]:
        plan = self.plan
        if plan is None:
            return {}
        return {"peak_gpu_bytes": plan.predicted_peak_gpu_bytes, "peak_host_bytes": plan.predicted_peak_host_bytes}

    def to_dict(self) -> dict:
        """The JSON layout: one key per field (the request, plan and decode settings as dicts), and "predicted"."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            elif isinstance(value, (list, dict)):
                value = type(value)(value)
            out[f.name] = value
        out["predicted"] = self.predicted
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Sidecar":
        """Any version up to this one; ValueError (naming the problem) for what is not a sidecar. Each field is
        read by its name; a key this version does not know is left out, a field the file lacks takes its default."""
        if not isinstance(data, dict):
            raise ValueError(f"a sidecar is a JSON object, not {type(data).__name__}")
        version = data.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= SIDECAR_VERSION:
            raise ValueError(f"sidecar version {version!r} is not one this FitVideo reads (1 to {SIDECAR_VERSION})")
        video, request = data.get("video"), data.get("request")
        if not isinstance(video, str) or not video or not isinstance(request, dict) or "task" not in request:
            raise ValueError("a sidecar needs 'video' (a file name) and 'request' (with a task)")
        try:
            req = GenerationRequest.from_dict(request)
        except TypeError as exc:
            raise ValueError(f"the sidecar's request is not readable ({exc})") from exc
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields and v is not None}
        settings = data.get("decode_settings")
        values.update(
            request=req, version=version, created=str(data.get("created", "?")),
            # version 1 had no "kind": a re-decode is the one without a plan
            kind=data.get("kind") or ("decode" if "decode_settings" in data and not data.get("plan") else "generate"),
            frames=int(data.get("frames") or (data.get("decode") or {}).get("frames") or 0),
            plan=_plan_from_dict(data["plan"]) if isinstance(data.get("plan"), dict) else None,
            decode_settings=_known(DecodeSettings, settings) if isinstance(settings, dict) else None,
        )
        return cls(**values)

    def write(self, path: str | Path) -> Path:
        """Write atomically (a temporary name, renamed when complete) as the current version."""
        return decode.write_json_atomic(Path(path), dataclasses.replace(self, version=SIDECAR_VERSION).to_dict())

    @classmethod
    def read(cls, path: str | Path) -> "Sidecar":
        """The sidecar at `path`; OSError when it cannot be read, ValueError when it is not a sidecar."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path.name} is not JSON ({exc})") from exc
        return cls.from_dict(data)


def _known(cls, data: dict):
    """A dataclass from a dict, leaving out keys it does not have (a newer or older layout)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _plan_from_dict(data: dict) -> Plan:
    data = dict(data)
    if isinstance(data.get("decode"), dict):
        data["decode"] = _known(DecodeSettings, data["decode"])
    if isinstance(data.get("reasons"), list):
        data["reasons"] = tuple(data["reasons"])
    return _known(Plan, data)


# =========================================================================== the latents


@dataclass(frozen=True)
class SavedLatents:
    """`<video>.latents.pt`: {"latents": (B, C, F, H, W) VAE space, CPU; "request": dict; "format": 1}."""

    latents: torch.Tensor  # (B, C, F, H, W), VAE space
    request: GenerationRequest
    path: Path | None = None  # where it was read from or written to

    def write(self, path: str | Path) -> "SavedLatents":
        """Write atomically; a failed write leaves no temporary file behind (the OSError is raised)."""
        path = Path(path)
        tmp = decode.partial_path(path)
        data = {"latents": self.latents.detach().cpu(), "request": self.request.to_dict(), "format": LATENTS_FORMAT}
        try:
            torch.save(data, tmp)
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return dataclasses.replace(self, path=path)

    @classmethod
    def read(cls, path: str | Path) -> "SavedLatents":
        """Read a latents file, with a RequestError that says what is wrong with it."""
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
            raise RequestError(
                f"latents file {str(path)!r} has format {data.get('format')!r}; this version reads {LATENTS_FORMAT}"
            )
        z = data["latents"]
        if not isinstance(z, torch.Tensor) or z.ndim != 5:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise RequestError(f"latents in {str(path)!r} must be a (B, C, F, H, W) tensor, got {shape}")
        return cls(z, GenerationRequest.from_dict(data["request"]), path)


# =========================================================================== past results (the gallery)


@dataclass(frozen=True)
class PastResult:
    name: str  # the video file name, unique in the folder
    video: Path
    sidecar: Path
    data: dict  # the sidecar in its JSON layout (Sidecar.to_dict()), whatever version it was written as

    @property
    def request(self) -> GenerationRequest:
        return Sidecar.from_dict(self.data).request

    def caption(self) -> str:
        r = self.data["request"]
        prompt = r.get("prompt", "")
        short = prompt if len(prompt) <= 40 else prompt[:40] + "…"
        return f"{r.get('task', '?').upper()} · seed {r.get('seed')} · {short}"


def read_result(sidecar: Path) -> PastResult | None:
    """The result a sidecar describes, or None when it is unreadable or its video is gone."""
    try:
        record = Sidecar.read(sidecar)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a value of the wrong type in a foreign JSON
        logger.debug("skipping %s: %s", sidecar, exc)
        return None
    video = Path(sidecar).parent / record.video
    return PastResult(video.name, video, Path(sidecar), record.to_dict()) if video.is_file() else None


def list_results(outputs_dir: Path, limit: int = GALLERY_LIMIT) -> list[PastResult]:
    """Finished results in the folder, newest first (hidden partial files left out)."""
    folder = Path(outputs_dir)
    sidecars = [p for p in folder.glob("*.json") if not p.name.startswith(".")] if folder.is_dir() else []
    sidecars.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    results = (r for r in map(read_result, sidecars) if r is not None)
    return list(itertools.islice(results, limit))


def find_result(outputs_dir: Path, name: str) -> PastResult | None:
    """A result by its video's file name; only a bare name inside the outputs folder is looked up."""
    if not name or Path(name).name != name:
        return None
    return read_result((Path(outputs_dir) / name).with_suffix(".json"))


def gallery_items(results: list[PastResult]) -> list[tuple[str, str]]:
    return [(str(r.video), r.caption()) for r in results]
