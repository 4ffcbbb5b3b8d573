"""The complete plan of a resolved run: the memory planner's rungs (vram_utils, pure) for exactly what the run
will apply, with the lines that only the engine can write (the step cache, the LoRAs, the finishing steps).

    plan = plan_run(run, device, cache)

Nothing is added to the plan after this returns; the runner applies what it says (engine/modifiers.py).
"""
from __future__ import annotations

import vram_utils
from configs.schema import Plan


def plan_run(run, device: "vram_utils.DeviceInfo | None" = None, cache=None) -> Plan:
    """`run`: an engine.resolve.ResolvedRun. `device`: the probe to plan for (default: this machine's). `cache`: the
    pipeline cache, whose weights already loaded for this run count as available (a second run of a cached model
    needs no second copy)."""
    from engine.finishing import with_finishing
    from engine.lora import lora_reason
    from engine.stepcache import denoising_steps, plan_note
    from vram_utils.archs import arch_for
    from vram_utils.estimate import step_cache_bytes, workload_for

    req, spec = run.request, run.spec
    # 1. The memory planner, for the request as resolved (its step cache is the one that will run).
    info = device if device is not None else vram_utils.probe()
    device_type = "cuda" if info.cuda and info.gpus else "cpu"
    resident = cache.resident_bytes(req.model, req.task, req.quant, device_type) if cache else 0
    resident_host = cache.resident_bytes(req.model, req.task, req.quant, "cpu") if cache else 0
    plan = vram_utils.plan(req, spec, info, resident_bytes=resident, resident_host_bytes=resident_host)
    # 2. Its lines for the modifiers it counted.
    reasons, summary = list(plan.reasons), plan.summary
    choice = run.step_cache
    if choice is not None and (choice.name != "off" or choice.note):
        kept = step_cache_bytes(arch_for(spec, req.task), workload_for(req, spec)) if choice.name != "off" else 0
        reasons.append(plan_note(choice, denoising_steps(req) or 1, kept))
        summary += f", step cache {choice.name}" if choice.name != "off" else ""
    if run.loras:
        reasons.append(lora_reason(run.loras, spec))
        summary += f", {len(run.loras)} LoRA{'s' if len(run.loras) > 1 else ''}"
    # 3. The finishing steps as stages of their own.
    return with_finishing(plan.replace(reasons=tuple(reasons), summary=summary), req)
