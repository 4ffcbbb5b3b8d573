"""Local diffusers folders as models: a folder written by `save_pretrained` (a fine-tune, weights kept
outside the hub cache) is planned and run like a registry model.

Its family and tasks come from `model_index.json` (`_class_name`), its shapes from the components'
`config.json` files, its parameter counts from the safetensors headers (the 8-byte length and the JSON
index at the front of each file: names, dtypes and shapes; no weights are read). Nothing here imports torch.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import struct
from collections import Counter, defaultdict
from pathlib import Path

from configs.schema import ModelSpec, RequestError, TaskSpec
from families import DENOISERS, ModelFamily, family_of_pipeline

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "preprocessor_config.json", "tokenizer_config.json")
COMPONENTS = (*DENOISERS, "vae", "text_encoder", "image_encoder")  # the ones the planner counts
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


class ModelUnavailableError(RequestError):
    """The model's weights are not on this machine (or its folder is incomplete)."""


def missing_files(folder: Path) -> list[str]:
    """Names of the files a diffusers pipeline folder lacks (model_index.json lists its components)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return ["model_index.json"]
    index = json.loads(index_path.read_text())
    missing = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            missing.append(f"{name}/")
            continue
        files = [p.name for p in sub.iterdir()]
        if not any(f in CONFIG_NAMES or f == "tokenizer.json" or f.endswith(".model") for f in files):
            missing.append(f"{name}/config.json")
        if (sub / "config.json").is_file() and not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
            missing.append(f"{name}/ (weights: *.safetensors)")
    return missing


def is_model_folder(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def folder_family(folder: Path) -> ModelFamily:
    index = json.loads((Path(folder) / "model_index.json").read_text())
    name = index.get("_class_name", "")
    family = family_of_pipeline(name)
    if family is None:
        raise RequestError(f"{folder} holds a {name or 'unknown'} pipeline; FitVideo serves CogVideoX and Wan pipelines")
    return family


# --------------------------------------------------------------------------- safetensors headers


def safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape"} of every tensor in a .safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def count_parameters(folder: Path, block_prefix: str = "") -> tuple[dict[str, int], str | None]:
    """({"total", "largest_leaf", "non_block", "block_leaf"}, dtype name) of one component folder.

    A leaf is a module: its tensors share a name up to the last dot (`blocks.0.ffn.net.0.proj.weight` and
    `.bias`). Without safetensors (.bin only) the counts are estimated from the files' sizes at 2 bytes a weight.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        total = size // 2
        logger.info("%s has no safetensors: counting %d parameters from its file size", folder, total)
        return {"total": total, "largest_leaf": total, "non_block": total, "block_leaf": total}, None
    leaves: dict[str, int] = defaultdict(int)
    dtypes: Counter[str] = Counter()
    for path in files:
        for name, info in safetensors_header(path).items():
            n = math.prod(info["shape"])
            leaves[name.rsplit(".", 1)[0]] += n
            dtypes[info["dtype"]] += n
    total = sum(leaves.values())
    in_blocks = {k: v for k, v in leaves.items() if block_prefix and k.startswith(block_prefix)}
    counts = {
        "total": total,
        "largest_leaf": max(leaves.values(), default=0),
        "non_block": total - sum(in_blocks.values()),
        "block_leaf": max(in_blocks.values(), default=0),
    }
    return counts, SAFETENSORS_DTYPES.get(dtypes.most_common(1)[0][0]) if dtypes else None


# --------------------------------------------------------------------------- a folder's spec


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def spec_from_folder(model: str) -> ModelSpec:
    """The ModelSpec of a local diffusers folder: planned from the folder's own sizes."""
    folder = Path(model).expanduser().resolve()
    missing = missing_files(folder)
    if missing:
        raise ModelUnavailableError(f"model folder {model!r} is incomplete; missing: {', '.join(missing)}")
    return _spec(str(folder), model, (folder / "model_index.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _spec(folder_str: str, model: str, _mtime: int) -> ModelSpec:
    folder = Path(folder_str)
    index = _read_json(folder / "model_index.json")
    class_name = index.get("_class_name", "")
    family = folder_family(folder)
    configs = {c: _read_json(folder / c / "config.json") for c in COMPONENTS if (folder / c).is_dir()}
    configs["tokenizer"] = _read_json(folder / "tokenizer" / "tokenizer_config.json")
    params, parts, dtype, stored = {}, {}, None, {}
    for comp in COMPONENTS:
        if (folder / comp).is_dir():
            counts, comp_dtype = count_parameters(folder / comp, family.block_prefixes.get(comp, ""))
            params[comp] = counts.pop("total")
            parts[comp] = counts
            stored[comp] = comp_dtype or "none"  # "none": no safetensors (a .bin is read into anonymous memory)
            dtype = dtype or (comp_dtype if comp == "transformer" else None)
    defaults = family.folder_defaults(configs)
    fixed = defaults.pop("fixed_size", None)
    tasks = {t: TaskSpec(family.pipelines[t], folder_str, fixed if t == "i2v" else None) for t in family.tasks_of(class_name)}
    logger.debug("local model %s: %s %s, tasks %s", folder, family.name, class_name, ", ".join(tasks))
    return ModelSpec(
        id=model, family=family.name, label=f"{folder.name} (local folder)", default_dtype=dtype or "bfloat16",
        params=params, tasks=tasks, config=configs, parts=parts, folder=folder_str, stored_dtypes=stored,
        boundary_ratio=index.get("boundary_ratio"), **defaults,  # a two-expert pipeline saves its boundary
    )


def find_model_folders(models_dir: str | Path | None) -> list[ModelSpec]:
    """The diffusers folders of a family FitVideo serves directly under `models_dir` (unreadable ones are
    skipped with a log line), for the UI's model list."""
    root = Path(models_dir).expanduser() if models_dir else None
    if root is None or not root.is_dir():
        return []
    specs = []
    for sub in sorted(p for p in root.iterdir() if (p / "model_index.json").is_file()):
        try:
            specs.append(spec_from_folder(str(sub)))
        except (RequestError, OSError, ValueError, KeyError) as exc:
            logger.info("skipping model folder %s: %s", sub, exc)
    return specs
