"""The API endpoints for programs: `/t2v`, `/i2v`, `/v2v` (queue a job, wait, return its video) and `/plan_t2v`...
(the plan for some settings), typed by the request's fields, not by the page's widgets.

    Client(url).predict(prompt="a cat", model="tiny-wan", loras=["style:0.8"], api_name="/t2v")
        -> (video file, seed used, what happened (markdown), job id)

Why not the page's own events: a widget checks a value against what it shows (the default model's resolutions, a
slider's maximum, a table's layout) before our code runs, so a request for another model, steps=500 or a LoRA list
ended in Gradio's opaque "upstream Gradio app has raised an exception". Here every parameter is checked once, by
engine/resolve.py, against the model the request names, with the same words as the page and the CLI.

A parameter left out is sent by gradio_client as its default, so defaults here mean "unset" wherever the request
has an unset: `steps`, `guidance`, `frames`, `fps`, `resolution` default to None (the preset's / the model's), so
`preset="fast"` means the same as on the CLI; an explicit value wins over the preset's.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

# name -> (type, default). The order is REQUEST_FIELDS' then the Optimization fields' (ui/fields.py FIELDS): clients
# that pass fields by position keep working. Task-specific fields (image, video, strength, guidance_2) appear only
# on the endpoints of the tasks that take them.
FILE = dict | str | None  # an upload: gradio_client's handle_file(path) (a FileData dict), or a server-side path
API_FIELDS: dict[str, tuple[Any, Any]] = {
    "model": (str | None, None), "prompt": (str, ""), "negative_prompt": (str, ""), "seed": (int, -1),
    "preset": (str, "balanced"), "steps": (int | None, None), "guidance": (float | None, None),
    "frames": (int | None, None), "fps": (int | None, None), "resolution": (str | None, None),
    "image": (FILE, None), "video": (FILE, None), "strength": (float, 0.7), "guidance_2": (float | None, None),
    "upscale": (int, 0), "interpolate": (int, 0), "loras": (list | str | dict | None, None),
    "shift": (float | None, None), "offload": (str, "auto"), "quant": (str | None, None),
    "vae_tiling": (bool, True), "tile_x": (int | None, None), "tile_y": (int | None, None),
    "tile_stride_x": (int | None, None), "tile_stride_y": (int | None, None), "step_cache": (str | None, None),
    "attention": (str, "auto"), "compile": (bool, False), "fixed_tiles": (bool, False),
    "context_parallel": (int | None, None),  # None: the server's --context-parallel
}
ONLY_FOR = {"image": "i2v", "video": "v2v", "strength": "v2v"}


def fields_for(task: str) -> list[str]:
    return [n for n in API_FIELDS if ONLY_FOR.get(n, task) == task]


@dataclass(frozen=True)
class Endpoint:
    """One API endpoint: its name, the function gradio calls, its description."""

    api_name: str
    fn: Callable
    description: str
    job: bool = True  # it queues a job: in the page's job concurrency group (else it runs at once, unqueued)


def typed(impl: Callable, task: str, returns: Any, name: str) -> Callable:
    """`impl(values: dict, request)` as a function with the task's fields as typed, defaulted keyword parameters
    (gr.api reads the signature and the hints) and a gr.Request gradio fills in."""
    import gradio as gr

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=API_FIELDS[n][1],
                                annotation=API_FIELDS[n][0]) for n in fields_for(task)]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                    annotation=gr.Request))
    signature = inspect.Signature(params, return_annotation=returns)

    async def endpoint(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        return await impl(values, values.pop("request"))

    endpoint.__signature__ = signature
    endpoint.__annotations__ = {p.name: p.annotation for p in params} | {"return": returns}
    endpoint.__name__ = name
    return endpoint


def with_defaults(values: dict, task: str, default_model: str, default_quant: str) -> dict:
    """The API's unset model and precision as the page's defaults (the tab's first model, the server's --int8)."""
    return {**values, "model": values.get("model") or default_model, "quant": values.get("quant") or default_quant,
            "step_cache": values.get("step_cache") or None}


def register(endpoints: list[Endpoint], waiting_jobs: int) -> None:
    """gr.api for each endpoint, in the Blocks being built. Endpoints that queue a job share the page's Generate
    buttons' concurrency group ("jobs", `waiting_jobs` + 1 at once: they only wait; the job queue runs one job at a
    time); the others answer at once."""
    import gradio as gr

    for e in endpoints:
        group = dict(concurrency_id="jobs", concurrency_limit=waiting_jobs + 1) if e.job else dict(queue=False)
        gr.api(e.fn, api_name=e.api_name, api_description=e.description, **group)
