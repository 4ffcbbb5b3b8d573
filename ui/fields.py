"""A GenerationRequest <-> flat fields, written once for the page, its API and the CLI.

Field names are the API parameter names (`Client(url).predict(prompt=..., resolution="480x720", ...)`);
the CLI's `vars(args)` uses the same names, with `height` / `width` instead of `resolution`. Conversion
only: values are passed on as they came (whole floats become ints), and `configs.schema.resolve_request`
checks them and names any that is not allowed.
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Mapping

from configs.schema import SEED_MAX, DecodeSettings, GenerationRequest, LoraChoice, RequestError

REQUEST_FIELDS = (
    "model", "prompt", "negative_prompt", "seed", "preset", "steps", "guidance", "frames", "fps", "resolution",
    "image", "video", "strength", "guidance_2",  # last: API clients that pass fields by position keep working
    "upscale", "interpolate",  # finishing steps (0 off, 2, 4), after every older field for the same reason
    "loras", "shift",  # LoRAs (rows: name, strength, low-noise strength) and the scheduler shift, last again
)
# Flat field -> DecodeSettings field. `chunk_frames` is a CLI flag only; the page does not offer it.
DECODE_FIELDS = {
    "vae_tiling": "enable_vae_tiling", "tile_x": "tile_x", "tile_y": "tile_y", "tile_stride_x": "tile_stride_x",
    "tile_stride_y": "tile_stride_y", "chunk_frames": "chunk_frames", "fixed_tiles": "fixed_tiles",
}
TILE_FIELDS = ("tile_x", "tile_y", "tile_stride_x", "tile_stride_y")
FIELDS = (*REQUEST_FIELDS, "offload", "quant", "vae_tiling", *TILE_FIELDS, "step_cache", "attention", "compile",
          "fixed_tiles")  # appended last, like every field after the first ones
DEFAULTS = GenerationRequest(model="", task="t2v", prompt="")  # the request's own defaults, for absent fields


def whole(value: Any) -> Any:
    """UI numbers arrive as floats: whole ones become int, anything else passes on as is for the check to name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _real(value: Any) -> Any:
    """A number as float (guidance, strength); anything else as is, for the check to name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def pick_seed(seed: Any) -> Any:
    """-1 means a random seed over the full 32-bit range."""
    seed = whole(seed)
    return secrets.randbelow(SEED_MAX + 1) if seed == -1 else seed


def parse_resolution(text: str) -> tuple[int, int]:
    """'480x720' -> (height=480, width=720)."""
    try:
        h, w = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise RequestError(f"resolution={text!r} is not allowed; use HEIGHTxWIDTH such as 480x720") from None
    return h, w


def format_resolution(height: int | None, width: int | None) -> str | None:
    return None if height is None or width is None else f"{height}x{width}"


def decode_overrides(fields: Mapping[str, Any]) -> dict[str, Any]:
    """DecodeSettings field -> value for the decode fields given; an absent or None field is left out."""
    out = {}
    for name, attr in DECODE_FIELDS.items():
        value = fields.get(name)
        if value is not None:
            out[attr] = bool(value) if name in ("vae_tiling", "fixed_tiles") else whole(value)
    return out


def decode_from_fields(fields: Mapping[str, Any], base: DecodeSettings = DecodeSettings()) -> DecodeSettings:
    """Decode settings from flat fields; an absent or None field keeps `base`'s value."""
    return dataclasses.replace(base, **decode_overrides(fields))


def request_from_fields(task: str, fields: Mapping[str, Any], seed: int | None = None) -> GenerationRequest:
    """Flat fields -> a GenerationRequest. An absent or None field takes the request's default (the model's or the
    preset's where the request leaves it None); `seed`, when given, replaces the seed field."""
    def get(name: str) -> Any:
        value = fields.get(name)
        return getattr(DEFAULTS, name) if value is None else value

    if fields.get("resolution"):
        height, width = parse_resolution(fields["resolution"])
    else:
        height, width = whole(fields.get("height")), whole(fields.get("width"))
    return GenerationRequest(
        model=get("model"), task=task, prompt=get("prompt"), negative_prompt=get("negative_prompt"),
        frames=whole(get("frames")), height=height, width=width, fps=whole(get("fps")), steps=whole(get("steps")),
        guidance=_real(get("guidance")), guidance_2=_real(get("guidance_2")), preset=get("preset"),
        seed=whole(get("seed")) if seed is None else seed,
        image=fields.get("image") or None, video=fields.get("video") or None, strength=_real(get("strength")),
        offload=get("offload"), quant=get("quant"), decode=decode_from_fields(fields),
        upscale=whole(get("upscale")), interpolate=whole(get("interpolate")),
        loras=loras_from_field(fields.get("loras")), shift=_real(fields.get("shift")) or None,  # 0: the model's
        step_cache=fields.get("step_cache") or None,  # None / "": the motion preset's
        attention=fields.get("attention") or "auto", compile=bool(fields.get("compile") or False),
        context_parallel=whole(get("context_parallel")),
    )


def loras_from_field(value: Any) -> tuple[LoraChoice, ...]:
    """The `loras` field: rows [name, strength, low-noise strength] (the page's table, an API list), a table's
    {"data": rows} value, "NAME[:STRENGTH[:STRENGTH_LOW_NOISE]]" strings (the CLI's --lora), or LoraChoices.
    Rows without a name are skipped; an empty strength is 1, an empty low-noise strength follows strength."""
    if value is None or isinstance(value, str) and not value.strip():
        return ()
    if isinstance(value, Mapping):
        value = value.get("data") or []
    if hasattr(value, "values") and hasattr(value, "columns"):  # a pandas DataFrame (gradio's table value)
        value = value.values.tolist()
    if isinstance(value, str):
        value = [value]
    choices = []
    for row in value:
        if isinstance(row, LoraChoice):
            choices.append(row)
        elif isinstance(row, str):
            choices.append(LoraChoice.parse(row))
        elif isinstance(row, Mapping):
            choices.append(LoraChoice(**row))
        elif isinstance(row, (list, tuple)) and row and str(row[0] or "").strip():
            strength = _blank(row[1] if len(row) > 1 else None)
            low = _blank(row[2] if len(row) > 2 else None)
            choices.append(LoraChoice(str(row[0]).strip(), 1.0 if strength is None else _real(strength),
                                      None if low is None else _real(low)))
        elif not isinstance(row, (list, tuple)):
            raise RequestError(f"loras entry {row!r} is not allowed; give [name, strength] or 'name:strength'")
    return tuple(choices)


def _blank(value: Any) -> Any:
    """None for an empty table cell ('' / None / NaN)."""
    if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value):
        return None
    return float(value) if isinstance(value, str) else value


def loras_to_field(req: GenerationRequest) -> list[list]:
    """A request's LoRAs as the table's rows (Reuse settings)."""
    return [[c.name, c.strength, c.strength_2] for c in req.loras]


def fields_from_request(req: GenerationRequest) -> dict[str, Any]:
    """A GenerationRequest -> its flat fields (API parameter names), the inverse of request_from_fields."""
    d = req.decode
    return {
        "model": req.model, "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
        "preset": req.preset, "steps": req.steps, "guidance": req.guidance, "guidance_2": req.guidance_2,
        "frames": req.frames, "fps": req.fps,
        "resolution": format_resolution(req.height, req.width), "image": req.image, "video": req.video,
        "strength": req.strength, "offload": req.offload, "quant": req.quant, "vae_tiling": d.enable_vae_tiling,
        "tile_x": d.tile_x, "tile_y": d.tile_y, "tile_stride_x": d.tile_stride_x, "tile_stride_y": d.tile_stride_y,
        "upscale": req.upscale, "interpolate": req.interpolate, "loras": loras_to_field(req), "shift": req.shift,
        "step_cache": req.step_cache or "", "attention": req.attention, "compile": req.compile,  # "": the preset's
        "fixed_tiles": d.fixed_tiles, "context_parallel": req.context_parallel,
    }
