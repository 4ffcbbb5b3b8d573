"""Resolve once: a request becomes a `ResolvedRun`, and every refusal happens here, before a job is queued or
anything loads, in the same words on every surface (the page, its API, the CLI, the queue).

    run = resolve(request)             # RequestError naming the value and what is allowed
    plan = runner.plan(run)            # the complete plan (engine/planning.py)
    runner.generate(run)               # applies exactly what `run` and `plan` say

What a resolved run fixes: the request with every default filled (the model's size and frames, the preset's
steps, guidance and step cache, the attention backend that runs here), the model's spec with its LoRAs' parameters
counted into the transformers, the LoRA files found and checked against the model, the step cache (or why the
preset's is off for this family and task), the finishing steps, and what the person should know before it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from configs.schema import GenerationRequest, ModelSpec, RequestError, task_experts
from configs.registry import get_model_spec
from configs.validate import resolve_request


@dataclass(frozen=True)
class ResolvedRun:
    """One request, resolved. `request.step_cache` is the cache in effect ("off" or its name[:number]) and
    `request.attention` the backend that runs, so the planner counts and the runner applies the same thing."""

    request: GenerationRequest
    spec: ModelSpec  # LoRA parameters counted into the transformers they sit in
    loras: tuple = ()  # engine.lora.ActiveLora, found and checked
    step_cache: object = None  # engine.stepcache.StepCacheChoice
    finishing: tuple = ()  # engine.finishing.FinishStep, in order
    notes: tuple[str, ...] = ()  # what the person is told before it runs (a still image held, a preset's cache off)

    @property
    def attention(self) -> str:
        return self.request.attention

    @property
    def experts(self) -> int:
        return task_experts(self.spec, self.request.task)


def resolve(request: GenerationRequest | ResolvedRun, *, check_files: bool = True,
            input_names: dict[str, str] | None = None) -> ResolvedRun:
    """Check and complete `request` (a ResolvedRun passes through). `check_files=False`: the input image / video
    are not read (a plan before anything is uploaded). `input_names`: what the person calls an uploaded file
    ("image" / "video" -> name), for the messages."""
    from engine import attention, parallel, stepcache
    from engine.finishing import check_steps, steps_from_request
    from engine.lora import resolve_loras, with_lora_params

    if isinstance(request, ResolvedRun):
        return request
    # 1. The fields: task, prompt, shape, sampling, memory settings (configs/schema.py names any bad value).
    req = resolve_request(request, check_files=check_files)
    spec = get_model_spec(req.model)
    # 2. The inputs, read as the run will read them.
    notes = _check_inputs(req, input_names or {}) if check_files else []
    # 3. The modifiers: LoRA files against this model, the step cache for this family and task, the attention
    # backend and regional compile on this machine.
    loras = resolve_loras(req.loras, spec, req.task)
    shared = parallel.problem(spec, req.task, req.context_parallel)
    if shared:
        raise RequestError(f"context_parallel={req.context_parallel}: {shared}")
    cache = stepcache.choose(req, spec)
    if cache.note:
        notes.append(cache.note)
    backend = attention.resolve_backend(req.attention)
    if req.compile:
        problem = attention.compile_problem(spec, _execution_device())
        if problem:
            raise RequestError(f"compile=True: {problem}")
    # 4. Finishing steps after the decode.
    finishing = steps_from_request(req)
    check_steps(finishing)
    return ResolvedRun(req.replace(step_cache=cache.text, attention=backend), with_lora_params(spec, loras), loras,
                       cache, tuple(finishing), tuple(notes))


def _check_inputs(req: GenerationRequest, names: dict[str, str]) -> list[str]:
    """The input image / video read (RequestError naming the file as the person knows it), and what the run will
    say about it (a still image given as the video is held for every frame)."""
    from engine.media import check_image, check_video

    if req.task == "i2v":
        check_image(req.image, name=names.get("image"))
    elif req.task == "v2v":
        return check_video(req.video, req.frames, name=names.get("video"))
    return []


def _execution_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
