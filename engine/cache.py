"""A lazy LRU cache of pipelines whose members share weights.

Keyed by (model, task, quant). On a miss, components that another cached
pipeline already holds with the same weights (same weight key, dtype and quant)
are passed to `load_shared_pipeline` instead of being loaded again: V2V from a
cached T2V adds no weights; I2V reuses the VAE and text encoder. Evicting a
pipeline frees only what no other cached pipeline still uses.

MAX_CACHE_SIZE is not the only limit: host RAM is the other. Before a load, the bytes the new pipeline will
add (its components' parameters at the load dtype, less what it shares or leaves out) are compared with the
RAM available now less the planner's host margin; while they would overflow it, the least recently used
pipelines whose weights this load will not share are evicted first.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from configs.registry import get_model_spec, load_registry
from engine.loaders import load_shared_pipeline, resolve_dtype
from engine.modifiers import CleanStates
from families import DENOISERS
from vram_utils import module_bytes, release_memory  # noqa: F401  (release_memory: re-exported)
from vram_utils.planner import HOST_MARGIN_BYTES

logger = logging.getLogger(__name__)

CacheKey = tuple[str, str, str]  # (model, task, quant)
# Components whose weights may be shared; schedulers hold per-run state and never are.
SHAREABLE = (*DENOISERS, "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")
QUANTIZED = DENOISERS  # what `quant` changes: the transformers


@dataclass
class CacheEntry:
    key: CacheKey
    pipe: object
    weight_keys: dict[str, str]  # component name -> weight identity
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    freed: set[str] = field(default_factory=set)  # components a run freed (or left out): the next get reloads them
    clean: CleanStates = field(default_factory=CleanStates)  # each component as loaded (engine/modifiers.py)


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

    def __init__(self, max_size: int | None = None, dtype: str | None = None,
                 available_bytes: Callable[[], int] | None = None):
        if max_size is None:  # seed 003: `pipeline_utils.MAX_CACHE_SIZE = 1` before the cache is made
            import pipeline_utils

            max_size = pipeline_utils.MAX_CACHE_SIZE
        self.max_size = max(1, int(max_size))
        self.dtype = dtype
        # host RAM available now (psutil by default; tests inject a small machine)
        self.available_bytes = available_bytes or _host_available_bytes
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
    def get(self, model: str, task: str, quant: str = "none", without: tuple[str, ...] = ()):
        """The (model, task, quant) pipeline. `without`: components left out (freed if held, not loaded: the
        text encoder after the prompt is encoded, one expert of two); any other component a run freed before is
        loaded again, so the cache stays coherent for the next run."""
        key: CacheKey = (model, task, quant)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.time()
                logger.debug("cache hit %s", key)
                return self._refit(entry, without)
            torch_dtype = resolve_dtype(self.dtype, get_model_spec(model))
            wanted = {c: weight_key(model, task, c, torch_dtype, quant) for c in SHAREABLE}
            shared = self._find_shared(wanted)
            shared.update(dict.fromkeys(without))  # None: from_pretrained leaves the component out
            self._make_room(self.load_bytes(model, shared, torch_dtype), set(wanted.values()), model)
            pipe = load_shared_pipeline(model, task, shared, torch_dtype)
            self.loads += 1
            if quant != "none":
                import quant as quant_mod

                for comp in QUANTIZED:
                    module = getattr(pipe, comp, None)
                    if module is not None and comp not in shared:
                        quant_mod.apply(module, quant)
            present = {c: wk for c, wk in wanted.items() if getattr(pipe, c, None) is not None}
            entry = CacheEntry(key, pipe, present, freed=set(without))
            self._take_clean(entry, shared)
            self._entries[key] = entry
            self._evict_over_limit()
            return pipe

    # ------------------------------------------------------------------ components freed during a run
    def _refit(self, entry: CacheEntry, without: tuple[str, ...]) -> object:
        """Free the components in `without`, then load again those a run freed before (and not in `without`)."""
        for comp in without:
            if comp in entry.weight_keys:
                self._free_component(comp, entry.weight_keys[comp])
        for comp in sorted(entry.freed - set(without)):
            self._load_component(entry, comp)
        return entry.pipe

    def _free_component(self, comp: str, wk: str) -> None:
        """Drop a component from every cached pipeline holding these weights, so that its memory goes now.
        Its parameters move to the meta device: a caller may still hold the module object for a moment (the
        denoise loop keeps its `current_model` until the next step), the weights' memory goes all the same."""
        from vram_utils.offload import remove_all_offload

        module = None
        for entry in self._entries.values():
            if entry.weight_keys.get(comp) == wk:
                module = getattr(entry.pipe, comp)
                remove_all_offload(entry.pipe)  # model offload's hook chain holds every component
                entry.pipe.register_modules(**{comp: None})
                del entry.weight_keys[comp]
                entry.freed.add(comp)
        if isinstance(module, torch.nn.Module):
            freed_bytes = module_bytes(module)
            module.to("meta")
            logger.info("freed %s (%.1f MiB)", comp, freed_bytes / 2**20)
        del module
        release_memory()

    def _load_component(self, entry: CacheEntry, comp: str) -> None:
        """Load one freed component again (or share it from another cached pipeline) into `entry`'s pipeline."""
        from engine.loaders import load_component

        model, task, quant = entry.key
        torch_dtype = resolve_dtype(self.dtype, get_model_spec(model))
        wk = weight_key(model, task, comp, torch_dtype, quant)
        module = self._find_shared({comp: wk}).get(comp)
        if module is None:
            itemsize = torch.empty((), dtype=torch_dtype).element_size()
            need = get_model_spec(model).params.get(comp, 0) * itemsize  # e.g. the low-noise expert, mid-run
            self._make_room(need, {wk, *entry.weight_keys.values()}, f"{model} {comp}", keep=entry.key)
            module = load_component(model, task, comp, torch_dtype)
            self.loads += 1
            if quant != "none" and comp in QUANTIZED:
                import quant as quant_mod

                quant_mod.apply(module, quant)
        entry.pipe.register_modules(**{comp: module})
        entry.weight_keys[comp] = wk
        entry.freed.discard(comp)
        self._take_clean(entry, {c: m for c, m in entry.pipe.components.items() if c != comp})

    def _take_clean(self, entry: CacheEntry, shared: dict[str, object]) -> None:
        """Fingerprint what `entry` just loaded as its clean state; a component shared with another cached pipeline
        takes that pipeline's (a run on the other may be under way with its modifiers on it)."""
        loaded = [c for c in entry.weight_keys if c not in shared]
        entry.clean.take(entry.pipe, loaded)
        for comp, module in shared.items():
            if module is None:
                continue
            other = next((e for e in self._entries.values() if getattr(e.pipe, comp, None) is module), None)
            if other is not None and comp in other.clean.states:
                entry.clean.states[comp] = other.clean.states[comp]

    def leftovers(self) -> list[str]:
        """What differs on any cached pipeline from its components' state when they loaded (hooks, adapters,
        processors, compiled forwards, VAE tiling, FitVideo's marks): after a run, always [] unless a bug."""
        with self._lock:
            lines: list[str] = []
            for key, entry in self._entries.items():
                lines += [ln for ln in entry.clean.leftovers(entry.pipe, " ".join(key)) if ln not in lines]
            return lines

    def _find_shared(self, wanted: dict[str, str]) -> dict[str, object]:
        shared = {}
        for entry in reversed(self._entries.values()):  # most recently used first
            for comp, wk in entry.weight_keys.items():
                if comp not in shared and wanted.get(comp) == wk:
                    shared[comp] = getattr(entry.pipe, comp)
        return shared

    # ------------------------------------------------------------------ eviction
    def load_bytes(self, model: str, skip, torch_dtype: torch.dtype) -> int:
        """Host bytes a load of `model` adds: its components' parameters at `torch_dtype` (the registry's or the
        folder's counts), less the components in `skip` (shared with a cached pipeline, or left out)."""
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        params = get_model_spec(model).params
        return sum(n * itemsize for comp, n in params.items() if comp not in skip)

    def _make_room(self, need: int, wanted: set[str], what: str, keep: CacheKey | None = None) -> None:
        """Evict least recently used pipelines (never `keep`) that share no weights with `wanted` while loading
        `need` bytes (`what`: a model, or one component reloaded mid-run) would overflow the RAM available now
        (less the planner's host margin)."""
        while need > self.available_bytes() - HOST_MARGIN_BYTES:
            victim = next((k for k, e in self._entries.items()
                           if k != keep and not wanted & set(e.weight_keys.values())), None)
            if victim is None:
                logger.warning("loading %s needs %.1f GiB of RAM; %.1f GiB is available and nothing cached can go",
                               what, need / 2**30, self.available_bytes() / 2**30)
                return
            logger.info("evicting %s: loading %s needs %.1f GiB of RAM, %.1f GiB is available", victim, what,
                        need / 2**30, self.available_bytes() / 2**30)
            self._drop(victim)

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

    def get_loaded(self, key: CacheKey, load: Callable[[], object], weight_keys: dict[str, str]) -> object:
        """A member that is not a diffusers pipeline (an upscaler): loaded by `load()` on a miss, then held,
        counted and evicted like any pipeline. It exposes its modules as `components`; `weight_keys` maps
        each component name to its weight identity (a different identity never shares)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.last_used = time.time()
                return entry.pipe
            obj = load()
            self.loads += 1
            self._entries[key] = CacheEntry(key, obj, dict(weight_keys))
            self._evict_over_limit()
            return obj


def _remove_hooks(pipe, still_used: list) -> None:
    """Offload hooks hold references to modules (model offload chains each hook to the previous
    component); remove them so the memory can go. Hooks on a module another cached pipeline still
    uses stay, unless this pipeline placed them (that pipeline re-applies its plan before its run)."""
    from vram_utils.offload import detach_pipeline

    detach_pipeline(pipe, still_used)


def _host_available_bytes() -> int:
    """The host RAM that binds now (a container's limit where one is set: vram_utils/host_budget.py)."""
    from vram_utils.host_budget import host_limit

    return host_limit().available_bytes
