"""A lazy LRU cache of pipelines whose members share weights.

Keyed by (model, task, quant). On a miss, components that another cached
pipeline already holds with the same weights (same weight key, dtype and quant)
are passed to `load_shared_pipeline` instead of being loaded again: V2V from a
cached T2V adds no weights; I2V reuses the VAE and text encoder. Evicting a
pipeline frees only what no other cached pipeline still uses.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

import pipeline_utils
from configs.schema import get_model_spec, load_registry
from pipeline_utils.loaders import load_shared_pipeline, resolve_dtype
from vram_utils import module_bytes, release_memory  # noqa: F401  (release_memory: re-exported)

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, str]  # (model, task, quant)
# Components whose weights may be shared; schedulers hold per-run state and never are.
SHAREABLE = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")
QUANTIZED = ("transformer", "transformer_2")  # what `quant` changes


@dataclass
class CacheEntry:
    key: CacheKey
    pipe: object
    weight_keys: dict[str, str]  # component name -> weight identity
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)


def weight_key(model: str, task: str, component: str, dtype: torch.dtype, quant: str) -> str:
    """Identity of a component's weights: equal keys mean the same weights, shareable."""
    spec = load_registry().get(model)
    if spec is not None:
        repo = spec.tasks[task].repo
        group = spec.shared_weights.get(component)
    else:  # a local folder: all its tasks read the same files
        repo, group = model, None
    base = group or f"{repo}:{component}"
    q = quant if component in QUANTIZED else "none"
    return f"{base}|{str(dtype).removeprefix('torch.')}|{q}"


class PipelineCache:
    """Thread-safe LRU of loaded pipelines. Nothing loads until `get` is called."""

    def __init__(self, max_size: int | None = None, dtype: str | None = None):
        self.max_size = max(1, int(max_size if max_size is not None else pipeline_utils.MAX_CACHE_SIZE))
        self.dtype = dtype
        self.loads = 0  # how many pipelines were loaded from disk (a hit adds nothing)
        self._entries: collections.OrderedDict[CacheKey, CacheEntry] = collections.OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[CacheKey]:
        with self._lock:
            return list(self._entries)

    def info(self) -> list[dict]:
        """One row per cached pipeline: key, its bytes, and which of them are shared with others."""
        with self._lock:
            rows = []
            for key, entry in self._entries.items():
                shared = [c for c, wk in entry.weight_keys.items() if self._users(wk) > 1]
                rows.append(
                    {
                        "model": key[0],
                        "task": key[1],
                        "quant": key[2],
                        "bytes": sum(module_bytes(getattr(entry.pipe, c, None)) for c in entry.weight_keys),
                        "shared": shared,
                        "last_used": entry.last_used,
                    }
                )
            return rows

    def total_bytes(self) -> int:
        """Bytes held by the cache, each shared component counted once."""
        with self._lock:
            seen: dict[str, int] = {}
            for entry in self._entries.values():
                for comp, wk in entry.weight_keys.items():
                    seen.setdefault(wk, module_bytes(getattr(entry.pipe, comp, None)))
            return sum(seen.values())

    def weights_on(self, device_type: str) -> tuple[int, set[int]]:
        """(bytes, tensor ids) of cached weights resting on `device_type` ("cpu" / "cuda"), each tensor once.

        What the cache legitimately keeps between runs; the leak sentinel counts the rest.
        """
        from vram_utils import tensor_bytes

        with self._lock:
            seen: dict[int, int] = {}
            for entry in self._entries.values():
                for comp in entry.weight_keys:
                    module = getattr(entry.pipe, comp, None)
                    if isinstance(module, torch.nn.Module):
                        for t in list(module.parameters()) + list(module.buffers()):
                            if t.device.type == device_type and id(t) not in seen:
                                seen[id(t)] = tensor_bytes(t)
            return sum(seen.values()), set(seen)

    def resident_bytes(self, model: str, task: str, quant: str, device_type: str) -> int:
        """Bytes of cached weights on `device_type` that a run of (model, task, quant) would use as they are:
        its own pipeline's, or the components it would share with another cached pipeline. The planner
        counts them as available, since the run needs no second copy of them."""
        from vram_utils import tensor_bytes

        torch_dtype = resolve_dtype(self.dtype, get_model_spec(model))
        wanted = {weight_key(model, task, c, torch_dtype, quant) for c in SHAREABLE}
        with self._lock:
            seen: dict[int, int] = {}
            for entry in self._entries.values():
                for comp, wk in entry.weight_keys.items():
                    module = getattr(entry.pipe, comp, None)
                    if wk not in wanted or not isinstance(module, torch.nn.Module):
                        continue
                    for t in list(module.parameters()) + list(module.buffers()):
                        if t.device.type == device_type and id(t) not in seen:
                            seen[id(t)] = tensor_bytes(t)
            return sum(seen.values())

    def _users(self, wk: str) -> int:
        return sum(wk in e.weight_keys.values() for e in self._entries.values())

    # ------------------------------------------------------------------ loading
    def get(self, model: str, task: str, quant: str = "none"):
        key: CacheKey = (model, task, quant)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.time()
                logger.debug("cache hit %s", key)
                return entry.pipe
            torch_dtype = resolve_dtype(self.dtype, get_model_spec(model))
            wanted = {c: weight_key(model, task, c, torch_dtype, quant) for c in SHAREABLE}
            shared = self._find_shared(wanted)
            pipe = load_shared_pipeline(model, task, shared, torch_dtype)
            self.loads += 1
            if quant != "none":
                import quant as quant_mod

                for comp in QUANTIZED:
                    module = getattr(pipe, comp, None)
                    if module is not None and comp not in shared:
                        quant_mod.apply(module, quant)
            present = {c: wk for c, wk in wanted.items() if getattr(pipe, c, None) is not None}
            self._entries[key] = CacheEntry(key, pipe, present)
            self._evict_over_limit()
            return pipe

    def _find_shared(self, wanted: dict[str, str]) -> dict[str, object]:
        shared = {}
        for entry in reversed(self._entries.values()):  # most recently used first
            for comp, wk in entry.weight_keys.items():
                if comp not in shared and wanted.get(comp) == wk:
                    shared[comp] = getattr(entry.pipe, comp)
        return shared

    # ------------------------------------------------------------------ eviction
    def _evict_over_limit(self) -> None:
        while len(self._entries) > self.max_size:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: CacheKey) -> int:
        entry = self._entries.pop(key)
        freed = sum(
            module_bytes(getattr(entry.pipe, comp, None))
            for comp, wk in entry.weight_keys.items()
            if self._users(wk) == 0
        )
        still_used = [
            getattr(other.pipe, comp)
            for other in self._entries.values()
            for comp in other.weight_keys
            if isinstance(getattr(other.pipe, comp, None), torch.nn.Module)
        ]
        _remove_hooks(entry.pipe, still_used)
        del entry
        release_memory()
        logger.info("unloaded %s (%.1f MiB no longer used by any cached pipeline)", key, freed / 2**20)
        return freed

    def unload(self, model: str, task: str, quant: str = "none") -> int:
        """Drop one pipeline; returns the bytes that no other cached pipeline still uses."""
        with self._lock:
            key = (model, task, quant)
            return self._drop(key) if key in self._entries else 0

    def unload_all(self) -> int:
        with self._lock:
            return sum(self._drop(k) for k in list(self._entries))


def _remove_hooks(pipe, still_used: list) -> None:
    """Offload hooks hold references to modules (model offload chains each hook to the previous
    component); remove them so the memory can go. Hooks on a module another cached pipeline still
    uses stay, unless this pipeline placed them (that pipeline re-applies its plan before its run)."""
    from vram_utils.offload import detach_pipeline

    detach_pipeline(pipe, still_used)
