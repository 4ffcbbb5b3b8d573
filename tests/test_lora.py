"""LoRAs on the tiny models: the formats people download, strengths, two at once, unfitting and broken files,
every offload rung, memory over many swaps, per-expert strengths, quantized bases, presets, the sidecar, the
planner. Outputs are compared with real values: bitwise where the computation is the same, else within a bound
that says why."""
from __future__ import annotations

import json

import psutil
import pytest
import torch

from configs.schema import GenerationRequest, LoraChoice, RequestError
from configs.registry import get_model_spec
from configs.validate import resolve_request
from lora_files import forward, make_lora
from engine import lora
from engine.lora import LoraError

WAN, COG, MOE = "tiny-wan", "tiny-cogvideox", "tiny-wan-moe"
EPS = torch.finfo(torch.float32).eps


def request(model: str = WAN, **changes) -> GenerationRequest:
    base = GenerationRequest(model=model, task="t2v", prompt="a cat walks", frames=9 if model == COG else 5,
                             height=32, width=32, steps=2,
                             seed=1, guidance=5.0, offload="none")
    return base.replace(**changes)


def latents_of(result) -> torch.Tensor:
    return torch.load(result.latents_path, weights_only=False)["latents"]


_ON: dict[int, lora.Loras] = {}


def set_loras(pipe, acts: tuple) -> None:
    """The pipeline's transformers hold exactly `acts`: the modifier of the set before comes off, a new one goes on
    (what the runner does around each run)."""
    old = _ON.pop(id(pipe), None)
    if old is not None:
        old.remove(pipe)
    if acts:
        _ON[id(pipe)] = lora.Loras(acts)
        _ON[id(pipe)].apply(pipe)


def active(*choices: LoraChoice, model: str = WAN) -> tuple:
    return lora.resolve_loras(tuple(choices), get_model_spec(model), "t2v")


def lora_params(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def other_wan(ffn_dim: int = 32, head_dim: int = 12, in_channels: int = 16, layers: int = 2):
    """A Wan transformer tiny-wan's LoRAs do not fit (another width, or the same width and another FFN)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(5)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                 in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=ffn_dim, num_layers=layers, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """One runner (a cache of the tiny pipelines), a LoRA folder with files in every format, and base outputs
    taken before any LoRA was loaded. Tests leave the cached pipelines without adapters."""
    from engine.cache import PipelineCache
    from engine.runner import Runner

    folder = tmp_path_factory.mktemp("loras")
    mp = pytest.MonkeyPatch()
    mp.setenv("FITVIDEO_LORAS_DIR", str(folder))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread is much faster
    runner = Runner(PipelineCache(max_size=6), outputs_dir=tmp_path_factory.mktemp("outputs"))
    wan, cog = runner.cache.get(WAN, "t2v"), runner.cache.get(COG, "t2v")
    for fmt in ("peft", "wan", "kohya"):
        make_lora(wan.transformer, folder / f"wan_{fmt}.safetensors", fmt=fmt, seed=1)
    make_lora(wan.transformer, folder / "wan_b.safetensors", seed=2, scale=0.3)
    make_lora(cog.transformer, folder / "cog.safetensors", seed=3)
    make_lora(other_wan(head_dim=8), folder / "wan_narrow.safetensors", seed=4)  # width 16
    make_lora(other_wan(ffn_dim=48), folder / "wan_wide_ffn.safetensors", seed=4)  # width 24, other FFN
    (folder / "corrupt.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()
                                                               .manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    base = {"wan": forward(wan.transformer), "cog": forward(cog.transformer)}
    yield {"runner": runner, "folder": folder, "wan": wan, "cog": cog, "base": base}
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def base_latents(env):
    return latents_of(env["runner"].generate(request()))


# --------------------------------------------------------------------------- formats, strengths, unloading


def test_peft_wan_and_kohya_loras_change_tiny_wan_and_strength_0_or_unloading_gives_the_base_bitwise(env):
    pipe, base = env["wan"], env["base"]["wan"]
    outs = {}
    for fmt in ("peft", "wan", "kohya"):
        set_loras(pipe, active(LoraChoice(f"wan_{fmt}", 1.0)))
        assert len(lora_params(pipe.transformer)) == 2 * 10 * 2  # 2 blocks x 10 layers x (A, B)
        outs[fmt] = forward(pipe.transformer)
        set_loras(pipe, active(LoraChoice(f"wan_{fmt}", 0.0)))  # strength 0: the adapter goes
        assert torch.equal(forward(pipe.transformer), base), fmt
        set_loras(pipe, active(LoraChoice(f"wan_{fmt}", 0.5)))
        half = forward(pipe.transformer)
        set_loras(pipe, ())
        assert torch.equal(forward(pipe.transformer), base) and not lora_params(pipe.transformer), fmt
        assert (outs[fmt] - base).abs().max() > 0.1 and (half - base).abs().max() > 0.01, fmt
        assert (outs[fmt] - half).abs().max() > 0.01, fmt  # the strength reaches the layers
    # the three files hold the same numbers in three layouts (kohya alpha = rank: scale 1): the same model
    torch.testing.assert_close(outs["wan"], outs["peft"], rtol=0, atol=0)
    torch.testing.assert_close(outs["kohya"], outs["peft"], rtol=0, atol=0)


def test_a_peft_lora_changes_tiny_cogvideox_and_unloading_gives_the_base_bitwise(env):
    pipe, base = env["cog"], env["base"]["cog"]
    set_loras(pipe, active(LoraChoice("cog", 1.0), model=COG))
    assert len(lora_params(pipe.transformer)) == 1 * 4 * 2
    changed = forward(pipe.transformer)
    set_loras(pipe, ())
    assert (changed - base).abs().max() > 0.01
    assert torch.equal(forward(pipe.transformer), base) and not lora_params(pipe.transformer)


def test_a_run_with_a_lora_changes_the_latents_strength_0_and_the_next_run_without_give_the_base(env, base_latents):
    runner = env["runner"]
    with_lora = runner.generate(request(loras=(LoraChoice("wan_kohya", 1.0),)))
    off = runner.generate(request(loras=(LoraChoice("wan_kohya", 0.0),)))
    after = runner.generate(request())
    assert (latents_of(with_lora) - base_latents).abs().max() > 1e-3
    assert torch.equal(latents_of(off), base_latents) and torch.equal(latents_of(after), base_latents)
    assert not lora_params(env["wan"].transformer)


# --------------------------------------------------------------------------- two at once


def test_two_loras_add_their_deltas_on_a_linear_layer(env):
    """(W + s1 B1 A1 + s2 B2 A2) x against W x + s1 B1 A1 x + s2 B2 A2 x from the files' own numbers.

    Both are float32 sums of products in another order: each output is a dot product of in_features (24) base
    terms plus 2 x rank (8) adapter terms, and reordering a float32 sum of n terms moves it by up to
    n * eps * sum|terms|. The bound is that, per element, from the absolute values; a wrong scale (alpha/rank,
    strength) or a dropped adapter is off by the delta itself (O(1) here)."""
    pipe, s1, s2 = env["wan"], 0.7, -0.3
    acts = active(LoraChoice("wan_peft", s1), LoraChoice("wan_b", s2))
    set_loras(pipe, acts)
    try:
        layer = pipe.transformer.blocks[1].attn1.to_q
        x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = layer(x)
    finally:
        set_loras(pipe, ())
    w, b = layer.weight, layer.bias  # the base layer again, after unloading
    key = "transformer.blocks.1.attn1.to_q"
    terms, size = [x @ w.T + b], [x.abs() @ w.abs().T + b.abs()]
    for a, s in zip(acts, (s1, s2)):
        sd = lora.converted_state_dict(a.file.path, "wan")
        down, up = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
        terms.append(s * (x @ down.T) @ up.T)
        size.append(abs(s) * (x.abs() @ down.abs().T) @ up.abs().T)
        assert (terms[-1]).abs().max() > 0.1  # each delta is large against the bound
    n = layer.in_features + 2 * acts[0].file.signature.rank
    bound = n * EPS * sum(size)
    diff = (got - sum(terms)).abs()
    assert (diff <= bound).all(), f"max diff {diff.max():.3g}, bound {bound.max():.3g}"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, model, message", [
    ("cog", WAN, r"LoRA 'cog' does not fit Tiny Wan .*it fits Tiny CogVideoX"),
    ("wan_peft", COG, r"LoRA 'wan_peft' does not fit Tiny CogVideoX .*it fits Tiny Wan .*Tiny Wan MoE"),
    ("wan_narrow", WAN, r"LoRA 'wan_narrow' does not fit Tiny Wan .*width 16 .*no registry model has its shape"),
    ("corrupt", WAN, r"LoRA file .*corrupt\.safetensors cannot be read as safetensors"),
    ("nowhere", WAN, r"LoRA 'nowhere' not found: not in the LoRA folder .*it has: .*wan_peft"),
    ("wan_wide_ffn", WAN, r"LoRA 'wan_wide_ffn' could not be loaded into WanTransformer3DModel"),
])
def test_an_unusable_lora_is_refused_by_name_and_the_cached_pipeline_still_gives_the_base(env, base_latents, name,
                                                                                        model, message):
    runner = env["runner"]
    good = (LoraChoice("wan_b", 1.0),) if model == WAN else ()
    with pytest.raises(LoraError, match=message) as info:
        runner.generate(request(model, loras=(*good, LoraChoice(name, 1.0))))
    assert isinstance(info.value, RequestError)
    if model == WAN:  # the same cached pipeline, no adapter left (the good one is unloaded by the next run)
        assert torch.equal(latents_of(runner.generate(request())), base_latents)
        assert not lora_params(env["wan"].transformer)
    else:
        assert torch.equal(forward(env["cog"].transformer), env["base"]["cog"])


# --------------------------------------------------------------------------- offload rungs


def _group_hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook("group_offloading") if registry is not None else None


def assert_adapters_move_with_the_rung(transformer: torch.nn.Module, rung: str) -> None:
    """Every lora_A / lora_B parameter is inside what the rung's hooks move: the whole transformer under model
    offload (accelerate's hook on it), a block's group (block level) or its own leaf's group (leaf level)."""
    params = lora_params(transformer)
    assert params, rung
    if rung == "model":
        assert hasattr(transformer, "_hf_hook")
        assert set(map(id, params.values())) <= set(map(id, transformer.parameters()))
        return
    modules = dict(transformer.named_modules())
    for name, param in params.items():
        owner = name.rsplit(".", 1)[0]  # blocks.0.attn1.to_q.lora_A.<adapter>: the adapter's own Linear
        if rung == "sequential":
            hook = _group_hook(modules[owner])  # a leaf: a group of its own
            assert hook is not None, name
        else:
            block = ".".join(name.split(".")[:2])  # blocks.N
            hook = _group_hook(modules[block])
            assert hook is not None and name.startswith("blocks."), name
        moved = {id(p) for m in hook.group.modules for p in m.parameters()} | set(map(id, hook.group.parameters))
        assert id(param) in moved, f"{rung}: {name} is in no group its hook moves"


def test_every_offload_rung_on_the_cpu_gives_the_no_offload_latents_with_a_lora(env, base_latents):
    """Group and leaf-level offload onload to the CPU, where the tensors already are; model offload runs under
    accelerate's hooks. The CPU kernels may then add a dot product's terms in another order (1.9e-6 for model
    offload and 5.7e-6 for group offload on an AVX2-only EPYC, 0 on other CPUs), which moves a float32 result by up
    to n * eps * |result| for n terms (256, tiny-wan's largest Linear fan-in). While the run decodes, the adapters
    move with the rung's groups; after it they are gone (the modifiers come off)."""
    runner, pipe = env["runner"], env["wan"]
    loras = (LoraChoice("wan_peft", 1.0), LoraChoice("wan_b", 0.5))
    reference = latents_of(runner.generate(request(loras=loras)))
    assert (reference - base_latents).abs().max() > 1e-3
    atol = 256 * EPS * reference.abs().max().item()
    seen = []
    runner.fault_hook = lambda stage, i: seen.append(len(lora_params(pipe.transformer))) if stage == "decoding" \
        and i == 1 else None
    try:
        for rung in ("model", "group", "sequential"):
            result = runner.generate(request(offload=rung, loras=loras))
            assert result.plan.offload == rung and seen[-1] == 2 * 40
            diff = (latents_of(result) - reference).abs().max().item()
            assert diff <= atol, f"{rung}: latents differ by {diff:.3g}"
            assert not lora_params(pipe.transformer) and runner.last_leftovers == []
        runner.fault_hook = lambda stage, i: assert_adapters_move_with_the_rung(pipe.transformer, "sequential") \
            if stage == "decoding" and i == 1 else None
        swapped = runner.generate(request(offload="sequential", loras=(LoraChoice("wan_b", 1.0),)))
        assert (latents_of(swapped) - reference).abs().max() > 1e-3
        # the next run without a LoRA gives the base, on any rung
        runner.fault_hook = None
        result = runner.generate(request(offload="sequential"))
        assert (latents_of(result) - base_latents).abs().max().item() <= atol and not lora_params(pipe.transformer)
    finally:
        runner.fault_hook = None


# --------------------------------------------------------------------------- memory


def test_twenty_load_strength_swap_unload_cycles_keep_rss_and_parameters_flat(env, tmp_path):
    """A transformer wide enough that one cycle's adapters (2 x 1.6 MiB) kept behind would show over 19 cycles
    (the second bound); a WanPipeline holding only it is the cached pipeline the Loras modifier sees. One block: the
    cost of a load is per adapted layer, the size is rank x width."""
    from diffusers import WanPipeline

    from vram_utils.sizes import release_memory

    transformer = other_wan(ffn_dim=1024, head_dim=128, in_channels=4, layers=1)  # width 256
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=None)
    files = [lora.LoraFile(n, p, lora.read_signature(p), adapter=n) for n, p in (
        ("big_a", make_lora(transformer, tmp_path / "big_a.safetensors", rank=64, seed=1, scale=0.05)),
        ("big_b", make_lora(transformer, tmp_path / "big_b.safetensors", rank=64, seed=2, scale=0.05)))]
    lora_bytes = files[0].signature.params * 4
    assert lora_bytes > 1.5 * 2**20
    base, count = forward(transformer), n_params(transformer)
    rss = []
    for cycle in range(20):
        for a, s in ((files[0], 1.0), (files[0], 0.5), (files[1], 1.0)):
            set_loras(pipe, (lora.ActiveLora(a, (s,)),))
            assert n_params(transformer) == count + a.signature.params
            assert not torch.equal(forward(transformer), base)
        set_loras(pipe, ())
        assert n_params(transformer) == count and torch.equal(forward(transformer), base)
        if cycle in (0, 19):  # a full collection costs more than a cycle: only where RSS is read
            release_memory()
            rss.append(psutil.Process().memory_info().rss)
    assert rss[-1] <= 1.02 * rss[0], f"RSS {rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB over 20 cycles"
    assert rss[-1] - rss[0] < 19 * lora_bytes, f"RSS grew {(rss[-1] - rss[0]) / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- two experts


def test_a_per_expert_lora_changes_only_its_expert_and_strength_2_needs_two_experts(env):
    pipe = env["runner"].cache.get(MOE, "t2v")
    make_lora(pipe.transformer, env["folder"] / "moe.safetensors", seed=6)
    base = forward(pipe.transformer), forward(pipe.transformer_2)
    for strengths, changed in (((1.0, 0.0), 0), ((0.0, 1.0), 1)):
        set_loras(pipe, active(LoraChoice("moe", *strengths), model=MOE))
        try:
            out = forward(pipe.transformer), forward(pipe.transformer_2)
        finally:
            set_loras(pipe, ())
        assert (out[changed] - base[changed]).abs().max() > 0.1, strengths
        assert torch.equal(out[1 - changed], base[1 - changed]), strengths
        assert not lora_params(pipe.transformer) and not lora_params(pipe.transformer_2)
    assert torch.equal(forward(pipe.transformer), base[0]) and torch.equal(forward(pipe.transformer_2), base[1])
    assert resolve_request(request(MOE, loras=(LoraChoice("moe", 1.0, 0.0),))).loras[0].strength_2 == 0.0
    with pytest.raises(RequestError, match=r"a low-noise strength for LoRA 'wan_peft' is not allowed for tiny-wan "
                                           r"t2v: it runs one transformer"):
        resolve_request(request(loras=(LoraChoice("wan_peft", 1.0, 0.5),)))


# --------------------------------------------------------------------------- quantized bases


@pytest.mark.parametrize("mode", ["int8", "fp8-storage"])
def test_a_lora_on_a_quantized_base_changes_it_and_unloading_gives_the_quantized_base_bitwise(env, mode):
    import quant

    pipe = env["runner"].cache.get(WAN, "t2v", mode)
    assert quant.last_result(pipe.transformer).applied == mode
    base = forward(pipe.transformer)
    set_loras(pipe, active(LoraChoice("wan_peft", 1.0)))
    try:
        adapters = lora_params(pipe.transformer)
        assert adapters and all(p.dtype == torch.float32 for p in adapters.values())  # not the base's storage
        changed = forward(pipe.transformer)
    finally:
        set_loras(pipe, ())
    assert (changed - base).abs().max() > 0.1
    assert torch.equal(forward(pipe.transformer), base) and not lora_params(pipe.transformer)
    assert quant.last_result(pipe.transformer).applied == mode


# --------------------------------------------------------------------------- presets, listing, shift


def test_presets_from_a_json_file_or_the_metadata_listing_by_model_and_a_shift_run_restores_the_scheduler(
        env, base_latents):
    folder, runner, pipe = env["folder"], env["runner"], env["wan"]
    side = make_lora(pipe.transformer, folder / "distill_json.safetensors", seed=7)
    side.with_suffix(".json").write_text(json.dumps({"steps": 4, "guidance": 1.0, "shift": 5.0}))
    meta = make_lora(pipe.transformer, folder / "distill_meta.safetensors", seed=8,
                     metadata={"steps": "4", "guidance_scale": "1.0", "shift": "5.0"})
    assert lora.read_preset(side) == lora.LoraPreset(4, 1.0, 5.0, "distill_json.json")
    assert lora.read_preset(meta) == lora.LoraPreset(4, 1.0, 5.0, "metadata")
    assert lora.read_preset(folder / "wan_peft.safetensors") is None
    preset = lora.lora_file("distill_meta").preset
    assert preset.text("distill_meta") == "4 steps, guidance 1, shift 5, from distill_meta"
    names = {f.name for f in lora.list_loras(WAN)}
    assert {"wan_peft", "wan_wan", "wan_kohya", "wan_b", "distill_json", "distill_meta"} <= names
    assert not names & {"cog", "wan_narrow", "corrupt"}  # wan_wide_ffn has tiny-wan's width and depth: listed
    assert {f.name for f in lora.list_loras(COG)} == {"cog"}
    scheduler, shift = pipe.scheduler, pipe.scheduler.config.flow_shift
    shifted = runner.generate(request(shift=5.0, loras=(LoraChoice("distill_json", 1.0),)))
    assert pipe.scheduler is scheduler and pipe.scheduler.config.flow_shift == shift == 3.0
    unshifted = runner.generate(request(loras=(LoraChoice("distill_json", 1.0),)))
    assert (latents_of(shifted) - latents_of(unshifted)).abs().max() > 1e-3  # the shift reached the sampler
    assert json.loads(shifted.sidecar_path.read_text())["request"]["shift"] == 5.0
    with pytest.raises(RequestError, match=r"shift=5.0 is not allowed for Tiny CogVideoX"):
        resolve_request(request(COG, shift=5.0))


# --------------------------------------------------------------------------- sidecar, parsing, planner


def test_the_sidecar_records_the_loras_and_restores_them_into_a_request(env):
    runner = env["runner"]
    result = runner.generate(request(loras=(LoraChoice("wan_peft", 0.5), LoraChoice("wan_b", -1.0))))
    sidecar = json.loads(result.sidecar_path.read_text())
    size = (env["folder"] / "wan_peft.safetensors").stat().st_size
    assert sidecar["loras"] == [
        {"name": "wan_peft", "file": "wan_peft.safetensors", "bytes": size, "strength": 0.5},
        {"name": "wan_b", "file": "wan_b.safetensors", "bytes": (env["folder"] / "wan_b.safetensors").stat().st_size,
         "strength": -1.0}]
    restored = GenerationRequest.from_dict(sidecar["request"])
    assert restored.loras == (LoraChoice("wan_peft", 0.5), LoraChoice("wan_b", -1.0))
    assert restored == resolve_request(result.request)
    assert LoraChoice.parse("a:0.5") == LoraChoice("a", 0.5)
    assert LoraChoice.parse("C:\\x\\y.safetensors:0.7:0.2") == LoraChoice("C:\\x\\y.safetensors", 0.7, 0.2)
    assert LoraChoice.parse("name") == LoraChoice("name", 1.0, None)
    assert LoraChoice.parse("owner/repo/w.safetensors:-1") == LoraChoice("owner/repo/w.safetensors", -1.0)
    with pytest.raises(RequestError, match="has no name"):
        LoraChoice.parse(":0.5")


def test_the_planner_counts_the_adapters_with_the_transformer_they_sit_in(env):
    runner, pipe = env["runner"], env["wan"]
    spec, acts = get_model_spec(WAN), active(LoraChoice("wan_peft", 1.0))
    count = n_params(pipe.transformer)
    set_loras(pipe, acts)
    added = n_params(pipe.transformer) - count  # what peft really added
    set_loras(pipe, ())
    assert added == acts[0].file.signature.params == 3968
    assert lora.with_lora_params(spec, acts).params == spec.params | {"transformer": spec.params["transformer"] + added}
    plain = runner.plan(resolve_request(request()))
    planned = runner.plan(resolve_request(request(loras=(LoraChoice("wan_peft", 1.0),))))
    reasons = [r for r in planned.reasons if r.startswith("LoRAs:")]
    assert reasons == [r for r in planned.reasons if "LoRA" in r]
    assert reasons[0].startswith("LoRAs: wan_peft x1 (+15.5 KiB")  # 3968 float32 parameters
    assert not any(r.startswith("LoRAs:") for r in plain.reasons)
    assert planned.predicted_peak_host_bytes > plain.predicted_peak_host_bytes
    moe = lora.with_lora_params(get_model_spec(MOE), active(LoraChoice("wan_peft", 1.0, 0.0), model=MOE))
    assert moe.params["transformer"] == get_model_spec(MOE).params["transformer"] + added
    assert moe.params["transformer_2"] == get_model_spec(MOE).params["transformer_2"]


def test_a_hub_lora_not_on_this_machine_offline_says_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FITVIDEO_LORAS_DIR", str(tmp_path))
    with pytest.raises(LoraError, match=r"'lightx2v/Wan-Distill/step4\.safetensors' is not on this machine.*"
                                        r"hf download lightx2v/Wan-Distill step4\.safetensors"):
        lora.find_lora("lightx2v/Wan-Distill/step4.safetensors")
