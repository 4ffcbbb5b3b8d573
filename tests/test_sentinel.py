"""The leak sentinel catches memory that does not come back, names the holder, and ignores cached weights."""
from __future__ import annotations

import torch

from vram_utils.sentinel import LeakSentinel


def test_a_held_tensor_is_reported_with_its_shape_and_a_released_one_is_not():
    sentinel = LeakSentinel()
    sentinel.measure()  # collect what earlier tests in this process left: before() skips the collection by design
    token = sentinel.before()
    hoard = [torch.ones(64, 1024, 1024)]  # 256 MiB nobody should keep
    leaked = sentinel.after(token, "leaky run")
    assert leaked.leaked and leaked.delta_bytes > 200 * 2**20
    assert any("(64, 1024, 1024)" in h for h in leaked.holders)
    hoard.clear()
    token = sentinel.before()
    clean = sentinel.after(token, "clean run")
    assert not clean.leaked and abs(clean.delta_bytes) < sentinel.host_threshold_bytes
    assert [r.label for r in sentinel.history] == ["leaky run", "clean run"]


def test_weights_the_cache_holds_are_not_a_leak():
    kept: list[torch.Tensor] = []
    sentinel = LeakSentinel(held_bytes=lambda device: sum(t.numel() * t.element_size() for t in kept))
    token = sentinel.before()
    kept.append(torch.ones(32, 1024, 1024))  # 128 MiB loaded into the "cache" during the run
    report = sentinel.after(token, "first load")
    assert not report.leaked, report.line()


def test_a_warm_up_run_is_recorded_but_not_judged():
    sentinel = LeakSentinel()
    sentinel.measure()  # a baseline without earlier tests' garbage (see above)
    token = sentinel.before()
    hoard = [torch.ones(32, 1024, 1024)]
    report = sentinel.after(token, "first run loads a model", judge=False)
    assert report.delta_bytes > 100 * 2**20 and not report.leaked
    assert "warm-up" in report.line()
    del hoard


class _Node:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self):
        self.me = self


def test_a_runs_collection_frees_the_runs_cyclic_garbage_and_hands_the_rest_back_after():
    import gc
    import weakref

    from vram_utils.sizes import objects_of_this_run, release_memory

    older = _Node()
    older_ref = weakref.ref(older)
    with objects_of_this_run():
        del older  # alive when the run began, garbage during it
        made = _Node()
        made_ref = weakref.ref(made)
        del made
        release_memory(run_only=True)
        assert made_ref() is None, "garbage the run made must be collected"
        assert older_ref() is not None, "what was alive before the run is not walked by the run's collections"
        release_memory()  # a full release (an unload, an out-of-memory retry) reaches it too
        assert older_ref() is None
    later = _Node()
    later_ref = weakref.ref(later)
    with objects_of_this_run():
        del later
    gc.collect()  # handed back after the run: Python's own collections find it
    assert later_ref() is None
