"""Step caches on the tiny models: every cache runs where supported, on the no/group/sequential offload rungs;
interval 1 / threshold 0 gives the uncached latents bitwise (every hooked forward then calls the original
forward with the same inputs); removal restores them; the counters match the hooks; a LoRA composes."""
from __future__ import annotations

import pytest
import torch

from engine import stepcache as sc
from engine.tiny import COGVIDEOX_TEXT_LEN

STEPS = 6


def run(pipe, cog: bool) -> torch.Tensor:
    kw = dict(prompt="a cat", num_inference_steps=STEPS, height=32, width=32, output_type="latent",
              guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    kw.update(num_frames=9, max_sequence_length=COGVIDEOX_TEXT_LEN) if cog else kw.update(num_frames=5)
    with torch.inference_mode():
        return pipe(**kw).frames


@pytest.fixture(scope="module", params=["tiny-wan", "tiny-cogvideox"])
def model(request, tiny_models):
    from engine.loaders import load_pipeline

    pipe = load_pipeline(request.param, "t2v")
    cog = request.param == "tiny-cogvideox"
    base = run(pipe, cog)
    kw = dict(prompt="a cat", height=32, width=32, output_type="latent")
    kw.update(num_frames=9, max_sequence_length=COGVIDEOX_TEXT_LEN) if cog else kw.update(num_frames=5)
    sc.calibrate_magcache(pipe, STEPS, **kw)
    return pipe, cog, base


def usable(cog: bool) -> list[str]:
    ok = sc.supported("cogvideox" if cog else "wan", "t2v")
    return [n for n in sc.STEP_CACHES[1:] if ok[n] is None and not (cog and n == "first-block")]  # tiny cog: 1 block


# Settings that skip nothing. FasterCache has none: its unconditional-branch skip (4 steps in 5) does not
# follow the attention interval, so it is checked for skipping and for removal only.
NEUTRAL = {"first-block": 0.0, "magcache": 0.0, "taylorseer": 1, "pab": 1}


def test_parse_and_support():
    assert sc.parse_step_cache("first-block:0.2") == ("first-block", 0.2)
    assert sc.parse_step_cache("pab") == ("pab", None)
    for bad in ("fast", "pab:0.5", "first-block:x", "off:1"):
        with pytest.raises(ValueError, match="step cache"):
            sc.parse_step_cache(bad)
    assert all(r for n, r in sc.supported("wan", "v2v").items() if n != "off")
    assert sc.supported("wan", "t2v")["pab"] and sc.supported("cogvideox", "v2v")["pab"] is None


@pytest.mark.parametrize("rung", ["none", "group", "sequential"])
def test_each_cache_skips_counts_and_neutral_settings_and_removal_give_the_base(model, rung):
    from vram_utils import apply_offload_strategy

    pipe, cog, base = model
    for name in usable(cog) if rung == "none" else ["taylorseer"]:  # every cache once, the rungs with one
        state = sc.apply_step_cache(pipe, name, steps=STEPS)
        apply_offload_strategy(pipe, rung, device="cpu")  # the runner's apply_plan: offload outside the cache
        assert sc.apply_step_cache(pipe, name, steps=STEPS) is state  # idempotent: hooks left alone
        out = run(pipe, cog)
        st = state.stats()
        assert 0 < st["blocks_computed"] < st["blocks_total"], (name, st)
        # independent count: every unit is called once per transformer call (Wan: 2 per step, cond + uncond)
        assert st["blocks_total"] == len(sc._units(pipe.transformer, name)) * STEPS * (1 if cog else 2)
        assert not torch.equal(out, base)
        if name in NEUTRAL:
            sc.apply_step_cache(pipe, name, NEUTRAL[name], steps=STEPS)
            apply_offload_strategy(pipe, rung, device="cpu")
            assert torch.equal(run(pipe, cog), base), name
        sc.remove_step_cache(pipe)
        apply_offload_strategy(pipe, rung, device="cpu")
        assert torch.equal(run(pipe, cog), base), name
    apply_offload_strategy(pipe, "none", device="cpu")


def test_first_block_counter_matches_the_hooks_own_decisions(model):
    pipe, cog, base = model
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    if cog:  # tiny CogVideoX has one block: first-block caching is refused with a reason, not run
        with pytest.raises(ValueError, match="block"):
            sc.apply_step_cache(pipe, "first-block", 0.05, steps=STEPS)
        return

    state = sc.apply_step_cache(pipe, "first-block", 0.05, steps=STEPS)
    head = pipe.transformer.blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
    decisions = []
    original = head._should_compute_remaining_blocks
    head._should_compute_remaining_blocks = lambda r: decisions.append(original(r)) or decisions[-1]
    run(pipe, cog)
    rest = len(pipe.transformer.blocks) - 1
    assert state.stats()["blocks_computed"] == len(decisions) + rest * sum(decisions)
    sc.remove_step_cache(pipe)


def test_a_lora_and_a_cache_compose_and_removal_restores(model, tmp_path):
    from lora_files import make_lora
    from engine import lora

    pipe, cog, base = model
    path = make_lora(pipe.transformer, tmp_path / "l.safetensors", seed=1)
    active = (lora.ActiveLora(lora.LoraFile("l", path, lora.read_signature(path), adapter="l"), (1.0,)),)
    lora.apply_loras(pipe, active)
    with_lora = run(pipe, cog)
    name = "taylorseer"  # a fixed schedule: skips whatever the weights
    state = sc.apply_step_cache(pipe, name, steps=STEPS)
    lora.apply_loras(pipe, active)  # the runner's order: loras, cache, plan
    assert not torch.equal(run(pipe, cog), with_lora) and state.stats()["skipped_fraction"] > 0
    sc.apply_step_cache(pipe, name, NEUTRAL[name], steps=STEPS)
    assert torch.equal(run(pipe, cog), with_lora)
    sc.remove_step_cache(pipe)
    assert torch.equal(run(pipe, cog), with_lora)
    lora.apply_loras(pipe, ())
    assert torch.equal(run(pipe, cog), base)


def test_the_planner_counts_what_each_cache_keeps_in_the_denoise_stage():
    from configs.schema import GenerationRequest, get_model_spec
    from vram_utils.archs import arch_for
    from vram_utils.estimate import STEP_CACHE_TENSORS, denoise_activation_bytes, video_tokens, workload_for

    spec = get_model_spec("THUDM/CogVideoX-5b")
    arch = arch_for(spec)
    off = workload_for(GenerationRequest(model=spec.id, task="t2v", prompt="a cat", step_cache="off"), spec)
    tokens = video_tokens(off, arch) + arch.transformer.joint_text_tokens
    hidden = tokens * arch.transformer.dim * off.dtype_bytes * 2  # one tensor per branch (guidance 6: cond + uncond)
    for name, (fixed, per_block) in STEP_CACHE_TENSORS.items():
        w = off.replace(step_cache=name)
        extra = denoise_activation_bytes(arch, w) - denoise_activation_bytes(arch, off)
        assert extra == (fixed + per_block * arch.transformer.layers) * hidden, name
    # the fast preset's TaylorSeer is counted when the request leaves the cache to the preset
    fast = workload_for(GenerationRequest(model=spec.id, task="t2v", prompt="a cat", preset="fast"), spec)
    assert fast.step_cache == "taylorseer"
