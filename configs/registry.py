"""The model registry (models.yaml) and the motion presets (presets.yaml), and finding a model by id or folder.

    spec = get_model_spec("Wan-AI/Wan2.1-T2V-14B-Diffusers")   # or a local diffusers folder (configs/local.py)
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

from configs.schema import CONFIG_DIR, PRESETS, TASKS, ModelSpec, Preset, RequestError, TaskSpec
from families import FAMILIES


def _model_from_yaml(model_id: str, raw: dict) -> ModelSpec:
    tasks = {
        t: TaskSpec(spec["pipeline"], spec["repo"], tuple(spec["fixed_size"]) if spec.get("fixed_size") else None)
        for t, spec in raw["tasks"].items()
    }
    if raw["family"] not in FAMILIES:
        raise ValueError(f"models.yaml: {model_id} has family {raw['family']!r}; known: {', '.join(FAMILIES)}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"models.yaml: {model_id} has unknown task(s) {sorted(unknown)}; allowed: {TASKS}")
    return ModelSpec(
        id=model_id,
        family=raw["family"],
        label=raw["label"],
        default_dtype=raw["default_dtype"],
        resolutions=tuple(tuple(r) for r in raw["resolutions"]),
        default_frames=int(raw["default_frames"]),
        max_frames=int(raw["max_frames"]),
        fps=int(raw["fps"]),
        size_multiple=int(raw["size_multiple"]),
        params={k: int(v) for k, v in raw["params"].items()},
        tasks=tasks,
        download_gb=float(raw.get("download_gb", 0.0)),
        published_vram_gb={k: float(v) for k, v in (raw.get("published_vram_gb") or {}).items()},
        shared_weights=dict(raw.get("shared_weights") or {}),
        tiny=bool(raw.get("tiny", False)),
        config={c: dict(v) for c, v in (raw.get("config") or {}).items()},
        boundary_ratio=float(raw["boundary_ratio"]) if raw.get("boundary_ratio") is not None else None,
        parts={c: {k: int(n) for k, n in v.items()} for c, v in (raw.get("parts") or {}).items()},
    )


@functools.cache
def load_registry(path: Path = CONFIG_DIR / "models.yaml") -> dict[str, ModelSpec]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return {model_id: _model_from_yaml(model_id, spec) for model_id, spec in raw.items()}


@functools.cache
def load_presets(path: Path = CONFIG_DIR / "presets.yaml") -> dict[str, Preset]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    presets = {name: Preset(name=name, **spec) for name, spec in raw.items()}
    if set(presets) != set(PRESETS):
        raise ValueError(f"presets.yaml must define exactly {PRESETS}, found {sorted(presets)}")
    return presets


def get_model_spec(model: str) -> ModelSpec:
    """A registry model by id, or a local diffusers folder by path (configs/local.py)."""
    registry = load_registry()
    if model in registry:
        return registry[model]
    from configs import local

    if local.is_model_folder(model):
        return local.spec_from_folder(model)
    raise RequestError(
        f"unknown model {model!r}; known models: {', '.join(registry)}, or a local diffusers folder "
        "(one with model_index.json)"
    )


def models_for_task(task: str) -> list[str]:
    return [m for m, spec in load_registry().items() if task in spec.tasks]
