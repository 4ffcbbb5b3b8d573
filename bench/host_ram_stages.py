"""The host rungs that free one component before the next loads, for bench/host_ram.py (see its docstring).

  ram+text-encoder    a reduced-depth, full-width UMT5-XXL encoder (Wan's text encoder) and the transformer both
                      in anonymous RAM, then the prompt encoded and one step: what the `ram` rung holds
  text-encoder-first  the encoder loaded, the prompt encoded, the encoder freed (del + gc), then the transformer
                      loaded and one step
  ram+experts         two transformer stacks (Wan 2.2 A14B's high- and low-noise experts, different weights) both
                      loaded, then one step with each
  one-expert          the high-noise expert loaded, one step, freed, then the low-noise expert loaded, one step

Every weight is read tensor by tensor into anonymous RAM (host_ram.load_into_ram's reader). The predicted
peak is the estimator on Wan 2.1 14B (encoder cases: text encoder = the reduced encoder's parameters and
layers) or Wan 2.2 A14B (expert cases: both experts = the stack's parameters and blocks), the larger of its
"text" and "denoise" host stages (the expert cases run no encoder: "denoise" alone).
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from bench.host_ram import GIB, _AnonPeak, _load, _status_bytes, _weight_bytes, drop_page_cache, tensors_of

ENCODER_CASES = ("ram+text-encoder", "text-encoder-first")
EXPERT_CASES = ("ram+experts", "one-expert")
CASES = ENCODER_CASES + EXPERT_CASES
# google/umt5-xxl (Wan-AI/Wan2.1-T2V-14B-Diffusers text_encoder/config.json), all but the depth
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                       scalable_attention=True)


def _empty_encoder(layers: int):
    """A UMT5 encoder on the meta device, its token embedding shared with the encoder stack (tied)."""
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    with init_empty_weights(include_buffers=False):
        model = UMT5EncoderModel(UMT5Config(num_layers=layers, **UMT5_XXL_CONFIG))
    model.tie_weights()
    return model


def build_encoder(folder: Path, layers: int) -> int:
    """Save a `layers`-deep, full-width UMT5-XXL encoder with random bf16 weights; returns its weight bytes
    (the 256384 x 4096 embedding alone is 2 GiB: it is real, every run of Wan holds it)."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    model = _empty_encoder(layers)
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    for i, (name, param) in enumerate(list(model.named_parameters())):
        n = param.numel()
        values = torch.roll(pool, (i * 7919) % pool.numel()).repeat(-(-n // pool.numel()))[:n]
        set_module_tensor_to_device(model, name, "cpu", value=values.reshape(param.shape), dtype=torch.bfloat16)
    model.tie_weights()
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_encoder(folder: str):
    """The encoder with its weights in anonymous RAM, read tensor by tensor (as `load_into_ram`)."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers import UMT5Config

    layers = UMT5Config.from_pretrained(folder).num_layers
    model = _empty_encoder(layers)
    for name, value in tensors_of(folder):
        set_module_tensor_to_device(model, name, "cpu", value=value, dtype=value.dtype)  # as stored (bf16)
    model.tie_weights()
    return model.eval()


def _encode(encoder, args: argparse.Namespace, g):
    """The prompt through the encoder: `--encoder-tokens` tokens (Wan pads to 512), the first `--text-tokens`
    real; the real tokens' embeddings are what the transformer gets (Wan zeroes the padding's)."""
    import torch

    ids = torch.randint(0, UMT5_XXL_CONFIG["vocab_size"], (1, args.encoder_tokens), generator=g)
    mask = (torch.arange(args.encoder_tokens) < args.text_tokens).long()[None]
    with torch.inference_mode():
        out = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return out[:, :args.text_tokens].clone()


def _step(model, latents, text, t: int):
    import torch

    with torch.inference_mode():
        return model(latents.to(torch.bfloat16), torch.tensor([t]), text.to(torch.bfloat16), return_dict=False)[0]


def _encoder_case(args: argparse.Namespace, anon: _AnonPeak, latents, g) -> dict:
    t0 = time.perf_counter()
    encoder = load_encoder(args.encoder)
    model = _load(args.model, "ram") if args.child == "ram+text-encoder" else None
    place_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = _encode(encoder, args, g)
    encode_s = time.perf_counter() - t0
    if model is None:  # text encoder first: freed before the transformer loads
        del encoder
        gc.collect()
    phase1 = anon.mark()
    if model is None:
        t0 = time.perf_counter()
        model = _load(args.model, "ram")
        place_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = _step(model, latents, text, 500)
    return dict(phase1_anon=phase1, place_s=place_s, encode_s=encode_s, step_s=time.perf_counter() - t0, out=out)


def _expert_case(args: argparse.Namespace, anon: _AnonPeak, latents, g) -> dict:
    import torch

    high_dir, low_dir = args.experts.split(",")
    text = torch.randn(1, args.text_tokens, 4096, generator=g) * 0.1  # (B, L, D)
    t0 = time.perf_counter()
    high = _load(high_dir, "ram")
    low = _load(low_dir, "ram") if args.child == "ram+experts" else None
    place_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = _step(high, latents, text, 900)  # the high-noise expert's steps
    step_s = time.perf_counter() - t0
    if low is None:  # one expert: the high-noise one freed before the low-noise one loads (at the switch)
        del high
        gc.collect()
    phase1 = anon.mark()
    if low is None:
        t0 = time.perf_counter()
        low = _load(low_dir, "ram")
        place_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = _step(low, out.float(), text, 100)
    return dict(phase1_anon=phase1, place_s=place_s, encode_s=0.0, step_s=step_s + time.perf_counter() - t0,
                out=out)


def stages_child(args: argparse.Namespace) -> dict:
    """One of CASES in this (fresh) process, from the disk (page cache dropped): its peaks (phase 1: up to and
    including the free, or the first compute when nothing is freed; phase 2: the rest)."""
    import torch

    torch.set_num_threads(args.threads)
    folders = [args.model, args.encoder] if args.child in ENCODER_CASES else args.experts.split(",")
    drop_page_cache([p for f in folders for p in Path(f).glob("*.safetensors")])
    import diffusers  # noqa: F401  (imports before the baseline: they are not the rung's)
    import quant  # noqa: F401
    import transformers  # noqa: F401

    start, start_anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, args.latent_frames, args.latent_height, args.latent_width, generator=g)
    case = _encoder_case if args.child in ENCODER_CASES else _expert_case
    with _AnonPeak() as anon:
        r = case(args, anon, latents, g)
    out = r.pop("out")
    if args.out:
        torch.save(out.float(), args.out)
    return dict(r, rung=args.child, start_rss=start, peak_rss=_status_bytes("VmHWM"), start_anon=start_anon,
                phase2_anon=anon.peak, peak_anon=max(anon.peak, r["phase1_anon"]))


# --------------------------------------------------------------------------- predicted


def predicted_stages(case: str, args: argparse.Namespace, folders: dict[str, Path]) -> dict[str, int]:
    """The estimator's host stages ("text", "denoise": bytes) for this case: Wan 2.1 14B with the transformer
    and the text encoder cut to the built ones, or Wan 2.2 A14B with both experts cut to the built stack."""
    import dataclasses

    from configs.schema import GenerationRequest
    from configs.registry import get_model_spec
    from vram_utils.archs import arch_for
    from vram_utils.estimate import estimate, workload_for

    if case in ENCODER_CASES:
        spec = get_model_spec("Wan-AI/Wan2.1-T2V-14B-Diffusers")
        params = {"transformer": _weight_bytes(folders["model"]) // 2,
                  "text_encoder": _weight_bytes(folders["encoder"]) // 2, "vae": 1}
        layers = {"transformer": args.blocks, "text_encoder": args.encoder_layers}
    else:
        spec = get_model_spec("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
        expert = _weight_bytes(folders["high"]) // 2
        params = {"transformer": expert, "transformer_2": expert, "text_encoder": 1, "vae": 1}
        layers = {"transformer": args.expert_blocks, "transformer_2": args.expert_blocks}
    config = {**spec.config, **{c: {**spec.config[c], "num_layers": n} for c, n in layers.items()}}
    stack = dataclasses.replace(spec, params={**spec.params, **params}, config=config)
    request = GenerationRequest(model=spec.id, task="t2v", prompt="a cat", frames=(args.latent_frames - 1) * 4 + 1,
                                height=args.latent_height * 8, width=args.latent_width * 8, steps=1, guidance=1.0)
    rung = "ram" if case.startswith("ram") else case
    est = estimate(arch_for(stack), workload_for(request, stack).replace(host_rung=rung), "none", "cpu")
    return {st.name: st.peak_bytes for st in est.host_stages if st.name in ("text", "denoise")}


def stages_table(rows: list[dict], args: argparse.Namespace, folders: dict[str, Path]) -> str:
    """The free-before-load rungs next to the `ram` rung holding the same components."""
    lines = ["| case | predicted text / denoise | predicted host peak | measured peak, anonymous (phase 1 / 2) "
             "| predicted / measured | measured peak RSS incl. mapped files | predicted / measured "
             "| place s | encode s | step(s) s |", "|" + "---|" * 10]
    for r in rows:
        stages = predicted_stages(r["rung"], args, folders)
        pred = stages["denoise"] if r["rung"] in EXPERT_CASES else max(stages.values())
        anon, rss = r["peak_anon"] - r["start_anon"], r["peak_rss"] - r["start_rss"]
        p1, p2 = r["phase1_anon"] - r["start_anon"], r["phase2_anon"] - r["start_anon"]
        lines.append(
            f"| {r['rung']} | {stages['text'] / GIB:.2f} / {stages['denoise'] / GIB:.2f} GiB | {pred / GIB:.2f} GiB "
            f"| {anon / GIB:.2f} GiB ({p1 / GIB:.2f} / {p2 / GIB:.2f}) "
            f"| {pred / anon:.2f} | {rss / GIB:.2f} GiB | {pred / rss:.2f} | {r['place_s']:.1f} | {r['encode_s']:.1f} "
            f"| {r['step_s']:.2f} |")
    sizes = {k: _weight_bytes(v) / GIB for k, v in folders.items()}
    lines.append("weights " + ", ".join(f"{k} {v:.2f} GiB" for k, v in sizes.items()))
    return "\n".join(lines)
