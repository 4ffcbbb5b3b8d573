"""Latent preview (engine/preview.py) and the families' preview facts."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from families import get_family
from families.cogvideox import COGVIDEOX_RGB_BIAS, COGVIDEOX_RGB_FACTORS
from families.wan import WAN21_RGB_BIAS, WAN21_RGB_FACTORS, WAN22_RGB_FACTORS
from engine.preview import PreviewPolicy, preview_frame_indices, preview_image, project_latents

WAN, COG = get_family("wan"), get_family("cogvideox")


def wan_latents(c=16, f=5, h=6, w=10, seed=0, dtype=torch.float32):
    return torch.randn(1, c, f, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (B, C, F, H, W)


def cog_latents(c=16, f=5, h=6, w=10, seed=0, dtype=torch.float32):
    return torch.randn(1, f, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (B, F, C, H, W)


def test_families_carry_published_factors_and_layouts():
    assert len(WAN.latent_rgb_factors) == 16 and len(WAN.latent_rgb_bias) == 3
    assert len(COG.latent_rgb_factors) == 16 and len(COG.latent_rgb_bias) == 3
    assert WAN.latent_rgb_factors[0] == (-0.1299, -0.1692, 0.2932)
    assert WAN.latent_rgb_bias == (-0.1835, -0.0868, -0.3360)
    assert WAN.rgb_projection(48)[0] is WAN22_RGB_FACTORS
    assert WAN.preview_latents(wan_latents()).shape == (1, 16, 5, 6, 10)
    assert COG.preview_latents(cog_latents()).shape == (1, 16, 5, 6, 10)
    rows, _ = WAN.rgb_projection(4)  # no published set for 4 channels: the structural fallback
    assert len(rows) == 4 and all(len(r) == 3 for r in rows)


@pytest.mark.parametrize("family,make", [(WAN, wan_latents), (COG, cog_latents)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preview_shape_and_dtype(family, make, dtype):
    image = preview_image(make(f=9, h=30, w=45, dtype=dtype), family, max_side=256)
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    main_h = round(30 * 256 / 45)
    thumb_w = 256 // 4
    assert image.shape == (main_h + 2 + round(thumb_w * 30 / 45), 256, 3)
    single = preview_image(make(f=1, h=30, w=45, dtype=dtype), family, max_side=90)
    assert single.shape == (60, 90, 3)  # one latent frame: no strip


def test_frame_choice_is_the_middle_and_a_spread():
    assert preview_frame_indices(21) == (10, [0, 6, 14, 20])
    assert preview_frame_indices(3) == (1, [0, 2])
    assert preview_frame_indices(1) == (0, [])


def test_projection_equals_a_hand_computed_einsum():
    z = torch.arange(16 * 3 * 2 * 2, dtype=torch.float32).reshape(1, 16, 3, 2, 2) / 100 - 0.5
    factors, bias = torch.tensor(WAN21_RGB_FACTORS), torch.tensor(WAN21_RGB_BIAS)
    expected = torch.einsum("chw,cr->rhw", z[0, :, 1], factors) + bias.view(3, 1, 1)
    assert torch.allclose(project_latents(z, WAN, [1])[0], expected, atol=1e-6)
    # CogVideoX: (B, F, C, H, W) latents, factors for 5 * 0.7 * raw and latents that are scaling_factor * raw
    zc = z.permute(0, 2, 1, 3, 4).contiguous()
    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.15258426)))
    for p, gain in ((None, 5.0), (pipe, 5.0 * 0.7 / 1.15258426)):
        expected = torch.einsum("chw,cr->rhw", zc[0, 1], torch.tensor(COGVIDEOX_RGB_FACTORS) * gain)
        expected += torch.tensor(COGVIDEOX_RGB_BIAS).view(3, 1, 1)
        assert torch.allclose(project_latents(zc, COG, [1], p)[0], expected, atol=1e-6)


@pytest.mark.parametrize("family,make", [(WAN, wan_latents), (COG, cog_latents)])
def test_previews_of_different_latents_differ_and_the_input_is_untouched(family, make):
    a, b = make(seed=1), make(seed=2)
    a_copy, version = a.clone(), a._version
    with torch.inference_mode():
        first = preview_image(a, family, max_side=64)
    assert not np.array_equal(first, preview_image(b, family, max_side=64))
    assert np.array_equal(first, preview_image(a, family, max_side=64))
    assert torch.equal(a, a_copy) and a._version == version


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_policy(policy, clock, steps, step_s, preview_s):
    shown = []

    def preview(i):
        clock.now += preview_s
        return i

    for i in range(steps):
        clock.now += step_s
        if policy.maybe(i, preview, i) is not None:
            shown.append(i)
    return shown


def test_policy_keeps_previews_within_budget():
    clock = FakeClock()
    policy = PreviewPolicy(budget=0.05, clock=clock)
    shown = run_policy(policy, clock, steps=50, step_s=1.0, preview_s=0.1)  # a preview is 10% of a step
    assert shown[0] == 0 and 8 <= len(shown) <= 26  # about every 2-3 steps after the first
    assert policy.overhead <= 0.05 + 0.1 / 49
    cheap_clock = FakeClock()
    cheap = PreviewPolicy(budget=0.05, clock=cheap_clock)
    assert run_policy(cheap, cheap_clock, steps=10, step_s=1.0, preview_s=0.001) == list(range(10))
    sparse_clock = FakeClock()
    sparse = PreviewPolicy(every=3, clock=sparse_clock)
    assert run_policy(sparse, sparse_clock, steps=10, step_s=1.0, preview_s=0.001) == [0, 3, 6, 9]


def test_a_failing_preview_turns_previews_off_without_raising():
    policy = PreviewPolicy()

    def broken(_):
        raise RuntimeError("boom")

    assert policy.maybe(0, broken, 1) is None and policy.disabled
    assert policy.maybe(1, lambda _: 1, 1) is None


def test_tiny_wan_pipeline_callback_previews(tiny_models):
    from engine.loaders import load_pipeline

    pipe = load_pipeline("tiny-wan", "t2v")
    family, images = WAN, []

    def on_step_end(p, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        before = latents.clone()
        images.append((before, preview_image(latents, family, max_side=96, pipe=p)))
        assert torch.equal(latents, before)  # the preview only reads
        return callback_kwargs

    final = pipe(
        prompt="a cat", num_frames=9, height=32, width=48, num_inference_steps=3, guidance_scale=1.0,
        output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end,
    ).frames
    assert len(images) == 3
    for latents, image in images:
        assert latents.shape == (1, 16, 3, 4, 6)
        assert image.dtype == np.uint8 and image.shape == (64 + 2 + round(48 * 4 / 6), 96, 3)
    assert not np.array_equal(images[0][1], images[-1][1])
    assert torch.equal(images[-1][0], final)
