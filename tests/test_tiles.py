"""Decode tiles sized by the planner (issue "Speed"): the largest tiles whose decode fits, untiled when the whole
frame fits, the seed's 272 / 144 x 128 px only when memory demands it, a person's own tiles honoured.

Synthetic machines (bench/plan_table.py `machine`), pure arithmetic: no model, no GPU.
"""
from __future__ import annotations

import dataclasses

import pytest

import vram_utils.planner as planner
import vram_utils.search as search
from bench.plan_table import machine
from configs.schema import DecodeSettings, GenerationRequest
from configs.registry import get_model_spec
from vram_utils import plan_for
from vram_utils.archs import arch_for
from vram_utils.estimate import estimate, workload_for
from vram_utils.ladder import SEED_DECODE, auto_tiles, tile_layout, tile_rungs
from vram_utils.probe import GIB, DeviceInfo, GpuInfo

WAN_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
COG_5B = "THUDM/CogVideoX-5b"
COG_2B = "THUDM/CogVideoX-2b"
MODELS = (WAN_14B, WAN_1_3B, COG_5B)
RESOLUTIONS = ((480, 720), (720, 1280), (768, 1360))
CARDS_GB = (8, 12, 24)
SEED_OVERLAP = (SEED_DECODE.tile_y - SEED_DECODE.tile_stride_y, SEED_DECODE.tile_x - SEED_DECODE.tile_stride_x)


def request(model: str, hw: tuple[int, int], decode: DecodeSettings = DecodeSettings()) -> GenerationRequest:
    return GenerationRequest(model=model, task="t2v", prompt="a cat", height=hw[0], width=hw[1], decode=decode)


def overhead(model: str, hw: tuple[int, int], d: DecodeSettings) -> float:
    return tile_layout(d, hw, arch_for(get_model_spec(model), "t2v").vae.spatial_ratio).overhead


def fits_pair(model: str, hw: tuple[int, int], plan, d: DecodeSettings) -> bool:
    """Whether `d` fits both budgets on the plan's own (offload, host) pair."""
    spec = get_model_spec(model)
    w = planner._host_workload(workload_for(request(model, hw), spec), plan.host_rung)
    est = estimate(arch_for(spec, "t2v"), w.replace(decode=d), plan.offload, "cuda")
    return est.peak_device_bytes <= plan.budget_bytes and est.peak_host_bytes <= plan.host_budget_bytes


@pytest.fixture(scope="module")
def plans():
    return {(m, hw, gb): plan_for(request(m, hw), get_model_spec(m), machine(gb, 64))
            for m in MODELS for hw in RESOLUTIONS for gb in CARDS_GB}


def test_the_schema_defaults_mean_auto_and_anything_else_is_a_persons_choice():
    assert auto_tiles(DecodeSettings())
    assert not auto_tiles(DecodeSettings(enable_vae_tiling=False))
    assert not auto_tiles(DecodeSettings(tile_x=256))
    assert not auto_tiles(DecodeSettings(tile_stride_y=144))
    assert not auto_tiles(DecodeSettings(fixed_tiles=True))  # the defaults, marked as the person's own


@pytest.mark.parametrize("hw", RESOLUTIONS)
def test_the_candidates_keep_the_seeds_overlap_and_cost_less_than_the_seed(hw):
    seed = tile_layout(SEED_DECODE, hw, 8)
    assert seed.count == {(480, 720): 15, (720, 1280): 40, (768, 1360): 45}[hw]
    rungs = tile_rungs(SEED_DECODE, hw, 8)
    assert not rungs[0].enable_vae_tiling  # untiled first
    layouts = [tile_layout(d, hw, 8) for d in rungs]
    costs = [lay.overhead for lay in layouts]
    areas = [lay.tile_h * lay.tile_w for lay in layouts]
    assert costs == sorted(costs) and costs[-1] < seed.overhead
    assert areas == sorted(areas, reverse=True) and len(set(areas)) == len(areas)
    for lay in layouts[1:]:
        for starts, tile, need in ((lay.ys, lay.tile_h, SEED_OVERLAP[0]), (lay.xs, lay.tile_w, SEED_OVERLAP[1])):
            assert all((a + tile - b) * 8 >= need for a, b in zip(starts, starts[1:]))
    assert min(costs[1:]) <= 1.2  # a two-tile split along the long side


def test_every_plan_decodes_within_budget_with_the_largest_tiles_that_fit(plans):
    low = 0
    for (model, hw, gb), p in plans.items():
        over = overhead(model, hw, p.decode)
        if p.fits:
            assert p.stages["decode"] <= p.budget_bytes, (model, hw, gb)
        # nothing cheaper than the chosen tiles fits the plan's pair (the first that fits is the largest)
        for d in tile_rungs(SEED_DECODE, hw, 8):
            if overhead(model, hw, d) < over - 1e-9 and p.fits:
                assert not fits_pair(model, hw, p, d), (model, hw, gb, d)
        if p.fits and fits_pair(model, hw, p, dataclasses.replace(SEED_DECODE, enable_vae_tiling=False)):
            assert not p.decode.enable_vae_tiling and over == 1.0
        if p.fits and any(overhead(model, hw, d) <= 1.3 and fits_pair(model, hw, p, d)
                          for d in tile_rungs(SEED_DECODE, hw, 8)):
            assert over <= 1.3, (model, hw, gb)
        low += over <= 1.3
        assert p.decode != SEED_DECODE  # on these cards some larger tile always fits
        line = next(r for r in p.reasons if r.startswith("decode:"))
        assert f"{over:.2f}x the frame's pixels through the decoder" in line
        assert ("tiling off" in p.summary) == (not p.decode.enable_vae_tiling)
        assert p.decode.enable_vae_tiling or "untiled" in line
    assert low >= 20  # of 27: every Wan row; CogVideoX at 24 GB


def test_the_rows_the_issue_names(plans):
    p = plans[(WAN_1_3B, (480, 720), 12)]
    assert not p.decode.enable_vae_tiling and "decode: untiled, the whole frame fits" in " ".join(p.reasons)
    p = plans[(COG_5B, (720, 1280), 24)]
    assert tile_layout(p.decode, (720, 1280), 8).count == 3 and overhead(COG_5B, (720, 1280), p.decode) <= 1.3
    p = plans[(COG_5B, (480, 720), 12)]
    assert tile_layout(p.decode, (480, 720), 8).count == 2 and "tiling on (1x2 tiles, 1.18x pixels)" in p.summary


def test_larger_tiles_never_change_the_offload_or_host_rung(plans, monkeypatch):
    monkeypatch.setattr(search, "_auto_options", lambda arch, w: [])  # the search's larger tiles, none
    for (model, hw, gb), p in plans.items():
        seed = plan_for(request(model, hw), get_model_spec(model), machine(gb, 64))
        assert seed.decode.tile_x <= SEED_DECODE.tile_x  # the seed's tiles or the ladder below them
        assert (seed.offload, seed.host_rung, seed.fits) == (p.offload, p.host_rung, p.fits), (model, hw, gb)


def card(gb: float) -> DeviceInfo:
    total = int(gb * GIB)
    return DeviceInfo(True, (GpuInfo(0, f"Synthetic {gb} GB", total, 0, total, 0, 0),), 64 * GIB, 62 * GIB, GIB)


def test_the_seeds_tiles_come_back_only_when_memory_demands_it():
    # CogVideoX-2b at 720x1280 on cards from 5.5 to 6 GB: where no larger tile fits, the seed's 5x8 do.
    spec, hw = get_model_spec(COG_2B), (720, 1280)
    rows = [plan_for(request(COG_2B, hw), spec, card(5.5 + i / 40)) for i in range(21)]
    seed = [p for p in rows if p.decode == SEED_DECODE]
    assert seed, [p.decode for p in rows]
    for p in seed:
        assert p.fits and p.stages["decode"] <= p.budget_bytes
        assert not any(fits_pair(COG_2B, hw, p, d) for d in tile_rungs(SEED_DECODE, hw, 8))
        line = next(r for r in p.reasons if r.startswith("decode:"))
        assert line.startswith("decode: the seed's tiles") and "3.12x the frame's pixels" in line
    assert any(p.fits and overhead(COG_2B, hw, p.decode) < 3.12 for p in rows)  # larger ones, once they fit


def test_below_the_seeds_tiles_the_ladder_halves_them():
    # CogVideoX-5b at 480x720 on a 4.8 GB card: not even the seed's tiles fit; the ladder's 136 px tiles do.
    p = plan_for(request(COG_5B, (480, 720)), get_model_spec(COG_5B), card(4.8))
    assert p.fits and p.decode.tile_x == 136 and p.stages["decode"] <= p.budget_bytes
    assert any(r.startswith("decode: VAE tiles 272x272 -> 136x136 px") and "3.75x" in r for r in p.reasons)


@pytest.mark.parametrize("decode", [
    DecodeSettings(True, 256, 256, 128, 128), DecodeSettings(True, 512, 512, 384, 384),
    DecodeSettings(enable_vae_tiling=False), DecodeSettings(fixed_tiles=True),
])
def test_a_persons_own_tiles_are_honoured_when_they_fit(decode):
    p = plan_for(request(WAN_1_3B, (480, 720), decode), get_model_spec(WAN_1_3B), machine(24, 64))
    assert p.decode == decode
    line = next(r for r in p.reasons if r.startswith("decode:"))
    assert "as set" in line
    # unmarked, the same defaults let the planner decode this frame untiled (it fits on 24 GB)
    if decode == DecodeSettings(fixed_tiles=True):
        auto = plan_for(request(WAN_1_3B, (480, 720)), get_model_spec(WAN_1_3B), machine(24, 64))
        assert not auto.decode.enable_vae_tiling


def test_a_persons_own_tiles_step_down_only_when_they_do_not_fit():
    own = DecodeSettings(enable_vae_tiling=False)
    p = plan_for(request(COG_5B, (768, 1360), own), get_model_spec(COG_5B), machine(12, 64))
    assert p.decode.enable_vae_tiling and p.decode.tile_x == SEED_DECODE.tile_x  # the ladder's tiling rung
    assert any(r.startswith("decode: VAE tiling on") and "so the decode fits" in r for r in p.reasons)
