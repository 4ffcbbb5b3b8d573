"""The model list as a person sees it: which models serve a task, whether their weights are on this
machine, and if not, how big the download is and the command that fetches it.

Only file-system look-ups: nothing loads and nothing touches the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.registry import get_model_spec, models_for_task

DOWNLOAD_MB_PER_S = 50  # for the "first run fetches N GB, about M min" estimate
FALLBACK_MODEL = "tiny-cogvideox"  # the default when no real model's weights are here


@dataclass(frozen=True)
class ModelStatus:
    model: str
    ready: bool  # weights on this machine (or built in)
    tiny: bool  # the random-weight demo family
    label: str  # for the dropdown
    note: str  # markdown shown under the dropdown


def model_status(model: str, task: str) -> ModelStatus:
    """Whether a model's weights are here, and if not, the download and the command that fetches it."""
    from engine.loaders import ModelUnavailableError, is_offline, resolve_source

    spec = get_model_spec(model)
    if spec.tiny:
        return ModelStatus(
            model, True, True, f"{spec.label} · built in, no download",
            "**Demo model with random weights**: built in, no download, the video is noise. "
            "It checks the machinery (queue, progress, memory plan, decode, saving) in about a second.",
        )
    repo = spec.tasks[task].repo
    fetch = f"`hf download {repo}`"
    minutes = max(1, round(spec.download_gb * 1000 / DOWNLOAD_MB_PER_S / 60))
    try:
        source = resolve_source(model, task)  # a file-system look-up; nothing loads
    except ModelUnavailableError:  # offline with no complete copy, or an incomplete download
        detail = "offline mode, no complete local copy" if is_offline() else "the local copy is incomplete"
        return ModelStatus(
            model, False, False, f"{spec.label} · not on this machine ({spec.download_gb:.0f} GB)",
            f"**Not on this machine** ({detail}). Fetch it with {fetch} "
            f"({spec.download_gb:.1f} GB, about {minutes} min at {DOWNLOAD_MB_PER_S} MB/s).",
        )
    if source.folder is not None:
        return ModelStatus(
            model, True, False, f"{spec.label} · on this machine", f"**On this machine**: `{source.folder}`"
        )
    return ModelStatus(
        model, False, False, f"{spec.label} · download {spec.download_gb:.0f} GB on first run",
        f"**Not on this machine yet**: the first Generate downloads {spec.download_gb:.1f} GB "
        f"(about {minutes} min at {DOWNLOAD_MB_PER_S} MB/s). To fetch it ahead: {fetch}.",
    )


def offered_models(task: str, models_dir: str | Path | None = None) -> list[str]:
    """The models the list offers for a task: the registry's, then the diffusers folders under `models_dir`
    (configs/local.py) that serve it."""
    from configs.local import find_model_folders

    return models_for_task(task) + [s.id for s in find_model_folders(models_dir) if task in s.tasks]


def model_statuses(task: str, models_dir: str | Path | None = None) -> list[ModelStatus]:
    return [model_status(m, task) for m in offered_models(task, models_dir)]


def default_model(statuses: list[ModelStatus]) -> str:
    """The first real model whose weights are here; else the tiny demo, so Generate works on the first click."""
    for s in statuses:
        if s.ready and not s.tiny:
            return s.model
    tiny = [s.model for s in statuses if s.tiny]
    return FALLBACK_MODEL if FALLBACK_MODEL in tiny else tiny[0]


def resolutions_for(model: str, task: str) -> list[str]:
    """The sizes a model offers for a task, as 'HEIGHTxWIDTH' (one when its embeddings fix the size)."""
    spec = get_model_spec(model)
    fixed = spec.tasks[task].fixed_size
    sizes = [fixed] if fixed else list(spec.resolutions)
    return [f"{h}x{w}" for h, w in sizes]
