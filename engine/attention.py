"""Attention backends and regional compile: the transformer's speed knobs that change no result's meaning.

Backends go through diffusers' attention dispatcher (`ModelMixin.set_attention_backend`): `native` (torch SDPA,
everywhere), `flash` (the flash-attn package, CUDA, compute capability >= 8.0), `sage` (the sageattention
package, CUDA). `auto` takes the fastest one this machine has. Wan's attention processor calls the dispatcher;
CogVideoX's (`CogVideoXAttnProcessor2_0`) calls `F.scaled_dot_product_attention` directly, so a backend set on
it would do nothing: `DispatchCogVideoXAttnProcessor` is the same computation with the one call routed
through the dispatcher, installed when a backend is chosen for a CogVideoX transformer.

Regional compile (`compile_repeated_blocks`, opt-in, CUDA only) compiles Wan's repeated transformer block once
and reuses it for all 30 / 40 blocks; the first run pays the compile (a stage of its own), the compiled
transformer stays in the pipeline cache. CogVideoX declares no repeated blocks: refused with that reason.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "flash", "sage")
EXPERTS = ("transformer", "transformer_2")
_APPLIED = "_fitvideo_attention_backend"


def backend_problems() -> dict[str, str | None]:
    """name -> None where the backend runs here, else why not (the UI offers only the runnable ones)."""
    cuda = torch.cuda.is_available()
    major = torch.cuda.get_device_capability()[0] if cuda else 0
    problems: dict[str, str | None] = {"auto": None, "native": None}
    problems["flash"] = (None if cuda and major >= 8 and importlib.util.find_spec("flash_attn") else
                         "flash needs the flash-attn package and a CUDA GPU of compute capability 8.0 or newer")
    problems["sage"] = (None if cuda and importlib.util.find_spec("sageattention") else
                        "sage needs the sageattention package and a CUDA GPU")
    return problems


def resolve_backend(name: str) -> str:
    """The backend `name` means here (`auto`: sage, then flash, then native); RequestError when it cannot run."""
    from configs.schema import RequestError

    if name not in BACKENDS:
        raise RequestError(f"attention={name!r} is not allowed; choose one of {', '.join(BACKENDS)}")
    problems = backend_problems()
    if name == "auto":
        return next(b for b in ("sage", "flash", "native") if problems[b] is None)
    if problems[name]:
        raise RequestError(f"attention={name!r} cannot run here: {problems[name]}; use auto or native")
    return name


def apply_attention_backend(pipe, name: str) -> str:
    """Every transformer of `pipe` on backend `name` (resolved); idempotent. Returns the backend used."""
    backend = resolve_backend(name)
    for attr in EXPERTS:
        module = getattr(pipe, attr, None)
        if not isinstance(module, torch.nn.Module) or getattr(module, _APPLIED, "native") == backend:
            continue
        if backend == "native":  # the dispatcher's default: what an untouched model runs, bitwise
            module.reset_attention_backend()
        else:
            if type(module).__name__.startswith("CogVideoX"):
                _route_cogvideox_through_dispatcher(module)
            module.set_attention_backend(backend)
        setattr(module, _APPLIED, backend)
        logger.info("attention backend %s on %s", backend, attr)
    return backend


def _route_cogvideox_through_dispatcher(module: torch.nn.Module) -> None:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    for sub in module.modules():
        if type(getattr(sub, "processor", None)) is CogVideoXAttnProcessor2_0:
            sub.set_processor(DispatchCogVideoXAttnProcessor())


def _dispatch_processor_base():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    return CogVideoXAttnProcessor2_0


class DispatchCogVideoXAttnProcessor(_dispatch_processor_base()):
    """diffusers' CogVideoXAttnProcessor2_0 with its attention call routed through the dispatcher, so the
    model's attention backend applies (same projections, norms and rotary embedding, same output layout)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        q, k, v = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, text_len:] = apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attention_mask,
                                    dropout_p=0.0, is_causal=False, backend=self._attention_backend)  # (B, S, H, D)
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, -1, attn.heads * head_dim)))
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


# --------------------------------------------------------------------------- regional compile


def compile_problem(pipe, device: str) -> str:
    """Why regional compile cannot apply ('' when it can)."""
    if not str(device).startswith("cuda"):
        return "regional compile is for CUDA GPUs (on the CPU the compile costs more than it saves)"
    transformer = getattr(pipe, "transformer", None)
    if not getattr(transformer, "_repeated_blocks", None):
        return f"{type(transformer).__name__} declares no repeated blocks (diffusers' compile_repeated_blocks needs them)"
    return ""


def compile_problem_for(spec, device: str) -> str:
    """`compile_problem` before anything loads: from the model's family (CogVideoX has no repeated blocks)."""
    if not str(device).startswith("cuda"):
        return "regional compile is for CUDA GPUs (on the CPU the compile costs more than it saves)"
    if spec.family != "wan":
        return f"{spec.label} declares no repeated blocks (diffusers' compile_repeated_blocks needs them); only Wan"
    return ""


def needs_compile(pipe) -> bool:
    """Whether a transformer of `pipe` has not been compiled yet (its first run will compile)."""
    return any(isinstance(getattr(pipe, a, None), torch.nn.Module) and not getattr(getattr(pipe, a), "_fitvideo_compiled",
                                                                                     False) for a in EXPERTS)


def compile_regions(pipe, device: str) -> None:
    """Compile each transformer's repeated block (idempotent); RuntimeError with the reason where it cannot."""
    problem = compile_problem(pipe, device)
    if problem:
        raise RuntimeError(problem)
    for attr in EXPERTS:
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module) and not getattr(module, "_fitvideo_compiled", False):
            module.compile_repeated_blocks(fullgraph=True)
            module._fitvideo_compiled = True
