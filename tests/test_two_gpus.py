"""Components across GPUs in one box (issue "Outgrow one GPU"): with two GPUs and no context parallel the planner
puts the text encoder on the second one when that spares the transformer any offload; synthetic devices, pure
arithmetic. The runner's side (the prompt encoded where the encoder sits, the embeddings handed over) runs on the
CPU with the encoder's device set by hand: the same latents as the ordinary run."""
from __future__ import annotations

import dataclasses

import pytest

from configs.registry import get_model_spec
from configs.schema import GenerationRequest
from vram_utils import plan_for
from vram_utils.archs import arch_for
from vram_utils.estimate import apart_peak_bytes, component_bytes, workload_for
from vram_utils.probe import GIB, DeviceInfo, GpuInfo

COG_5B = "THUDM/CogVideoX-5b"
WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def cards(*gbs: float) -> DeviceInfo:
    gpus = tuple(GpuInfo(i, f"Synthetic {gb} GB", int(gb * GIB), 0, int(gb * GIB), 0, 0) for i, gb in enumerate(gbs))
    return DeviceInfo(True, gpus, 64 * GIB, 62 * GIB, GIB)


def request(model: str = COG_5B, **extra) -> GenerationRequest:
    return GenerationRequest(model=model, task="t2v", prompt="a cat", height=480, width=720, **extra)


def test_on_two_16_gb_cards_the_text_encoder_moves_and_the_transformer_needs_no_offload():
    spec = get_model_spec(COG_5B)
    one, two = plan_for(request(), spec, cards(16)), plan_for(request(), spec, cards(16, 16))
    assert one.offload != "none" and one.encoder_device == ""  # beside its encoder the transformer must offload
    assert two.offload == "none" and two.encoder_device == "cuda:1" and two.fits
    assert any(r.startswith("text encoder on GPU1 (Synthetic 16 GB)") and "without offload on GPU0" in r
               for r in two.reasons), two.reasons
    # the main GPU's peak leaves the encoder out; the second GPU's need is the encoder's weights and one prompt
    w = workload_for(request(), spec)
    encoder = component_bytes(arch_for(spec, "t2v"), w)["text_encoder"]
    alone = plan_for(request(offload="none"), spec, cards(40))  # everything on one (large) card
    assert alone.stages["denoise"] - two.stages["denoise"] == encoder
    assert two.predicted_peak_gpu_bytes <= two.budget_bytes
    assert apart_peak_bytes(arch_for(spec, "t2v"), w.replace(encoder_apart=True)) < 16 * GIB


@pytest.mark.parametrize("device, req, why", [
    (cards(16, 4), request(), "the second card cannot hold the encoder"),
    (cards(16, 16), request(context_parallel=2), "context parallel has each GPU hold everything"),
    (cards(16, 16), request(offload="model"), "a rung the person chose"),
    (cards(24, 24), request(WAN_1_3B), "everything fits one card: nothing moves"),
])
def test_nothing_moves_where_it_would_not_help_or_cannot(device, req, why):
    p = plan_for(req, get_model_spec(req.model), device)
    assert p.encoder_device == "", why


def test_the_runner_encodes_where_the_encoder_is_and_hands_the_embeddings_over(runner, tiny_models, monkeypatch):
    import torch

    req = GenerationRequest(model="tiny-wan", task="t2v", prompt="a red car", frames=5, height=32, width=32,
                            steps=2, seed=3)
    plain = runner.generate(req)
    real_plan, calls = runner.plan, []

    def apart_plan(run, device=None):
        return dataclasses.replace(real_plan(run, device), encoder_device="cpu")  # on a GPU box: "cuda:1"

    import engine.runner as runner_module

    encode = runner_module.encode_prompt
    monkeypatch.setattr(runner_module, "encode_prompt", lambda *a, **k: calls.append(k) or encode(*a, **k))
    monkeypatch.setattr(runner, "plan", apart_plan)
    apart = runner.generate(req.replace(seed=3))
    assert calls and calls[0]["device"] == torch.device("cpu")  # the encoder's device, not the pipeline's
    z0 = torch.load(plain.latents_path, weights_only=False)["latents"]
    z1 = torch.load(apart.latents_path, weights_only=False)["latents"]
    assert torch.equal(z0, z1) and apart.plan.encoder_device == "cpu"
    assert runner.last_leftovers == []
