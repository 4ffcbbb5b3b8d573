"""Load diffusers pipelines from a registry id (hub or tiny) or a local folder.

`load_pipeline(model, task, dtype=None)` and
`load_shared_pipeline(model, task, shared_components={...})` are the public API
(seed 003). Loading always goes through `<PipelineClass>.from_pretrained`, for
the tiny family too.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.local import ModelUnavailableError, missing_files  # noqa: F401  (re-exported)
from configs.schema import TASKS, ModelSpec, RequestError
from configs.registry import get_model_spec
from engine.tiny import TINY_NAMES, ensure_tiny_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Source:
    """Where one (model, task) pipeline comes from."""

    model: str
    task: str
    pipeline: str  # class name
    folder: Path | None  # resolved local folder, or None if it must be downloaded
    repo: str  # hub id, or the folder path


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dtype(dtype: str | torch.dtype | None, spec: ModelSpec | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or (spec.default_dtype if spec else "bfloat16")
    if name not in DTYPES:
        raise RequestError(f"dtype={dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _hub_folder(repo: str) -> Path | None:
    """The local snapshot of a hub repo, or None when it is not on this machine."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _unavailable(model: str, repo: str, spec: ModelSpec | None, detail: str) -> ModelUnavailableError:
    from huggingface_hub.constants import HF_HUB_CACHE

    size = f" (about {spec.download_gb:.0f} GB)" if spec and spec.download_gb else ""
    return ModelUnavailableError(
        f"weights for {model!r} are not on this machine: {detail}. Looked in the Hugging Face cache "
        f"{HF_HUB_CACHE}. Fetch them with `hf download {repo}`{size}, or pass a local folder; "
        "the tiny-cogvideox and tiny-wan models work offline"
    )


def resolve_source(model: str, task: str) -> Source:
    """Find where the pipeline for (model, task) comes from, without loading anything big."""
    if task not in TASKS:
        raise RequestError(f"task={task!r} is not allowed; choose one of {TASKS}")
    spec = get_model_spec(model)  # a registry id, or a local folder (an incomplete one names what it lacks)
    if task not in spec.tasks:
        raise RequestError(f"model {model!r} has no {task} pipeline; it serves: {', '.join(spec.tasks)}")
    task_spec = spec.tasks[task]
    if spec.folder:
        return Source(model, task, task_spec.pipeline, Path(spec.folder), spec.folder)
    if spec.tiny:
        name, sub = task_spec.repo.split("/")
        assert name in TINY_NAMES, name
        return Source(model, task, task_spec.pipeline, ensure_tiny_model(name) / sub, task_spec.repo)
    folder = _hub_folder(task_spec.repo)
    if folder is not None:
        missing = missing_files(folder)
        if missing:
            raise _unavailable(model, task_spec.repo, spec, f"the download is incomplete, missing {', '.join(missing)}")
    elif is_offline():
        raise _unavailable(model, task_spec.repo, spec, "offline mode (HF_HUB_OFFLINE) and no local copy")
    return Source(model, task, task_spec.pipeline, folder, task_spec.repo)


def load_shared_pipeline(
    model: str,
    task: str = "t2v",
    shared_components: dict[str, object] | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load the (model, task) pipeline, reusing the given component objects instead of loading them.

    `load_shared_pipeline("THUDM/CogVideoX-5b", "v2v", shared_components={"transformer": t2v.transformer,
    "vae": t2v.vae})` adds no weights for the shared parts: they are the same objects.
    """
    import diffusers

    source = resolve_source(model, task)
    spec = get_model_spec(model)
    torch_dtype = resolve_dtype(dtype, spec)
    cls = getattr(diffusers, source.pipeline)
    shared = dict(shared_components or {})
    logger.info(
        "loading %s %s (%s, %s)%s", model, task, source.pipeline, str(torch_dtype).removeprefix("torch."),
        f", sharing {', '.join(sorted(shared))}" if shared else "",
    )
    try:
        pipe = cls.from_pretrained(str(source.folder or source.repo), dtype=torch_dtype, **shared)
    except (OSError, ValueError) as exc:
        if source.folder is None:  # a download was attempted and failed (no network, gated repo, ...)
            raise _unavailable(model, source.repo, spec, f"download failed ({type(exc).__name__}: {exc})") from exc
        raise
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component_classes(model: str, task: str) -> dict[str, tuple[str, str]]:
    """Component -> (library, class) for the components the (model, task) folder holds (model_index.json)."""
    import json

    source = resolve_source(model, task)
    if source.folder is None:
        raise _unavailable(model, source.repo, get_model_spec(model), "its pipeline folder is not downloaded")
    index = json.loads((source.folder / "model_index.json").read_text(encoding="utf-8"))
    return {
        name: (value[0], value[1]) for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] and value[1]
    }


def load_component(model: str, task: str, component: str, dtype: str | torch.dtype | None = None):
    """One component of the (model, task) pipeline from its subfolder, e.g. Wan 2.2's low-noise expert
    (a Wan 2.2 A14B's low-noise expert, loaded into the pipeline mid-run) or a released text encoder."""
    import importlib

    classes = component_classes(model, task)
    if component not in classes:
        raise ValueError(f"component={component!r} is not in {model} {task}; it has: {', '.join(sorted(classes))}")
    library, class_name = classes[component]
    cls = getattr(importlib.import_module(library), class_name)
    folder = str(resolve_source(model, task).folder)
    torch_dtype = resolve_dtype(dtype, get_model_spec(model))
    logger.info("loading %s of %s %s (%s)", component, model, task, class_name)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):  # a tokenizer, an image processor
        return cls.from_pretrained(folder, subfolder=component)
    dtype_kw = "dtype" if library == "transformers" else "torch_dtype"  # transformers 5 renamed it
    return cls.from_pretrained(folder, subfolder=component, **{dtype_kw: torch_dtype})


def load_pipeline(model: str, task: str = "t2v", dtype: str | torch.dtype | None = None):
    """Load a pipeline for `task` ('t2v', 'i2v', 'v2v') from a hub id, a local folder or a tiny name."""
    return load_shared_pipeline(model, task, None, dtype)
