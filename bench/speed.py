"""Step-cache speed on the CPU: full-width, reduced-depth (random-weight) Wan-1.3B and CogVideoX-2b transformers,
the real token count of a 9-frame 240x368 clip (latent 3 x 30 x 46, patch 2x2: 1035 video tokens), N steps of
the real scheduler, each cache at its default. Random weights cannot judge quality: the cosine is only a sanity
number. Run:  flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/speed.py [--steps 10 --layers 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import stepcache as sc  # noqa: E402


def build(family: str, layers: int):
    torch.manual_seed(0)
    if family == "wan":
        from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
        t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
        s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        return t.eval(), s, (1, 16, 3, 30, 46), (1, 512, 4096)
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    t = CogVideoXTransformer3DModel(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
                                    time_embed_dim=512, text_embed_dim=4096, num_layers=layers, sample_frames=49,
                                    sample_height=60, sample_width=90, patch_size=2)
    s = CogVideoXDPMScheduler(timestep_spacing="trailing", snr_shift_scale=3.0)
    return t.eval(), s, (2, 3, 16, 30, 46), (2, 226, 4096)  # batched cond+uncond, as the pipeline


def denoise(family: str, pipe, sched, shapes, steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lat_shape, text_shape = shapes
    x = torch.randn((1,) + lat_shape[1:], generator=g)
    text = torch.randn(text_shape, generator=g)
    sched = type(sched).from_config(sched.config)  # a fresh scheduler each run: no multistep state carried over
    sched.set_timesteps(steps)
    old = None
    for i, t in enumerate(sched.timesteps):
        pipe.current_timestep = t
        if family == "wan":
            outs = []
            for j, name in enumerate(("cond", "uncond")):
                with pipe.transformer.cache_context(name):
                    outs.append(pipe.transformer(hidden_states=x, timestep=t.expand(1),
                                                 encoder_hidden_states=text[:1] * (1 - j), return_dict=False)[0])
            noise = outs[1] + 5.0 * (outs[0] - outs[1])
            x = sched.step(noise, t, x, return_dict=False)[0]
        else:
            with pipe.transformer.cache_context("cond_uncond"):
                out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                       encoder_hidden_states=text, return_dict=False)[0]
            u, c = out.chunk(2)
            x, old = sched.step(u + 5.0 * (c - u), old, t, sched.timesteps[i - 1] if i else None, x,
                                generator=torch.Generator().manual_seed(i), return_dict=False)
    return x


def block_share(family: str, pipe, sched, shapes, steps: int) -> float:
    """The share of an uncached denoise's time spent inside the transformer blocks (timed with hooks)."""
    blocks = sc._blocks(pipe.transformer)
    spent, started = [0.0], {}
    handles = [b.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter())) for b in blocks]
    handles += [b.register_forward_hook(lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter()
                                                                          - started[id(m)])) for b in blocks]
    t0 = time.perf_counter()
    denoise(family, pipe, sched, shapes, steps)
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return spent[0] / total


def bench(family: str, layers: int, steps: int) -> None:
    transformer, sched, lat, text = build(family, layers)
    pipe = SimpleNamespace(transformer=transformer, current_timestep=None, components={"transformer": transformer})
    ok = sc.supported(family, "t2v")
    with torch.inference_mode():
        share = block_share(family, pipe, sched, (lat, text), steps)
        t0 = time.perf_counter(); base = denoise(family, pipe, sched, (lat, text), steps); base_s = time.perf_counter() - t0
        print(f"{family} {layers} layers, {steps} steps: uncached {base_s:.1f} s; the blocks are {share:.0%} of it "
              "(the rest: embeddings, output projection, scheduler), so skipping a fraction f of the block "
              "computations should take the time to 1 - f x that share")
        for name in sc.STEP_CACHES[1:]:
            if ok[name] or name == "magcache":
                print(f"  {name:12s} skipped: {ok[name] or 'needs calibrated ratios (not run on random weights)'}")
                continue
            state = sc.apply_step_cache(pipe, name, steps=steps)
            t0 = time.perf_counter(); out = denoise(family, pipe, sched, (lat, text), steps); s = time.perf_counter() - t0
            st = state.stats()
            cos = torch.nn.functional.cosine_similarity(out.flatten(), base.flatten(), dim=0).item()
            if st["unit"] != "blocks":  # attention layers: their share of the time was not measured
                print(f"  {name:12s}@{st['threshold']}: skipped {st['skipped_fraction']:.2f} of {st['unit']}, time "
                      f"ratio {s / base_s:.2f} (no expected ratio: attention's share of a block is not timed), "
                      f"cosine {cos:.4f}")
                sc.remove_step_cache(pipe)
                continue
            want = 1 - st["skipped_fraction"] * share
            print(f"  {name:12s}@{st['threshold']}: skipped {st['skipped_fraction']:.2f} of {st['unit']}, time ratio "
                  f"{s / base_s:.2f} (expected {want:.2f}, {'within' if abs(s / base_s - want) <= 0.1 * want else 'NOT within'}"
                  f" 10%), cosine {cos:.4f}")
            sc.remove_step_cache(pipe)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    model = [ln for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
             if ln.startswith("Model name")]
    print(model[0] if model else "Model name: unknown", f"| torch threads {torch.get_num_threads()}")
    print("Random weights: the skipped fraction and time are real, the cosine cannot judge quality.")
    for family in ("wan", "cogvideox"):
        bench(family, a.layers, a.steps)


if __name__ == "__main__":
    main()
