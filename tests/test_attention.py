"""Attention backends through diffusers' dispatcher (CogVideoX's own processor routed through it) and regional
compile's refusals, on the tiny models."""
from __future__ import annotations

import pytest
import torch

from configs.schema import GenerationRequest, RequestError
from engine import attention as A
from engine.tiny import COGVIDEOX_TEXT_LEN


def _run(pipe, cog: bool) -> torch.Tensor:
    kw = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    kw.update(num_frames=9, max_sequence_length=COGVIDEOX_TEXT_LEN) if cog else kw.update(num_frames=5)
    with torch.inference_mode():
        return pipe(**kw).frames


@pytest.mark.parametrize("model", ["tiny-cogvideox", "tiny-wan"])
def test_another_backend_really_goes_through_the_dispatcher_and_removal_gives_the_model_back(model, tiny_models,
                                                                                              monkeypatch):
    from diffusers.models import attention_dispatch
    from diffusers.models.transformers import transformer_wan

    from engine import modifiers
    from engine.loaders import load_pipeline

    pipe, cog = load_pipeline(model, "t2v"), model == "tiny-cogvideox"
    clean, base = modifiers.fingerprint(pipe), _run(pipe, cog)
    if cog:  # the backend switch needs CogVideoX's processor routed through the dispatcher: the same computation
        swapped = A._route_through_dispatcher(pipe.transformer)
        assert swapped and torch.equal(_run(pipe, cog), base)
        for sub, processor in swapped:
            sub.set_processor(processor)
    seen = []
    real = attention_dispatch.dispatch_attention_fn
    spy = lambda *a, **k: seen.append(getattr(k.get("backend"), "value", k.get("backend"))) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", spy)  # what our CogVideoX processor calls
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", spy)  # what Wan's processor imported
    backend = A.AttentionBackend("_native_math")  # a second backend the CPU has, as a run's modifier
    modifiers.apply_all(pipe, [backend])
    # diffusers makes it the whole process's default too (every later run of any model would use it) ...
    assert A.process_default_left() == "the attention dispatcher's default is _native_math"
    math = _run(pipe, cog)
    assert seen and set(seen) == {"_native_math"}
    # the math kernel sums in another order: float32 rounding, a few ulps of the latents' scale
    assert torch.allclose(math, base, rtol=0, atol=64 * torch.finfo(torch.float32).eps * base.abs().max().item())
    modifiers.remove_all(pipe, [backend])
    assert A.process_default_left() == ""  # ... until the modifier comes off: the default it found is back
    assert modifiers.fingerprint(pipe) == clean  # the original processors, no backend set
    assert torch.equal(_run(pipe, cog), base)


def test_backends_that_cannot_run_here_are_refused_with_the_reason():
    problems = A.backend_problems()
    assert problems["auto"] is None and problems["native"] is None
    for name in ("flash", "sage"):
        if problems[name]:
            with pytest.raises(RequestError, match=f"attention='{name}' cannot run here: {name} needs"):
                A.resolve_backend(name)
    with pytest.raises(RequestError, match="choose one of auto, native, flash, sage"):
        A.resolve_backend("xformers")
    assert A.resolve_backend("auto") == next(b for b in ("sage", "flash", "native") if problems[b] is None)


def test_regional_compile_is_refused_off_cuda_and_for_cogvideox(runner, tiny_models):
    from configs.registry import get_model_spec

    wan, cog = get_model_spec("tiny-wan"), get_model_spec("tiny-cogvideox")
    assert "CUDA" in A.compile_problem(wan, "cpu")
    assert A.compile_problem(wan, "cuda:0") == ""
    assert "no repeated blocks" in A.compile_problem(cog, "cuda:0")
    if not torch.cuda.is_available():
        req = GenerationRequest(model="tiny-wan", task="t2v", prompt="a cat", frames=5, height=32, width=32,
                                steps=1, compile=True)
        with pytest.raises(RequestError, match="compile=True: regional compile is for CUDA GPUs"):
            runner.generate(req)
