"""Attention backends and regional compile: the transformer's speed knobs that change no result's meaning.

Backends go through diffusers' attention dispatcher (`ModelMixin.set_attention_backend`): `native` (torch SDPA,
everywhere), `flash` (the flash-attn package, CUDA, compute capability >= 8.0), `sage` (the sageattention
package, CUDA). `auto` takes the fastest one this machine has. Wan's attention processor calls the dispatcher;
CogVideoX's (`CogVideoXAttnProcessor2_0`) calls `F.scaled_dot_product_attention` directly, so a backend set on
it would do nothing: `DispatchCogVideoXAttnProcessor` is the same computation with the one call routed
through the dispatcher, installed when a backend is chosen for a CogVideoX transformer.

Regional compile (`compile_repeated_blocks`, opt-in, CUDA only) compiles Wan's repeated transformer block once
and reuses it for all 30 / 40 blocks; the first run pays the compile (a stage of its own). CogVideoX declares no
repeated blocks: refused with that reason.

Both are modifiers (engine/modifiers.py): applied before a run, removed after it.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "flash", "sage")


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


@dataclass(eq=False)
class AttentionBackend:
    """Modifier: every loaded denoiser of a pipeline on `backend` (a resolved name, never "auto"), CogVideoX's
    processors swapped for the dispatching one first; `remove` puts the original processors and the dispatcher's
    default back. "native" is the dispatcher's default: what an untouched model runs, so it is never applied.

    diffusers' `set_attention_backend` also makes the backend the whole process's default (the dispatcher's
    active backend) and `reset_attention_backend` leaves it so: every later run of any model would compute with
    it. `apply` keeps the default it found and `remove` puts it back."""

    backend: str
    name: str = "attention"
    _on: list[tuple[torch.nn.Module, list]] = field(default_factory=list)
    _default: object = None  # the dispatcher's active backend before `apply`

    def added_bytes(self) -> int:
        return 0

    def apply(self, pipe) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        from engine.stepcache import denoisers_of
        from families import family_of_pipeline

        if not self._on:
            self._default = _AttentionBackendRegistry._active_backend
        family = family_of_pipeline(type(pipe).__name__)
        for attr, module in denoisers_of(pipe):
            if any(m is module for m, _ in self._on):
                continue
            swapped = [] if family is None or family.attention_dispatched else _route_through_dispatcher(module)
            module.set_attention_backend(self.backend)
            self._on.append((module, swapped))
            logger.info("attention backend %s on %s", self.backend, attr)

    def remove(self, pipe) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        for module, swapped in self._on:
            module.reset_attention_backend()
            for sub, processor in swapped:
                sub.set_processor(processor)
        if self._on:
            _AttentionBackendRegistry.set_active_backend(self._default)
        self._on = []


def process_default_left() -> str:
    """'' when diffusers' dispatcher computes with its own default (DIFFUSERS_ATTN_BACKEND, "native" unless set),
    else what it was left on: a backend set for one run and never put back changes every later run."""
    import sys

    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    if dispatch is None:  # never imported: nothing could have set it
        return ""
    active = dispatch._AttentionBackendRegistry._active_backend
    default = dispatch.AttentionBackendName(dispatch.DIFFUSERS_ATTN_BACKEND)
    return "" if active == default else f"the attention dispatcher's default is {getattr(active, 'value', active)}"


def _route_through_dispatcher(module: torch.nn.Module) -> list:
    """CogVideoX's processors replaced by `DispatchCogVideoXAttnProcessor`; returns (module, original) pairs."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    swapped = []
    for sub in module.modules():
        if type(getattr(sub, "processor", None)) is CogVideoXAttnProcessor2_0:
            swapped.append((sub, sub.processor))
            sub.set_processor(DispatchCogVideoXAttnProcessor())
    return swapped


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


def compile_problem(spec, device: str) -> str:
    """Why regional compile cannot apply to the model on `device` ('' when it can): a family fact (families/)."""
    if not str(device).startswith("cuda"):
        return "regional compile is for CUDA GPUs (on the CPU the compile costs more than it saves)"
    if not spec.family_module.repeated_blocks:
        return (f"{spec.label} declares no repeated blocks (diffusers' compile_repeated_blocks needs them); "
                f"families with them: {', '.join(f.name for f in _families() if f.repeated_blocks)}")
    return ""


def _families():
    from families import FAMILIES

    return FAMILIES.values()


@dataclass(eq=False)
class RegionalCompile:
    """Modifier: each loaded denoiser's repeated block compiled (diffusers' compile_repeated_blocks: one compile
    reused for all 30 / 40 blocks). `remove` restores the eager forward (`_compiled_call_impl = None`); compiling
    the same blocks again later finds dynamo's cache (its entries live on the code object, guarded by the
    modules), so only a model's first run pays the compile."""

    device: str
    name: str = "compile"
    _on: list[torch.nn.Module] = field(default_factory=list)

    def added_bytes(self) -> int:
        return 0

    def apply(self, pipe) -> None:
        from engine.stepcache import denoisers_of

        if not str(self.device).startswith("cuda"):
            raise RuntimeError("regional compile is for CUDA GPUs")
        for _, module in denoisers_of(pipe):
            if any(m is module for m in self._on):
                continue
            module.compile_repeated_blocks(fullgraph=True)
            self._on.append(module)

    def remove(self, pipe) -> None:
        for module in self._on:
            for sub in module.modules():
                if getattr(sub, "_compiled_call_impl", None) is not None:
                    sub._compiled_call_impl = None
        self._on = []
