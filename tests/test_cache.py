"""The pipeline cache: lazy, LRU within MAX_CACHE_SIZE, shared parts are the same objects, eviction frees."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import pipeline_utils
import vram_utils
from engine.cache import PipelineCache


def param_ptrs(*pipes) -> set[int]:
    return {
        p.data_ptr()
        for pipe in pipes
        for c in pipe.components.values()
        if isinstance(c, torch.nn.Module)
        for p in c.parameters()
    }


def test_nothing_loads_until_asked_and_a_hit_loads_nothing(tiny_models):
    cache = PipelineCache(max_size=2)
    assert cache.loads == 0 and len(cache) == 0 and cache.total_bytes() == 0
    first = cache.get("tiny-cogvideox", "t2v")
    again = cache.get("tiny-cogvideox", "t2v")
    assert again is first and cache.loads == 1
    assert cache.keys() == [("tiny-cogvideox", "t2v", "none")]


def test_v2v_from_a_cached_t2v_shares_every_weight_and_adds_no_parameter_bytes(tiny_models):
    cache = PipelineCache(max_size=2)
    t2v = cache.get("tiny-cogvideox", "t2v")
    bytes_t2v, ptrs_t2v = cache.total_bytes(), param_ptrs(t2v)
    v2v = cache.get("tiny-cogvideox", "v2v")
    assert type(v2v).__name__ == "CogVideoXVideoToVideoPipeline" and cache.loads == 2
    for comp in ("transformer", "vae", "text_encoder", "tokenizer"):
        assert getattr(v2v, comp) is getattr(t2v, comp), comp
    assert v2v.scheduler is not t2v.scheduler  # per-run state is never shared
    assert param_ptrs(v2v) <= ptrs_t2v and cache.total_bytes() == bytes_t2v > 0
    assert {r["task"]: sorted(r["shared"]) for r in cache.info()}["v2v"] == ["text_encoder", "tokenizer", "transformer", "vae"]


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-wan"])
def test_i2v_reuses_the_vae_and_text_encoder_but_not_the_transformer(tiny_models, model):
    cache = PipelineCache(max_size=2)
    t2v = cache.get(model, "t2v")
    before = cache.total_bytes()
    i2v = cache.get(model, "i2v")
    assert i2v.vae is t2v.vae and i2v.text_encoder is t2v.text_encoder
    assert i2v.transformer is not t2v.transformer  # more input channels: different weights
    added = cache.total_bytes() - before
    own = vram_utils.module_bytes(i2v.transformer) + vram_utils.module_bytes(getattr(i2v, "image_encoder", None))
    assert added == own > 0


def test_the_least_recently_used_pipeline_goes_first_and_max_cache_size_holds(tiny_models, monkeypatch):
    cache = PipelineCache(max_size=2)
    cache.get("tiny-cogvideox", "t2v")
    cache.get("tiny-wan", "t2v")
    cache.get("tiny-cogvideox", "t2v")  # now the most recent
    cache.get("tiny-wan", "i2v")
    assert cache.keys() == [("tiny-cogvideox", "t2v", "none"), ("tiny-wan", "i2v", "none")]
    assert len(cache) == 2 and cache.loads == 3
    monkeypatch.setattr(pipeline_utils, "MAX_CACHE_SIZE", 1)  # what --max-cache-size sets
    small = PipelineCache()
    small.get("tiny-cogvideox", "t2v")
    small.get("tiny-wan", "t2v")
    assert small.max_size == 1 and small.keys() == [("tiny-wan", "t2v", "none")]


def test_eviction_frees_what_no_cached_pipeline_uses_and_keeps_what_one_still_does(tiny_models):
    cache = PipelineCache(max_size=2)
    t2v = cache.get("tiny-wan", "t2v")
    vae, transformer = weakref.ref(t2v.vae), weakref.ref(t2v.transformer)
    transformer_bytes = vram_utils.module_bytes(t2v.transformer)
    i2v = cache.get("tiny-wan", "i2v")  # shares the VAE and text encoder with the t2v
    # model offload chains each hook to the previous component: after eviction those hooks must not
    # keep the t2v's own transformer alive through the shared VAE
    vram_utils.apply_offload_strategy(t2v, "model", "cpu")
    del t2v
    freed = cache.unload("tiny-wan", "t2v")
    gc.collect()
    assert transformer() is None and freed == transformer_bytes
    assert vae() is i2v.vae  # the i2v still uses it
    assert not hasattr(i2v.vae, "_hf_hook") and vram_utils.placed_as(i2v) is None  # re-placed before its run
    del i2v
    assert cache.unload_all() > 0 and len(cache) == 0
    gc.collect()
    assert vae() is None


def test_evicting_over_the_limit_releases_the_pipeline(tiny_models):
    cache = PipelineCache(max_size=1)
    first = weakref.ref(cache.get("tiny-cogvideox", "t2v"))
    cache.get("tiny-wan", "t2v")  # evicts the CogVideoX pipeline: nothing shared across families
    gc.collect()
    assert first() is None and cache.keys() == [("tiny-wan", "t2v", "none")]


def test_concurrent_gets_of_one_pipeline_load_it_once(tiny_models):
    cache = PipelineCache(max_size=2)
    got, errors = [], []

    def worker():
        try:
            got.append(cache.get("tiny-cogvideox", "t2v"))
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 4 and all(p is got[0] for p in got)
    assert cache.loads == 1


def test_a_second_run_of_a_cached_model_is_planned_with_its_weights_already_resident(tiny_models, tmp_path):
    from configs.schema import GenerationRequest
    from configs.validate import resolve_request
    from engine.runner import Runner
    from vram_utils.probe import GIB, DeviceInfo

    machine = DeviceInfo(False, (), 24 * GIB, 20 * GIB, 1 * GIB)  # synthetic: the same free RAM both times
    runner = Runner(PipelineCache(max_size=2), outputs_dir=tmp_path)
    req = resolve_request(GenerationRequest(model="tiny-wan", task="t2v", prompt="a cat", frames=9, height=32,
                                            width=32, steps=2))
    cold = runner.plan(req, machine)
    runner.generate(req)
    pipe = runner.cache.get("tiny-wan", "t2v")
    weights = sum(vram_utils.module_bytes(getattr(pipe, c)) for c in ("transformer", "vae", "text_encoder"))
    assert runner.cache.resident_bytes("tiny-wan", "t2v", "none", "cpu") == weights > 0
    warm = runner.plan(req, machine)
    assert warm.budget_bytes - cold.budget_bytes == weights
    # V2V shares every weight of the cached T2V pipeline; another model shares nothing
    assert runner.cache.resident_bytes("tiny-wan", "v2v", "none", "cpu") == weights
    assert runner.cache.resident_bytes("tiny-cogvideox", "t2v", "none", "cpu") == 0
    assert runner.cache.resident_bytes("tiny-wan", "t2v", "none", "cuda") == 0


# =========================================================================== host RAM as a limit (issue 12)


class _FakePipe:
    """Stands in for a diffusers pipeline: its components as attributes (no diffusers needed)."""

    def __init__(self, modules: dict):
        self.__dict__.update(modules)
        self.components = dict(modules)


def _fake_loader(model, task, shared, torch_dtype):
    from configs.registry import get_model_spec

    modules = {}
    for comp, n in get_model_spec(model).params.items():
        if comp in shared:
            modules[comp] = shared[comp]
        else:
            modules[comp] = torch.nn.Linear(n, 1, bias=False).to(torch_dtype)  # n parameters
    return _FakePipe(modules)


def test_a_load_that_would_overflow_ram_evicts_the_least_recently_used_pipeline_it_does_not_share(monkeypatch):
    from engine import cache as cache_mod
    from vram_utils.planner import HOST_MARGIN_BYTES

    monkeypatch.setattr(cache_mod, "load_shared_pipeline", _fake_loader)
    free = {"bytes": HOST_MARGIN_BYTES + 10**9}  # a synthetic machine: 1 GB above the margin
    cache = PipelineCache(max_size=4, available_bytes=lambda: free["bytes"])
    cache.get("tiny-wan", "t2v")
    cache.get("tiny-cogvideox", "t2v")
    cache.get("tiny-wan", "v2v")  # shares every weight with tiny-wan t2v: adds nothing
    assert cache.keys() == [("tiny-wan", "t2v", "none"), ("tiny-cogvideox", "t2v", "none"), ("tiny-wan", "v2v", "none")]
    dtype = torch.float32
    need = cache.load_bytes("tiny-wan", {}, dtype)
    assert need == 4 * sum(__import__("configs.registry").registry.get_model_spec("tiny-wan").params.values())
    assert cache.load_bytes("tiny-wan", {"text_encoder": None, "vae": None}, dtype) < need  # shared / left out
    # Now RAM is short: a tiny-cogvideox i2v load (new transformer) must make room. The LRU entry,
    # tiny-wan t2v, shares nothing with it and goes; tiny-cogvideox t2v shares its VAE and text encoder, stays.
    i2v_need = cache.load_bytes("tiny-cogvideox", {"vae": 1, "text_encoder": 1, "tokenizer": 1}, dtype)
    free["bytes"] = HOST_MARGIN_BYTES + i2v_need - 1
    dropped = []
    real_drop = cache._drop

    def drop(key):
        dropped.append(key)
        free["bytes"] = HOST_MARGIN_BYTES + 10**9  # the eviction gave the RAM back
        return real_drop(key)

    monkeypatch.setattr(cache, "_drop", drop)
    cache.get("tiny-cogvideox", "i2v")
    assert dropped == [("tiny-wan", "t2v", "none")]
    assert ("tiny-cogvideox", "t2v", "none") in cache and ("tiny-cogvideox", "i2v", "none") in cache


def test_when_nothing_cached_can_go_the_load_goes_ahead_and_says_so(monkeypatch, caplog):
    from engine import cache as cache_mod

    monkeypatch.setattr(cache_mod, "load_shared_pipeline", _fake_loader)
    cache = PipelineCache(max_size=4, available_bytes=lambda: 0)  # no RAM at all, nothing cached
    with caplog.at_level("WARNING", logger="engine.cache"):
        cache.get("tiny-wan", "t2v")
    assert len(cache) == 1 and "nothing cached can go" in caplog.text
    cache.get("tiny-wan", "v2v")  # shares everything: nothing to load, nothing evicted
    assert len(cache) == 2


def test_an_expert_loaded_again_mid_run_makes_room_first_but_never_evicts_its_own_pipeline(monkeypatch):
    """One expert in RAM: the low-noise expert loads at the switch, mid-run. That load is checked against the RAM
    like a pipeline load: an unrelated cached pipeline goes first, the running one stays."""
    from engine import cache as cache_mod
    from engine import loaders
    from vram_utils.planner import HOST_MARGIN_BYTES

    class _Pipe(_FakePipe):
        def register_modules(self, **modules):
            self.__dict__.update(modules)
            self.components.update(modules)

    monkeypatch.setattr(cache_mod, "load_shared_pipeline", lambda *a: _Pipe(_fake_loader(*a).components))
    monkeypatch.setattr(loaders, "load_component",
                        lambda model, task, comp, dtype: torch.nn.Linear(
                            __import__("configs.registry").registry.get_model_spec(model).params[comp], 1, bias=False))
    free = {"bytes": HOST_MARGIN_BYTES + 10**9}
    cache = PipelineCache(max_size=4, available_bytes=lambda: free["bytes"])
    cache.get("tiny-wan-moe", "t2v", without=("transformer_2",))  # high-noise expert only
    cache.get("tiny-cogvideox", "t2v")  # unrelated, more recently used
    expert_bytes = 4 * __import__("configs.registry").registry.get_model_spec("tiny-wan-moe").params["transformer_2"]
    free["bytes"] = HOST_MARGIN_BYTES + expert_bytes - 1  # RAM is one byte short for the low-noise expert
    dropped = []
    real_drop = cache._drop

    def drop(key):
        dropped.append(key)
        free["bytes"] = HOST_MARGIN_BYTES + 10**9
        return real_drop(key)

    monkeypatch.setattr(cache, "_drop", drop)
    pipe = cache.get("tiny-wan-moe", "t2v", without=("transformer",))  # the switch: free one, load the other
    assert dropped == [("tiny-cogvideox", "t2v", "none")]
    assert pipe.transformer is None and pipe.transformer_2.weight.numel() * 4 == expert_bytes
    assert cache.keys() == [("tiny-wan-moe", "t2v", "none")]
