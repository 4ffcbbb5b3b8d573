"""The planner's two budgets on synthetic machines (issue 12): models x GPU x RAM, and the estimator's host side."""
from __future__ import annotations

import sys

import pytest

from configs.registry import get_model_spec
from tests.conftest import ROOT
from vram_utils import plan_for
from vram_utils.archs import ARCHS
from vram_utils.estimate import LADDER, estimate, workload_for
from vram_utils.ladder import HOST_MEASURES, host_rungs
from vram_utils.planner import HOST_MARGIN_BYTES, _decode_options, gpu_margin_bytes
from vram_utils.probe import GIB

sys.path.insert(0, str(ROOT / "bench"))
import plan_table  # noqa: E402

COG_5B, WAN_14B = "THUDM/CogVideoX-5b", "Wan-AI/Wan2.1-T2V-14B-Diffusers"
A14B, WAN_1_3B = "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@pytest.fixture(scope="module")
def table():
    return plan_table.rows()


def _request(model):
    from configs.schema import GenerationRequest

    return GenerationRequest(model=model, task="t2v", prompt="a cat on a beach")


def _any_pair_fits(model, gpu_gb, ram_gb, host_only=None):
    """Brute force, independent of the planner's search: does any (offload, host rung, decode) fit both budgets?"""
    spec, arch = get_model_spec(model), ARCHS[model]
    w = workload_for(_request(model), spec)
    device = plan_table.machine(gpu_gb, ram_gb)
    backend = "cuda" if gpu_gb else "cpu"
    gpu_budget = (device.gpus[0].total_bytes - gpu_margin_bytes(device.gpus[0])) if gpu_gb else None
    host_budget = device.host_available_bytes - HOST_MARGIN_BYTES
    for host in host_rungs(arch.experts, w.quant, bool(w.mapped)):
        if host_only and host != host_only:
            continue
        hw = w.replace(host_rung=host, quant="fp8-storage" if HOST_MEASURES[host].low_precision else w.quant)
        for rung in (LADDER if gpu_gb else ("none",)):
            for d in _decode_options(arch, hw):
                est = estimate(arch, hw.replace(decode=d), rung, backend)
                gpu_ok = gpu_budget is None or est.peak_device_bytes <= gpu_budget
                if gpu_ok and est.host_need_bytes <= host_budget:
                    return True
    return False


def test_the_table_covers_every_model_gpu_and_ram(table):
    assert len(table) == 4 * 4 * 3
    assert {r.model for r in table} == {COG_5B, WAN_14B, A14B, WAN_1_3B}


def test_no_row_fits_when_either_predicted_peak_exceeds_its_budget(table):
    for r in table:
        p = r.plan
        assert p.host_budget_bytes == (r.ram_gb - plan_table.OS_USED_GB) * GIB - HOST_MARGIN_BYTES, r
        assert p.predicted_peak_host_bytes == max(p.host_stages.values()), r
        if r.gpu_gb:
            gpu = plan_table.machine(r.gpu_gb, r.ram_gb).gpus[0]
            assert p.budget_bytes == gpu.total_bytes - gpu_margin_bytes(gpu)
            assert p.predicted_peak_gpu_bytes == max(p.stages.values())
        if p.fits:  # what must stay resident fits (the peak, or anonymous memory + a layer when read in place)
            assert p.host_need_bytes <= p.host_budget_bytes, r
            assert p.host_need_bytes == p.predicted_peak_host_bytes or p.host_rung == "in-place", r
            assert (p.predicted_peak_gpu_bytes if r.gpu_gb else p.host_need_bytes) <= p.budget_bytes, r
        else:
            assert "does not fit" in p.summary


def test_every_row_the_disk_rung_can_serve_is_served_and_no_row_is_refused_when_any_pair_fits(table):
    served_by_disk = 0
    for r in table:
        if r.plan.host_rung == "disk" and r.plan.fits:
            served_by_disk += 1
        if not r.plan.fits:
            assert not _any_pair_fits(r.model, r.gpu_gb, r.ram_gb, "disk"), r
            assert not _any_pair_fits(r.model, r.gpu_gb, r.ram_gb), r
    assert served_by_disk >= 6  # the 16 GB machines without a GPU, and 14B models on 32 GB with a GPU


def test_plan_flags_follow_the_host_rung(table):
    for r in table:
        p, experts = r.plan, get_model_spec(r.model).experts
        m = HOST_MEASURES[p.host_rung]
        assert p.release_text_encoder == m.release_text_encoder
        assert p.disk_offload == m.disk
        assert (p.quant == "fp8-storage") == m.low_precision
        assert p.experts_in_ram == (0 if experts == 1 else 1 if m.one_expert else 2)
        if experts == 1:
            assert p.host_rung != "one-expert"


def test_rows_the_issue_found_breaking_the_computer_now_respect_the_ram(table):
    rows = {(r.model, r.gpu_gb, r.ram_gb): r.plan for r in table}
    # Issue 12: Wan 2.1 14B at 12 / 24 GB with 32 GB "fit" on group offload with a 37.7 GiB host peak.
    for gpu in (12, 24):
        p = rows[(WAN_14B, gpu, 32)]
        assert p.fits and p.predicted_peak_host_bytes <= 29 * GIB
    assert rows[(WAN_14B, 12, 32)].host_rung == "disk" and rows[(WAN_14B, 24, 32)].host_rung == "low-precision"
    # CogVideoX-5b at 8 GB / 16 GB "fit" with 19.7 GiB of host: now within both budgets, the transformer's
    # weights from disk and the text encoder group-offloaded without streams (no pinned copy of its 8.9 GiB).
    cog = rows[(COG_5B, 8, 16)]
    assert cog.fits and cog.host_rung == "disk" and cog.predicted_peak_host_bytes <= cog.host_budget_bytes
    # Wan 2.2 A14B: one expert in RAM when both do not fit; weights from disk on small machines.
    assert rows[(A14B, 24, 64)].host_rung == "one-expert" and rows[(A14B, 24, 64)].experts_in_ram == 1
    # without a GPU the weights are read in place from their memory-mapped files (nothing copied, nothing written)
    assert rows[(A14B, None, 16)].host_rung == "in-place" and rows[(A14B, None, 16)].fits
    assert rows[(WAN_1_3B, 24, 64)].host_rung == "ram" and rows[(WAN_1_3B, 24, 64)].offload == "none"


def test_without_free_disk_the_disk_rows_say_what_the_disk_rung_needs():
    no_disk = {(r.model, r.gpu_gb, r.ram_gb): r.plan for r in plan_table.rows(disk_free=0)}
    p = no_disk[(WAN_14B, 12, 16)]  # on a GPU the offloaded weights are copies in RAM: nothing is read in place
    assert not p.fits and p.host_rung != "disk"
    need = next(r for r in p.reasons if r.startswith("suggestion: the disk rung fits"))
    # 14.3 B params x 2 bytes (29 M of them kept in float32: x 4) + 2 GiB margin
    assert "28.7 GiB free disk" in need and "has 0 MiB free" in need


def test_markdown_has_one_line_per_row(table):
    md = plan_table.markdown(table).splitlines()
    assert len(md) == 2 + len(table) and md[0].startswith("| model | GPU | RAM | offload | host rung")


# =========================================================================== estimator: experts and host RAM


def _w(model, **changes):
    return workload_for(_request(model), get_model_spec(model)).replace(**changes)


def test_model_offload_puts_one_expert_on_the_gpu_and_none_puts_both():
    arch = ARCHS[A14B]
    assert arch.experts == 2 and get_model_spec(A14B).experts == 2 and get_model_spec(A14B).boundary_ratio == 0.875
    expert = arch.transformer.params * 2 + arch.transformer.fp32_params * 2  # the float32-kept layers at 4 bytes
    none = {s.name: s for s in estimate(arch, _w(A14B), "none").stages}
    model = {s.name: s for s in estimate(arch, _w(A14B), "model").stages}
    assert model["denoise"].weights_bytes == expert
    assert none["denoise"].weights_bytes == 2 * expert + arch.text_encoder.params * 2 + arch.vae.params * 2
    one = {s.name: s for s in estimate(arch, _w(A14B, host_rung="one-expert"), "none").stages}
    assert one["denoise"].weights_bytes == expert + arch.vae.params * 2  # text encoder gone, one expert


def test_host_ram_per_rung_counts_pinned_copies_the_text_encoder_first_and_one_expert():
    arch = ARCHS[A14B]
    expert = arch.transformer.params * 2 + arch.transformer.fp32_params * 2  # the float32-kept layers at 4 bytes
    te, vae = arch.text_encoder.params * 2, arch.vae.params * 2
    ram = estimate(arch, _w(A14B), "model")
    assert ram.host_stage_dict()["text"] - ram.host_stages[0].activation_bytes == 2 * expert + te + vae
    # streams pin a copy: 2x what they offload (the VAE stays on the GPU; the text encoder runs once per prompt,
    # without streams: 1x)
    group = estimate(arch, _w(A14B), "group")
    assert group.host_stages[0].weights_bytes == 2 * (2 * expert) + te + vae
    first = {s.name: s.weights_bytes for s in estimate(arch, _w(A14B, host_rung="text-encoder-first"), "model").host_stages}
    assert first["text"] == te + vae and first["denoise"] == 2 * expert + vae  # the larger of the two, not the sum
    one = {s.name: s.weights_bytes for s in estimate(arch, _w(A14B, host_rung="one-expert"), "model").host_stages}
    assert one["denoise"] == expert + vae
    low = estimate(arch, _w(A14B, host_rung="low-precision", quant="fp8-storage"), "model")
    assert arch.transformer.params <= low.component_bytes["transformer"] < 1.05 * arch.transformer.params
    disk = {s.name: s.weights_bytes for s in estimate(arch, _w(A14B, host_rung="disk"), "group").host_stages}
    assert disk["denoise"] < 0.1 * expert  # the block groups in flight, not the expert
    none = {s.name: s.weights_bytes for s in estimate(arch, _w(A14B), "none").host_stages}
    assert none["text"] == 2 * expert + te + vae and none["denoise"] == 0  # loaded through RAM, then on the GPU


def test_the_cpu_backend_puts_everything_in_ram_and_host_rungs_shrink_it():
    arch = ARCHS[WAN_14B]
    ram = estimate(arch, _w(WAN_14B), "none", "cpu")
    first = estimate(arch, _w(WAN_14B, host_rung="text-encoder-first"), "none", "cpu")
    disk = estimate(arch, _w(WAN_14B, host_rung="disk"), "none", "cpu")
    assert ram.peak_host_bytes == ram.peak_device_bytes and ram.peak_gpu_bytes == 0
    assert ram.peak_host_bytes - first.peak_host_bytes >= arch.text_encoder.params * 2 * 0.9
    streamed, whole = disk.host_stage_dict()["denoise"], first.host_stage_dict()["denoise"]
    assert streamed < whole - arch.transformer.params * 2 * 0.9  # the expert's block groups in flight only
    assert disk.peak_host_stage == "text"  # then the text encoder alone sets the peak


def test_the_registry_has_wan_2_2_a14b_and_the_720p_i2v_model():
    t2v, i2v = get_model_spec(A14B), get_model_spec("Wan-AI/Wan2.2-I2V-A14B-Diffusers")
    assert t2v.tasks["t2v"].pipeline == "WanPipeline" and t2v.tasks["v2v"].pipeline == "WanVideoToVideoPipeline"
    assert i2v.tasks["i2v"].pipeline == "WanImageToVideoPipeline" and i2v.boundary_ratio == 0.9 and i2v.experts == 2
    assert i2v.params["transformer"] - t2v.params["transformer"] == 20 * 4 * 5120  # in_channels 36 vs 16
    for spec in (t2v, i2v):
        assert spec.shared_weights["text_encoder"] == "umt5-xxl" and spec.shared_weights["vae"] == "wan2.1-vae"
        assert (spec.default_frames, spec.fps) == (81, 16) and (480, 832) in spec.resolutions
        assert (720, 1280) in spec.resolutions
    p720 = get_model_spec("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")
    assert p720.resolutions == ((720, 1280), (1280, 720)) and p720.params["image_encoder"] == 632_076_800
    plan = plan_for(_request(A14B), t2v, plan_table.machine(24, 64), disk_free=0)
    assert plan.fits and plan.experts_in_ram in (1, 2)


def test_a14b_video_to_video_counts_the_one_expert_its_pipeline_holds():
    """diffusers' WanVideoToVideoPipeline has no `transformer_2`: V2V on A14B loads and plans one expert."""
    from configs.schema import GenerationRequest
    from vram_utils.archs import arch_for

    spec = get_model_spec(A14B)
    assert arch_for(spec, "t2v").experts == 2 and arch_for(spec, "v2v").experts == 1
    machine = plan_table.machine(24, 128)  # RAM for both experts: both plans on the `ram` host rung
    t2v = plan_for(GenerationRequest(model=A14B, task="t2v", prompt="a cat"), spec, machine, disk_free=0)
    v2v = plan_for(GenerationRequest(model=A14B, task="v2v", prompt="a cat", video="clip.mp4"), spec, machine,
                   disk_free=0)
    expert = spec.params["transformer"] * 2
    assert v2v.experts_in_ram == 0 and t2v.experts_in_ram == 2
    # the same rungs hold one expert fewer in RAM (text stage: every weight passes through RAM when loaded)
    assert t2v.offload == v2v.offload and t2v.host_rung == v2v.host_rung
    assert t2v.host_stages["text"] - v2v.host_stages["text"] >= expert * 0.9
