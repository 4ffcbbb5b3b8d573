"""Two-expert models (Wan 2.2 A14B) at run time, on tiny-wan-moe: the experts, the switch, the second guidance,
one expert on the device under model offload, one expert in RAM, the text encoder first."""
from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch

from configs.schema import GenerationRequest, RequestError
from configs.registry import load_registry
from configs.validate import resolve_request

MOE = "tiny-wan-moe"
# tiny-wan-moe's scheduler at 4 steps: timesteps 999, 900, 750, 500; the boundary is 0.875 * 1000 = 875, so
# steps 0-1 are the high-noise expert's and step 2 is the first low-noise step.
SWITCH_AT_4_STEPS = 2


def moe_request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        model=MOE, task="t2v", prompt="a cat walks", frames=9, height=32, width=32, steps=4, seed=3,
        guidance=5.0, offload="none",
    )
    return base.replace(**changes)


def force_plan(runner, **flags) -> None:
    """Every plan this runner makes gets these flags (as the planner would set them for a short machine)."""
    plan = runner.plan
    runner.plan = lambda req, device=None: dataclasses.replace(plan(req, device), **flags)


def latents_of(result) -> torch.Tensor:
    return torch.load(result.latents_path, weights_only=False)["latents"]


def cached_pipe(runner, model: str, task: str = "t2v"):
    """The cached pipeline as it is (PipelineCache.get would load again what a run freed)."""
    entry = runner.cache._entries.get((model, task, "none"))
    return None if entry is None else entry.pipe


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- the tiny two-expert model


def test_tiny_wan_moe_has_two_different_experts_and_the_wan_22_i2v_layout(tiny_models):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    folder = tiny_models[MOE]
    t2v = WanPipeline.from_pretrained(str(folder / "t2v"))
    i2v = WanImageToVideoPipeline.from_pretrained(str(folder / "i2v"))
    wan = WanPipeline.from_pretrained(str(tiny_models["tiny-wan"] / "t2v"))
    assert t2v.config.boundary_ratio == i2v.config.boundary_ratio == 0.875
    assert not params_equal(t2v.transformer, t2v.transformer_2)  # high- and low-noise experts differ
    assert not params_equal(i2v.transformer, i2v.transformer_2)
    # Wan 2.2 I2V A14B: no CLIP image encoder; the image enters as VAE latents (16 noise + 16 image + 4 mask)
    assert i2v.image_encoder is None and i2v.transformer.config.image_dim is None
    assert i2v.transformer.config.in_channels == i2v.transformer_2.config.in_channels == 36
    # VAE and text encoder: the same weights as tiny-wan's, and the same across the two tasks
    assert params_equal(t2v.vae, wan.vae) and params_equal(t2v.text_encoder, wan.text_encoder)
    assert params_equal(t2v.vae, i2v.vae) and params_equal(t2v.text_encoder, i2v.text_encoder)
    # the registry's counts are the built models'
    spec = load_registry()[MOE]
    assert spec.experts == 2 and spec.boundary_ratio == 0.875
    assert spec.params == {
        "transformer": n_params(t2v.transformer), "transformer_2": n_params(t2v.transformer_2),
        "vae": n_params(t2v.vae), "text_encoder": n_params(t2v.text_encoder),
    } == {"transformer": 28_328, "transformer_2": 28_328, "vae": 13_861, "text_encoder": 21_344}
    assert n_params(i2v.transformer) == n_params(i2v.transformer_2) == 30_248


def test_cache_shares_vae_and_text_encoder_across_the_tasks_and_keeps_both_experts(runner):
    t2v = runner.cache.get(MOE, "t2v")
    i2v = runner.cache.get(MOE, "i2v")
    assert t2v.vae is i2v.vae and t2v.text_encoder is i2v.text_encoder
    assert t2v.transformer is not None and t2v.transformer_2 is not None
    assert i2v.transformer_2 is not t2v.transformer_2  # other weights (in_channels 36)


def test_int8_quantizes_both_experts_and_an_expert_loaded_again(runner):
    import quant

    pipe = runner.cache.get(MOE, "t2v", "int8")
    for name in ("transformer", "transformer_2"):
        result = quant.last_result(getattr(pipe, name))
        assert result is not None and result.applied == "int8" and result.bytes_after < result.bytes_before, name
    # one expert in RAM frees the high-noise expert; the next get loads it again, quantized again
    runner.cache.get(MOE, "t2v", "int8", without=("transformer",))
    assert pipe.transformer is None
    pipe = runner.cache.get(MOE, "t2v", "int8")
    assert quant.last_result(pipe.transformer).applied == "int8"


# --------------------------------------------------------------------------- the request


def test_guidance_2_defaults_to_guidance_and_is_checked():
    assert resolve_request(moe_request()).guidance_2 == 5.0
    assert resolve_request(moe_request(guidance_2=2)).guidance_2 == 2.0
    with pytest.raises(RequestError, match=r"guidance_2=101.0 is not allowed; use a number from 0 to 100"):
        resolve_request(moe_request(guidance_2=101.0))
    with pytest.raises(RequestError, match=r"guidance_2=3.0 is not allowed for tiny-wan t2v: it runs one transformer"):
        resolve_request(moe_request(model="tiny-wan", guidance_2=3.0))
    assert resolve_request(moe_request(model="tiny-wan")).guidance_2 is None


# --------------------------------------------------------------------------- a run


def test_progress_names_the_expert_and_the_sidecar_records_the_switch(runner):
    events = []
    result = runner.generate(moe_request(guidance_2=3.0), on_progress=events.append)
    steps = [e.message for e in events if e.stage == "denoising" and e.step]
    assert steps == [
        "denoising step 1/4 · high-noise expert", "denoising step 2/4 · high-noise expert",
        "denoising step 3/4 · low-noise expert", "denoising step 4/4 · low-noise expert",
    ]
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["experts"] == {
        "boundary_ratio": 0.875, "switch_step": SWITCH_AT_4_STEPS, "guidance": 5.0, "guidance_2": 3.0,
        "experts_in_ram": 2,
    }
    assert sidecar["request"]["guidance_2"] == 3.0
    # the second guidance reaches the low-noise steps: another value changes the latents, the same seed does not
    again = runner.generate(moe_request(guidance_2=3.0))
    other = runner.generate(moe_request(guidance_2=1.0))
    assert torch.equal(latents_of(result), latents_of(again))
    assert (latents_of(result) - latents_of(other)).abs().max().item() > 1e-3


def test_one_transformer_models_name_no_expert(runner):
    events = []
    result = runner.generate(moe_request(model="tiny-wan", steps=2), on_progress=events.append)
    assert [e.message for e in events if e.stage == "denoising" and e.step] == [
        "denoising step 1/2", "denoising step 2/2"]
    assert json.loads(result.sidecar_path.read_text())["experts"] is None


# --------------------------------------------------------------------------- model offload: one expert on the device


class _TorchWhereCpuIsNotHome:
    """accelerate.hooks' `torch` for the measurement below: `torch.device("cpu")` equals no parameter's device.

    On a CPU-only machine model offload's execution device is the CPU, so accelerate skips offloading the
    previous module ("already on CPU") and nothing ever moves. With this stand-in accelerate's own pre-forward
    takes the branch it takes on a GPU (offload the previous component in the chain), and the hooks' own calls
    say which module is on the execution device."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return object() if args == ("cpu",) and not kwargs else torch.device(*args, **kwargs)


def test_model_offload_keeps_at_most_one_expert_on_the_execution_device(runner, monkeypatch):
    import accelerate.hooks as hooks

    onloaded: set[int] = set()  # id() of the modules accelerate's hooks have put on the execution device
    original_pre_forward, original_init_hook = hooks.CpuOffload.pre_forward, hooks.CpuOffload.init_hook

    def pre_forward(self, module, *args, **kwargs):
        out = original_pre_forward(self, module, *args, **kwargs)
        onloaded.add(id(module))
        return out

    def init_hook(self, module):  # accelerate's offload: back to the CPU
        onloaded.discard(id(module))
        return original_init_hook(self, module)

    monkeypatch.setattr(hooks, "torch", _TorchWhereCpuIsNotHome())
    monkeypatch.setattr(hooks.CpuOffload, "pre_forward", pre_forward)
    monkeypatch.setattr(hooks.CpuOffload, "init_hook", init_hook)
    force_plan(runner, offload="model")
    per_step = []

    def after_step(stage: str, index: int) -> None:  # the runner's test hook, after each denoising step
        if stage == "denoising":
            per_step.append(_experts_on_device(runner, onloaded))

    runner.fault_hook = after_step
    runner.generate(moe_request(steps=4))
    # after each step: exactly the expert that ran is on the execution device, never both
    assert per_step == [{"transformer"}, {"transformer"}, {"transformer_2"}, {"transformer_2"}]


def _experts_on_device(runner, onloaded: set[int]) -> set[str]:
    pipe = cached_pipe(runner, MOE)
    return {name for name in ("transformer", "transformer_2") if id(getattr(pipe, name)) in onloaded}


# --------------------------------------------------------------------------- one expert in RAM


def test_one_expert_in_ram_frees_the_first_before_the_second_loads_and_gives_the_same_video(runner, monkeypatch):
    import engine.loaders as loaders

    normal = runner.generate(moe_request())
    runner.cache.unload_all()
    force_plan(runner, experts_in_ram=1)
    loads, first = [], {}
    original_load = loaders.load_component

    def load_component(model, task, component, dtype=None):
        if component == "transformer_2":  # the moment the low-noise expert starts loading
            loads.append({
                "first_expert_params_alive": sum(w() is not None for w in first["params"]),
                "pipeline_transformer": cached_pipe(runner, MOE).transformer,
            })
        return original_load(model, task, component, dtype)

    monkeypatch.setattr(loaders, "load_component", load_component)
    seen_loaded = []

    def on_progress(event):
        pipe = cached_pipe(runner, MOE)
        if pipe is not None and pipe.transformer is not None and not first:
            first["params"] = [weakref.ref(p) for p in pipe.transformer.parameters()]
            first["bytes"] = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        if event.message.startswith("denoising step"):
            seen_loaded.append((pipe.transformer is not None, pipe.transformer_2 is not None))

    one = runner.generate(moe_request(), on_progress=on_progress)
    assert first["bytes"] == 28_328 * 4  # float32
    # when the low-noise expert started loading, nothing of the high-noise one was left
    assert loads == [{"first_expert_params_alive": 0, "pipeline_transformer": None}]
    # never both experts in the pipeline: the high-noise one for steps 1-2, the low-noise one after the switch
    assert seen_loaded == [(True, False), (True, False), (False, True), (False, True)]
    assert torch.equal(latents_of(one), latents_of(normal))  # identical weights and order: exactly equal
    assert json.loads(one.sidecar_path.read_text())["experts"]["experts_in_ram"] == 1


def test_after_one_expert_in_ram_the_next_normal_run_reloads_what_was_freed(runner):
    normal = runner.generate(moe_request())
    force_plan(runner, experts_in_ram=1)
    runner.generate(moe_request())
    pipe = cached_pipe(runner, MOE)
    assert pipe.transformer is None and pipe.transformer_2 is not None  # one expert held between runs
    del runner.plan  # the runner's own planner again
    again = runner.generate(moe_request())
    pipe = cached_pipe(runner, MOE)
    assert pipe.transformer is not None and pipe.transformer_2 is not None
    assert torch.equal(latents_of(again), latents_of(normal))


def test_one_expert_in_ram_under_model_offload_hooks_the_new_expert_and_gives_the_same_video(runner):
    """The switch re-applies the offload rung, so the low-noise expert loaded mid-run joins model offload's chain."""
    force_plan(runner, offload="model")
    normal = runner.generate(moe_request(steps=4))
    force_plan(runner, experts_in_ram=1)  # on top of offload="model"
    seen = []

    def look(stage, i):  # during the decode, the modifiers are still on (they come off when the run ends)
        if stage == "decoding" and not seen:
            pipe = cached_pipe(runner, MOE)
            seen.append({n for n, m in pipe.components.items() if getattr(m, "_hf_hook", None) is not None})

    runner.fault_hook = look
    one = runner.generate(moe_request(steps=4))
    assert seen[0] == {"text_encoder", "transformer_2", "vae"}  # the freed high-noise expert is out of the chain
    assert runner.last_leftovers == []  # and every hook came off after the run
    # Tolerance 0: the same weights and the same operations in the same order on the same device.
    assert torch.equal(latents_of(one), latents_of(normal))


# --------------------------------------------------------------------------- the text encoder first


@pytest.mark.parametrize("model", ["tiny-wan", MOE])
def test_text_encoder_first_is_freed_before_the_transformer_loads_and_gives_the_same_video(runner, monkeypatch, model):
    import diffusers

    normal = runner.generate(moe_request(model=model, steps=2))
    runner.cache.unload_all()
    force_plan(runner, release_text_encoder=True)
    text_encoder = {}
    original = diffusers.WanTransformer3DModel.from_pretrained.__func__
    alive_at_transformer_load = []

    def from_pretrained(cls, *args, **kwargs):
        if "ref" in text_encoder:
            alive_at_transformer_load.append(sum(w() is not None for w in text_encoder["ref"]))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.WanTransformer3DModel, "from_pretrained", classmethod(from_pretrained))

    def on_progress(event):
        pipe = cached_pipe(runner, model)
        if event.stage == "encoding" and pipe is not None and "ref" not in text_encoder:
            text_encoder["transformer_while_encoding"] = pipe.transformer
            text_encoder["ref"] = [weakref.ref(p) for p in pipe.text_encoder.parameters()]

    first = runner.generate(moe_request(model=model, steps=2), on_progress=on_progress)
    experts = 2 if model == MOE else 1
    assert text_encoder["transformer_while_encoding"] is None  # the pipeline that encodes has no transformer yet
    assert len(text_encoder["ref"]) == 22  # tiny UMT5's 22 parameter tensors, watched from when it encodes
    assert alive_at_transformer_load == [0] * experts  # every transformer loaded after the encoder was gone
    assert cached_pipe(runner, model).text_encoder is None
    assert torch.equal(latents_of(first), latents_of(normal))
    # a later run with the text encoder kept loads it again, and gives the same video
    del runner.plan  # the runner's own planner again
    again = runner.generate(moe_request(model=model, steps=2))
    assert cached_pipe(runner, model).text_encoder is not None
    assert torch.equal(latents_of(again), latents_of(normal))


# --------------------------------------------------------------------------- i2v


def test_i2v_with_two_experts_runs_and_switches(runner, sample_image):
    events = []
    result = runner.generate(moe_request(task="i2v", image=str(sample_image)), on_progress=events.append)
    assert result.frames == 9
    assert json.loads(result.sidecar_path.read_text())["experts"]["switch_step"] == SWITCH_AT_4_STEPS
    assert "low-noise expert" in [e.message for e in events if e.stage == "denoising" and e.step][-1]
