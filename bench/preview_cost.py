"""Latent preview cost: denoising step time with and without a preview after every step (the worst case;
PreviewPolicy only thins them out further). One process, one run of each case, the same seed and latents.

Cases (random weights; no weights can be fetched here):
  tiny-wan     the tiny Wan pipeline (engine/tiny.py), 9 frames at 64x96, 12 steps, output_type="latent",
               previews from `callback_on_step_end` as the runner will make them; then once more with
               PreviewPolicy(budget=0.05) choosing the steps (tiny steps are milliseconds, so it thins them out)
  wan-1.3b-w   a full-width, reduced-depth Wan 2.1 1.3B transformer (diffusers WanTransformer3DModel with the 1.3B
               config: 12 heads x 128, ffn 8960, text_dim 4096, freq_dim 256, but 2 layers), float32, denoising
               the latents of 9 frames at 240x368 (latent 3x30x46: 240x360 gives a 45-wide latent, which the
               2x2 patch does not divide) with a 512-token random text embedding, flow-match Euler, 4 steps

For each: the median seconds per step (callback to callback) without previews and with a preview every step, runs
alternated off / on (3 pairs) so drift on a shared machine cancels; their ratio (target <= 1.05); and the ratio
from the preview time measured inside the runs (1 + preview / step), which other load on the machine moves least.

    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/preview_cost.py
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("FITVIDEO_HOME", str(ROOT / ".cache" / "test-home"))  # where the tests keep the tiny models
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from families import get_family  # noqa: E402
from engine.preview import PreviewPolicy, preview_image  # noqa: E402

WAN = get_family("wan")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


class Previews:
    """A `callback_on_step_end` that makes a preview every step (or when `policy` says) and times it."""

    def __init__(self, family, enabled: bool, policy: PreviewPolicy | None = None):
        self.family, self.enabled, self.policy = family, enabled, policy
        self.seconds, self.count, self.shape, self.marks = 0.0, 0, None, []

    def intervals(self) -> list[float]:
        """Seconds from one callback to the next: a step, plus the preview made at the end of the one before."""
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def __call__(self, pipe, i, t, callback_kwargs):
        start = time.perf_counter()
        self.marks.append(start)
        if self.enabled:
            latents = callback_kwargs["latents"]
            if self.policy is None:
                image = preview_image(latents, self.family, max_side=256, pipe=pipe)
            else:
                image = self.policy.maybe(i, preview_image, latents, self.family, max_side=256, pipe=pipe)
            if image is not None:
                self.seconds += time.perf_counter() - start
                self.count, self.shape = self.count + 1, image.shape
        return callback_kwargs


def alternate(run, pairs: int = 2) -> tuple[float, float, Previews]:
    """`run(previews)` off / on alternately `pairs` times (drift on a shared machine cancels): the median
    callback-to-callback interval without and with previews (a median shrugs off other jobs' bursts)."""
    off, on, last = [], [], None
    for _ in range(pairs):
        previews = Previews(WAN, False)
        run(previews)
        off += previews.intervals()
        last = Previews(WAN, True)
        run(last)
        on += last.intervals()
    return statistics.median(off), statistics.median(on), last


def tiny_case(steps: int = 12) -> tuple[float, float, Previews, Previews]:
    from engine.loaders import load_pipeline

    pipe = load_pipeline("tiny-wan", "t2v")

    def run(previews: Previews) -> None:
        pipe(prompt="a cat", num_frames=9, height=64, width=96, num_inference_steps=steps, guidance_scale=1.0,
             output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=previews)

    run(Previews(WAN, True))  # warm-up
    with_policy = Previews(WAN, True, PreviewPolicy(budget=0.05))
    run(with_policy)
    return (*alternate(run, pairs=3), with_policy)


def wan_transformer(layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).eval()


def denoise(model, latents, text, steps: int, previews: Previews) -> None:
    """Flow-match Euler over `steps` steps, `previews` as the step-end callback."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps)
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            velocity = model(latents, t.expand(1), text, return_dict=False)[0]
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            previews(None, i, t, {"latents": latents})


def wide_case(steps: int = 4) -> tuple[float, float, Previews]:
    model = wan_transformer()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 30, 46, generator=generator)
    text = torch.randn(1, 512, 4096, generator=generator)
    denoise(model, latents, text, 1, Previews(WAN, True))  # warm-up
    return alternate(lambda previews: denoise(model, latents, text, steps, previews), pairs=3)


def report(name: str, off: float, on: float, previews: Previews) -> None:
    per_preview = previews.seconds / max(1, previews.count)
    print(f"{name:12s} step {off:7.3f} s without previews, {on:7.3f} s with one every step "
          f"(preview {per_preview * 1000:6.2f} ms, image {previews.shape}): ratio {on / off:.3f}, "
          f"in-run ratio {1 + per_preview / (on - per_preview):.4f}")


def main() -> None:
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} (other work on the machine moves the run-to-run ratio)")
    *tiny, with_policy = tiny_case()
    report("tiny-wan", *tiny)
    policy = with_policy.policy
    print(f"tiny-wan     with PreviewPolicy(budget=0.05): {with_policy.count} previews in 12 steps, preview time / "
          f"denoising time measured by the policy {policy.overhead:.4f} (the first preview is always made)")
    report("wan-1.3b-w", *wide_case())
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
