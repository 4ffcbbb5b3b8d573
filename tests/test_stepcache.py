"""Step caches on the tiny models: every cache runs where supported, on the no/group/sequential offload rungs (in the
modifiers' order: cache, then offload outside it); interval 1 / threshold 0 gives the uncached latents bitwise (every
hooked forward then calls the original forward with the same inputs); removal restores the model as loaded (its
fingerprint and its latents); the counters match the hooks; a LoRA composes; support is per model and task."""
from __future__ import annotations

import pytest
import torch

from engine import modifiers
from engine import stepcache as sc
from engine.tiny import COGVIDEOX_TEXT_LEN

STEPS = 6


def run(pipe, cog: bool, callback=None) -> torch.Tensor:
    kw = dict(prompt="a cat", num_inference_steps=STEPS, height=32, width=32, output_type="latent",
              guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    kw.update(num_frames=9, max_sequence_length=COGVIDEOX_TEXT_LEN) if cog else kw.update(num_frames=5)
    if callback is not None:
        kw["callback_on_step_end"] = callback
    with torch.inference_mode():
        return pipe(**kw).frames


def cache(name: str, value=None, ratios=None) -> sc.StepCache:
    return sc.StepCache(sc.StepCacheChoice(name, sc.DEFAULTS[name] if value is None else value), STEPS, ratios)


@pytest.fixture(scope="module", params=["tiny-wan", "tiny-cogvideox"])
def model(request, tiny_models):
    from engine.loaders import load_pipeline

    pipe = load_pipeline(request.param, "t2v")
    cog = request.param == "tiny-cogvideox"
    clean = modifiers.fingerprint(pipe)
    base = run(pipe, cog)
    cal = sc.StepCache(sc.StepCacheChoice("magcache", 0.06), STEPS, calibrate=True)
    cal.apply(pipe)
    run(pipe, cog, cal.calibration_callback())
    cal.remove(pipe)
    assert len(cal.recorded) == STEPS
    return pipe, cog, base, clean, cal.recorded


def usable(cog: bool) -> list[str]:
    from configs.registry import get_model_spec

    ok = sc.support(get_model_spec("tiny-cogvideox" if cog else "tiny-wan"), "t2v")
    return [n for n in sc.STEP_CACHES[1:] if ok[n] is None]


# Settings that skip nothing. FasterCache has none: its unconditional-branch skip (4 steps in 5) does not
# follow the attention interval, so it is checked for skipping and for removal only.
NEUTRAL = {"first-block": 0.0, "magcache": 0.0, "taylorseer": 1, "pab": 1}


def test_parse_and_support():
    from configs.registry import get_model_spec

    assert sc.parse_step_cache("first-block:0.2") == ("first-block", 0.2)
    assert sc.parse_step_cache("pab") == ("pab", None)
    for bad in ("fast", "pab:0.5", "first-block:x", "off:1"):
        with pytest.raises(ValueError, match="step cache"):
            sc.parse_step_cache(bad)
    wan, cog, moe = (get_model_spec(m) for m in ("tiny-wan", "tiny-cogvideox", "tiny-wan-moe"))
    assert all(r for n, r in sc.support(wan, "v2v").items() if n != "off")
    assert sc.support(wan, "t2v")["pab"] and sc.support(cog, "v2v")["pab"] is None
    # what the model's own transformer allows: tiny CogVideoX has one block, tiny-wan-moe two experts
    assert "2 or more blocks" in sc.support(cog, "t2v")["first-block"]
    assert "two experts" in sc.support(moe, "t2v")["magcache"] and sc.support(wan, "t2v")["magcache"] is None
    assert sc.support(get_model_spec("THUDM/CogVideoX-5b"), "t2v")["first-block"] is None


@pytest.mark.parametrize("rung", ["none", "group", "sequential"])
def test_each_cache_skips_counts_and_neutral_settings_and_removal_give_the_base(model, rung):
    from vram_utils import apply_offload_strategy, remove_all_offload

    pipe, cog, base, clean, ratios = model
    for name in usable(cog) if rung == "none" else ["taylorseer"]:  # every cache once, the rungs with one
        m = cache(name, ratios=ratios)
        m.apply(pipe)
        apply_offload_strategy(pipe, rung, device="cpu")  # the modifiers' order: offload outside the cache
        out = run(pipe, cog)
        st = m.stats()
        assert 0 < st["blocks_computed"] < st["blocks_total"], (name, st)
        # independent count: every unit is called once per transformer call (Wan: 2 per step, cond + uncond)
        assert st["blocks_total"] == len(sc.units(pipe.transformer, name)) * STEPS * (1 if cog else 2)
        assert not torch.equal(out, base)
        remove_all_offload(pipe)
        m.remove(pipe)
        if name in NEUTRAL:
            neutral = cache(name, NEUTRAL[name], ratios)
            neutral.apply(pipe)
            apply_offload_strategy(pipe, rung, device="cpu")
            assert torch.equal(run(pipe, cog), base), name
            remove_all_offload(pipe)
            neutral.remove(pipe)
        assert modifiers.fingerprint(pipe) == clean, name  # every hook and counter came off
        assert torch.equal(run(pipe, cog), base), name


def test_first_block_counter_matches_the_hooks_own_decisions(model):
    pipe, cog, base, clean, _ = model
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    if cog:  # tiny CogVideoX has one block: first-block caching is refused with a reason, not run
        with pytest.raises(sc.StepCacheError, match="block"):
            cache("first-block").apply(pipe)
        assert modifiers.fingerprint(pipe) == clean
        return
    m = cache("first-block")
    m.apply(pipe)
    head = pipe.transformer.blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
    decisions = []
    original = head._should_compute_remaining_blocks
    head._should_compute_remaining_blocks = lambda r: decisions.append(original(r)) or decisions[-1]
    run(pipe, cog)
    rest = len(pipe.transformer.blocks) - 1
    assert m.stats()["blocks_computed"] == len(decisions) + rest * sum(decisions)
    m.remove(pipe)
    assert modifiers.fingerprint(pipe) == clean


def test_a_lora_and_a_cache_compose_and_removal_restores(model, tmp_path):
    from lora_files import make_lora

    from engine import lora

    pipe, cog, base, clean, _ = model
    path = make_lora(pipe.transformer, tmp_path / "l.safetensors", seed=1)
    active = (lora.ActiveLora(lora.LoraFile("l", path, lora.read_signature(path), adapter="l"), (1.0,)),)
    adapters = lora.Loras(active)
    modifiers.apply_all(pipe, [adapters])
    with_lora = run(pipe, cog)
    name = "taylorseer"  # a fixed schedule: skips whatever the weights
    skipping = cache(name)
    modifiers.apply_all(pipe, [skipping])  # the runner's order: loras, then the cache
    assert not torch.equal(run(pipe, cog), with_lora) and skipping.stats()["skipped_fraction"] > 0
    modifiers.remove_all(pipe, [skipping])
    neutral = cache(name, NEUTRAL[name])
    modifiers.apply_all(pipe, [neutral])
    assert torch.equal(run(pipe, cog), with_lora)
    modifiers.remove_all(pipe, [neutral])
    assert torch.equal(run(pipe, cog), with_lora)
    modifiers.remove_all(pipe, [adapters])
    assert modifiers.fingerprint(pipe) == clean
    assert torch.equal(run(pipe, cog), base)


def test_a_cache_left_on_is_listed_as_a_leftover(model):
    """The check is real: a modifier that is not removed shows up, naming the module and the hook."""
    pipe, cog, base, clean, _ = model
    m = cache("taylorseer")
    m.apply(pipe)
    states = modifiers.CleanStates(clean)
    left = states.leftovers(pipe, "tiny")
    assert any(sc._COUNTER in line for line in left), left
    m.remove(pipe)
    assert states.leftovers(pipe, "tiny") == []


def test_the_planner_counts_what_each_cache_keeps_in_the_denoise_stage():
    from configs.schema import GenerationRequest
    from configs.registry import get_model_spec
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


def test_plan_and_run_resolve_the_step_cache_once():
    """The fast preset's TaylorSeer where it applies; left off, with the reason, where it does not (Wan V2V), and
    then the plan counts no cache memory either: the plan counts what the run applies."""
    from configs.schema import GenerationRequest
    from engine.planning import plan_run
    from engine.resolve import resolve
    from vram_utils.estimate import workload_for

    t2v = resolve(GenerationRequest(model="Wan-AI/Wan2.1-T2V-14B-Diffusers", task="t2v", prompt="a", preset="fast"),
                  check_files=False)
    assert t2v.request.step_cache == "taylorseer" and workload_for(t2v.request, t2v.spec).step_cache == "taylorseer"
    v2v = resolve(GenerationRequest(model="Wan-AI/Wan2.1-T2V-14B-Diffusers", task="v2v", prompt="a", preset="fast"),
                  check_files=False)
    assert v2v.request.step_cache == "off" and v2v.step_cache.note.startswith("the fast preset's step cache")
    assert workload_for(v2v.request, v2v.spec).step_cache == "off"
    plan = plan_run(v2v)
    assert not any("GiB counted in the denoise stage" in r for r in plan.reasons)
    assert any("left off here" in r for r in plan.reasons)
    assert any("GiB counted in the denoise stage" in r for r in plan_run(t2v).reasons)
