"""Quantization: real bytes, what gets quantized, outputs that stay close, a cache that quantizes once,
and runs that leave nothing behind (the lessons of seed 001)."""
from __future__ import annotations

import copy
import gc
import json
import logging

import psutil
import pytest
import torch

import quant
from configs.schema import GenerationRequest, RequestError
from engine.cache import PipelineCache
from engine.runner import Runner

MODES = ("none", "int8", "fp8-storage")
INT8_ROW_OVERHEAD = 4 + 1  # torchao Int8Tensor per output row: float32 scale + int8 zero point


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is 10-20x faster than two that
    fight other processes for the cores. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _request(model: str, quant_mode: str = "none", **kw) -> GenerationRequest:
    base = {"model": model, "task": "t2v", "prompt": "a cat walks on the beach", "frames": 9, "height": 32, "width": 32}
    base["steps"] = 2
    base.update(kw)
    return GenerationRequest(quant=quant_mode, **base)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def _transformer_inputs(family: str, module: torch.nn.Module) -> dict:
    """One latent frame-group of 32x32 video for a tiny transformer, in the module's dtype."""
    g = torch.Generator().manual_seed(0)
    dtype = module.dtype
    if family == "cogvideox":
        hidden = torch.randn(1, 3, module.config.in_channels, 4, 4, generator=g)  # (B, F, C, H, W)
        text = torch.randn(1, module.config.max_text_seq_length, module.config.text_embed_dim, generator=g)
    else:
        hidden = torch.randn(1, module.config.in_channels, 3, 4, 4, generator=g)  # (B, C, F, H, W)
        text = torch.randn(1, 8, module.config.text_dim, generator=g)
    return {"hidden_states": hidden.to(dtype), "encoder_hidden_states": text.to(dtype), "timestep": torch.tensor([500])}


def _tiny_transformer(model: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A private copy of the tiny t2v transformer (the cached one must stay unquantized)."""
    from engine.loaders import load_pipeline

    return copy.deepcopy(load_pipeline(model, "t2v").transformer).to(dtype).eval()


def _small_transformer(family: str) -> torch.nn.Module:
    """Same classes as the real models, small but with their proportions: block Linears hold >= 94 % of the
    weights (CogVideoX-2b: 99.4 %, Wan 2.1: 98.4 %). The tiny registry models are 24-32 wide and their
    embeddings, biases and norms are 10-45 % of the weights, so no weight-only scheme can halve them."""
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if family == "cogvideox":
        model = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=64,
            text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=9, max_text_seq_length=16,
        )
    else:
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=64, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=512, num_layers=12, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
    return model.to(torch.bfloat16).eval()


# --------------------------------------------------------------------------- bytes


def test_weight_bytes_counts_int8_storage_not_the_bf16_it_stands_for():
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    assert quant.weight_bytes(layer) == (48 * 64 + 48) * 2
    quant.apply(layer, "int8")
    assert type(layer.weight).__name__ == "Int8Tensor"
    assert layer.weight.dtype == torch.bfloat16  # what numel * element_size would wrongly use
    assert quant.weight_bytes(layer) == 48 * 64 + 48 * INT8_ROW_OVERHEAD + 48 * 2


def test_vram_utils_tensor_bytes_agrees_on_int8_weights():
    """The memory engineer's tensor_bytes must count torchao storage too (the cache and planner use it)."""
    import vram_utils

    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    quant.apply(layer, "int8")
    assert vram_utils.tensor_bytes(layer.weight) == quant.tensor_bytes(layer.weight) == 48 * 64 + 48 * INT8_ROW_OVERHEAD


# Which Linears of the tiny transformers int8 takes: attention and FF in the blocks. Left alone:
# patch/time/condition embedders and proj_out (KEEP_PATTERNS), and CogVideoX's 2-input AdaLN
# Linears (in_features 2 < INT8_MIN_IN_FEATURES: per-row scales would cost more than they save).
TINY_INT8_LAYERS = {
    "tiny-cogvideox": {
        f"transformer_blocks.0.{n}"
        for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
    },
    "tiny-wan": {
        f"blocks.{b}.{n}"
        for b in (0, 1)
        for n in [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
        + ["ffn.net.0.proj", "ffn.net.2"]
    },
}


@pytest.mark.parametrize("model", sorted(TINY_INT8_LAYERS))
def test_int8_quantizes_the_block_linears_of_the_tiny_transformers_and_bytes_are_exact(tiny_models, model):
    module = _tiny_transformer(model)
    shapes = {n: tuple(m.weight.shape) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = quant.weight_bytes(module) - sum(
        o * i * 2 - (o * i + o * INT8_ROW_OVERHEAD) for n, (o, i) in shapes.items() if n in TINY_INT8_LAYERS[model]
    )
    result = quant.apply(module, "int8")
    quantized = {n for n, m in module.named_modules() if type(getattr(m, "weight", None)).__name__ == "Int8Tensor"}
    assert quantized == TINY_INT8_LAYERS[model]
    assert result.layers == len(TINY_INT8_LAYERS[model])
    assert result.bytes_after == quant.weight_bytes(module) == expected
    assert result.bytes_after < result.bytes_before


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
@pytest.mark.parametrize("mode", ["int8", "fp8-storage"])
def test_quantized_transformer_is_at_most_055_of_its_bf16_bytes(family, mode):
    module = _small_transformer(family)
    bf16_bytes = quant.weight_bytes(module)
    params = quant.param_count(module)
    assert bf16_bytes >= 2 * params  # every weight really is bf16 before
    result = quant.apply(module, mode)
    assert result.bytes_before == bf16_bytes
    assert result.bytes_after == quant.weight_bytes(module)
    assert result.bytes_after <= 0.55 * bf16_bytes, f"{mode} {family}: x{result.ratio:.3f}"
    assert result.params == params  # the count of logical weights does not change
    assert result.bytes_per_param == pytest.approx(result.bytes_after / params)


# --------------------------------------------------------------------------- fp8 storage / fallback


# fp8-storage casts the same block Linears and, unlike int8, also CogVideoX's 2-input AdaLN modulation
# Linears (no per-row scale, so small layers cost nothing extra).
TINY_FP8_LAYERS = {
    "tiny-cogvideox": TINY_INT8_LAYERS["tiny-cogvideox"]
    | {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm2.linear"},
    "tiny-wan": TINY_INT8_LAYERS["tiny-wan"],
}
NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
KEPT_TOP_LEVEL = ("patch_embed", "patch_embedding", "time_embedding", "condition_embedder", "norm_out", "proj_out")


@pytest.mark.parametrize("model,family", [("tiny-cogvideox", "cogvideox"), ("tiny-wan", "wan")])
def test_fp8_storage_stores_float8_computes_in_the_loaded_dtype_and_skips_norms_and_embeddings(
    tiny_models, model, family
):
    from diffusers.models.normalization import RMSNorm

    module = _tiny_transformer(model, torch.float32)
    reference = copy.deepcopy(module)
    inputs = _transformer_inputs(family, module)
    result = quant.apply(module, "fp8-storage")
    fp8 = {n for n, p in module.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert fp8 == {f"{layer}.{p}" for layer in TINY_FP8_LAYERS[model] for p in ("weight", "bias")}
    assert result.layers == len(TINY_FP8_LAYERS[model])
    for name, layer in module.named_modules():
        if isinstance(layer, NORMS + (RMSNorm,)) or name.split(".")[0] in KEPT_TOP_LEVEL:
            assert all(p.dtype == torch.float32 for p in layer.parameters()), name
    with torch.inference_mode():
        out = module(**inputs, return_dict=False)[0]
        ref = reference(**inputs, return_dict=False)[0]
    assert out.dtype == torch.float32  # computed in the dtype the model was loaded in
    assert _cosine(out, ref) >= 0.99
    assert not torch.equal(out, ref)
    assert {n for n, p in module.named_parameters() if p.dtype == torch.float8_e4m3fn} == fp8  # stored fp8 again


def test_fp8_falls_back_to_fp8_storage_without_an_fp8_gpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "RTX 3090")
    mode, reason = quant.resolve_mode("fp8")
    assert mode == "fp8-storage" and "8.6 < 8.9" in reason and "RTX 3090" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert quant.resolve_mode("fp8")[0] == "fp8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with caplog.at_level(logging.WARNING, logger="quant.quantize"):
        result = quant.apply(layer, "fp8")
    assert (result.requested, result.applied) == ("fp8", "fp8-storage")
    assert "falls back to fp8-storage: no CUDA GPU" in caplog.text
    assert layer[0].weight.dtype == torch.float8_e4m3fn


def test_bad_mode_and_quantizing_twice():
    with pytest.raises(RequestError, match=r"quant='int4' is not allowed"):
        quant.apply(torch.nn.Linear(32, 32), "int4")
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32))
    first = quant.apply(layer, "int8")
    weight = layer[0].weight
    assert quant.apply(layer, "int8") is first and layer[0].weight is weight  # once only
    assert quant.applied_mode(layer) == "int8"
    with pytest.raises(RequestError, match="already quantized as 'int8'"):
        quant.apply(layer, "fp8-storage")


def test_text_encoder_int8_by_option(tiny_models):
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(tiny_models["tiny-cogvideox"] / "t2v" / "text_encoder").eval()
    reference = copy.deepcopy(encoder)
    ids = torch.tensor([[5, 9, 14, 30, 2, 1]])
    result = quant.apply(encoder, "int8")
    assert result.layers == 12  # q, k, v, o, wi, wo in each of the 2 layers
    with torch.inference_mode():
        assert _cosine(encoder(ids).last_hidden_state, reference(ids).last_hidden_state) >= 0.99


# --------------------------------------------------------------------------- through the cache and runner


def test_cache_quantizes_once_and_reuses_the_quantized_pipeline(tiny_models, monkeypatch):
    calls: list[str] = []
    real_apply = quant.apply
    monkeypatch.setattr(quant, "apply", lambda module, mode, *a, **k: calls.append(mode) or real_apply(module, mode))
    cache = PipelineCache(max_size=3)
    first = cache.get("tiny-cogvideox", "t2v", "int8")
    again = cache.get("tiny-cogvideox", "t2v", "int8")
    v2v = cache.get("tiny-cogvideox", "v2v", "int8")  # shares the quantized transformer
    assert again is first and cache.loads == 2 and calls == ["int8"]
    assert v2v.transformer is first.transformer
    assert quant.last_result(first.transformer).applied == "int8"
    assert type(first.transformer.transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    plain = cache.get("tiny-cogvideox", "t2v", "none")  # the mode is part of the key: a separate, plain pipeline
    assert plain.transformer is not first.transformer
    assert type(plain.transformer.transformer_blocks[0].attn1.to_q.weight) is torch.nn.Parameter


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-wan"])
def test_int8_latents_match_bf16_after_two_steps(tmp_path, tiny_models, one_thread, model):
    runner = Runner(PipelineCache(max_size=2, dtype="bfloat16"), outputs_dir=tmp_path)
    latents = {}
    for mode in ("none", "int8"):
        result = runner.generate(_request(model, mode, seed=3))
        latents[mode] = torch.load(result.latents_path)["latents"]
    assert latents["int8"].shape == latents["none"].shape
    assert not torch.equal(latents["int8"], latents["none"])  # int8 really ran
    assert _cosine(latents["int8"], latents["none"]) >= 0.99


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-wan"])
def test_cli_generate_int8_end_to_end(tmp_path, tiny_models, model):
    from ui.cli import main

    out = tmp_path / "int8.mp4"
    argv = ["generate", "--model", model, "--int8", "--prompt", "a boat", "--steps", "2", "--out", str(out)]
    argv.append("--offline")
    assert main(argv) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["request"]["quant"] == "int8" and sidecar["plan"]["quant"] == "int8"
    assert out.stat().st_size > 0


# --------------------------------------------------------------------------- nothing accumulates


# Wan (its UniPC scheduler is the one that keeps latents between calls), unquantized and int8 (torchao's
# tensors and the heap trim after quantizing); fp8 storage and CogVideoX share every path these two take.
@pytest.mark.parametrize("model,mode", [("tiny-wan", "none"), ("tiny-wan", "int8")])
def test_ten_runs_stay_flat(tmp_path, tiny_models, one_thread, model, mode):
    runner = Runner(PipelineCache(max_size=1), outputs_dir=tmp_path)
    # One run first: lazy imports, kernel selection and allocator pools grow once per process, not per run.
    runner.generate(_request(model, mode, seed=0))
    rss, state, tensors = [], [], {}
    for i in range(1, 11):
        runner.generate(_request(model, mode, seed=i))
        if i in (1, 10):  # a full heap walk costs ~0.5 s: only where the comparison needs it
            tensors[i] = _live_tensors()
        rss.append(psutil.Process().memory_info().rss)
        state.append(sum(t.bytes for t in quant.state_tensors(runner.cache.get(model, "t2v", mode))))
    assert runner.cache.loads == 1
    assert rss[-1] / rss[0] <= 1.02, [f"{(r - rss[0]) / 2**20:+.1f} MiB" for r in rss]
    assert tensors[10] == tensors[1]  # not one tensor more alive after run 10 than after run 1
    assert state == [state[0]] * 10  # the pipeline's own state does not grow


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory_allocated needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_memory_allocated_returns_to_the_same_value_after_every_run(tmp_path, tiny_models, mode):
    runner = Runner(PipelineCache(max_size=1), outputs_dir=tmp_path)
    allocated = []
    for i in range(5):
        runner.generate(_request("tiny-wan", mode, seed=i))
        allocated.append(torch.cuda.memory_allocated())
    assert allocated == [allocated[0]] * 5


def test_a_run_is_in_inference_mode_and_deep_copies_no_tensor(tmp_path, tiny_models, one_thread, monkeypatch):
    """Seed 001's main leak: pipeline state deep-copied on every call, tensors and all."""
    copies = []
    for cls in (torch.Tensor, torch.nn.Parameter):
        original = cls.__deepcopy__
        counting = lambda self, memo, _o=original: copies.append(self.shape) or _o(self, memo)
        monkeypatch.setattr(cls, "__deepcopy__", counting)
    copy.deepcopy(torch.zeros(3))  # the counter works
    assert copies == [torch.Size([3])]
    copies.clear()
    runner = Runner(PipelineCache(max_size=2), outputs_dir=tmp_path)
    modes_seen = []
    for mode in ("int8", "fp8-storage"):
        transformer = runner.cache.get("tiny-wan", "t2v", mode).transformer
        hook = transformer.register_forward_pre_hook(lambda *_: modes_seen.append(torch.is_inference_mode_enabled()))
        try:
            runner.generate(_request("tiny-wan", mode))
        finally:
            hook.remove()
    assert copies == []
    assert len(modes_seen) >= 4 and all(modes_seen)  # >= 2 steps x 2 modes, every call under inference_mode


@pytest.mark.parametrize("model,family", [("tiny-cogvideox", "cogvideox"), ("tiny-wan", "wan")])
@pytest.mark.parametrize("mode", ["int8", "fp8-storage"])
def test_quantized_forward_leaves_no_new_tensors(tiny_models, one_thread, model, family, mode):
    module = _tiny_transformer(model, torch.float32)
    quant.apply(module, mode)
    inputs = _transformer_inputs(family, module)

    def snapshot():
        held = [(n, quant.tensor_bytes(t)) for n, t in list(module.named_parameters()) + list(module.named_buffers())]
        extra = [(n, k) for n, m in module.named_modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
        return held, extra, quant.weight_bytes(module)

    with torch.inference_mode():
        module(**inputs, return_dict=False)
        before, count = snapshot(), _live_tensors()
        for _ in range(4):
            module(**inputs, return_dict=False)
        assert snapshot() == before
        assert _live_tensors() == count


def test_drop_run_state_frees_scheduler_latents_and_the_next_run_is_unchanged(tmp_path, tiny_models, one_thread):
    runner = Runner(PipelineCache(max_size=1), outputs_dir=tmp_path)
    first = torch.load(runner.generate(_request("tiny-wan", "int8", seed=5)).latents_path)["latents"]
    pipe = runner.cache.get("tiny-wan", "t2v", "int8")
    assert [t for t in quant.state_tensors(pipe) if len(t.shape) >= 2] == []  # the runner dropped them
    # Called directly, UniPC keeps its last model outputs and sample between calls.
    pipe(prompt="a cat", num_frames=9, height=32, width=32, num_inference_steps=2, output_type="latent",
         max_sequence_length=32)
    held = [t for t in quant.state_tensors(pipe) if len(t.shape) >= 2]
    assert {t.path for t in held} >= {"scheduler.model_outputs[0]", "scheduler.last_sample"}
    assert quant.drop_run_state(pipe) == sum(t.bytes for t in held)
    assert [t for t in quant.state_tensors(pipe) if len(t.shape) >= 2] == []
    second = torch.load(runner.generate(_request("tiny-wan", "int8", seed=5)).latents_path)["latents"]
    assert torch.equal(first, second)
