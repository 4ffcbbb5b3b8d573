"""Plain frozen dataclasses for the registry, presets, requests and plans.

Choices are `Literal` types; the UI and CLI derive their option lists from them
with `typing.get_args`, so there is one source of truth.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import yaml

from families import FAMILIES, ModelFamily, get_family

CONFIG_DIR = Path(__file__).resolve().parent

Task = Literal["t2v", "i2v", "v2v"]
Family = str  # a module of families/ ("cogvideox", "wan"): families.FAMILIES is the list
Offload = Literal["none", "model", "group", "sequential"]
OffloadChoice = Literal["auto", "none", "model", "group", "sequential"]
Quant = Literal["none", "int8", "fp8", "fp8-storage"]
PresetName = Literal["fast", "balanced", "quality"]
# Ways to fit host RAM, fastest first: everything in RAM at the model's dtype; the text encoder run first and
# freed; one expert of a two-expert model in RAM at a time; transformer weights stored in RAM at fp8; the
# transformer's weights streamed from disk.
HostRung = Literal["ram", "text-encoder-first", "one-expert", "low-precision", "disk"]
DType = Literal["float32", "float16", "bfloat16"]

TASKS: tuple[str, ...] = get_args(Task)
OFFLOADS: tuple[str, ...] = get_args(Offload)
QUANTS: tuple[str, ...] = get_args(Quant)
PRESETS: tuple[str, ...] = get_args(PresetName)
HOST_RUNGS: tuple[str, ...] = get_args(HostRung)

SEED_MAX = 2**32 - 1
MAX_SIDE_PX = 4096
MAX_PROMPT_CHARS = 10_000


class RequestError(ValueError):
    """A request value that is not allowed. The message names the value and what is allowed."""


@dataclass(frozen=True)
class TaskSpec:
    pipeline: str  # diffusers pipeline class name
    repo: str  # hub id, or "tiny-name/subfolder" for the offline family
    fixed_size: tuple[int, int] | None = None  # (height, width) where learned positional embeddings fix it


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: Family
    label: str
    default_dtype: DType
    resolutions: tuple[tuple[int, int], ...]  # (height, width) pairs
    default_frames: int
    max_frames: int
    fps: int
    size_multiple: int
    params: dict[str, int]
    tasks: dict[str, TaskSpec]
    download_gb: float = 0.0
    published_vram_gb: dict[str, float] = field(default_factory=dict)
    shared_weights: dict[str, str] = field(default_factory=dict)  # component -> weight group
    tiny: bool = False
    # Shapes and counts the memory planner needs (families.ModelFamily.arch): component -> config values,
    # component -> {"largest_leaf", "non_block", "block_leaf"} parameter counts.
    config: dict[str, dict] = field(default_factory=dict)
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    folder: str | None = None  # a local diffusers folder (configs/local.py), not a registry entry
    # Two-expert models (Wan 2.2 A14B): the high-noise expert (`transformer`) runs while the timestep is at or
    # above boundary_ratio * num_train_timesteps, the low-noise one (`transformer_2`) below.
    boundary_ratio: float | None = None

    @property
    def experts(self) -> int:
        """Transformers that take turns over the schedule: 2 for Wan 2.2 A14B (`transformer_2` counted), else 1."""
        return sum(name in self.params for name in self.family_module.denoisers)

    @property
    def family_module(self) -> ModelFamily:
        return get_family(self.family)

    @property
    def frame_step(self) -> int:
        return self.family_module.frame_step

    def component_parts(self) -> dict[str, dict[str, int]]:
        """`parts` with each component's total parameter count (from `params`) added as "total"."""
        return {c: {**self.parts.get(c, {}), "total": n} for c, n in self.params.items()}

    @property
    def default_resolution(self) -> tuple[int, int]:
        return self.resolutions[0]

    def frames_ok(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.frame_step == 0

    def snap_frames(self, frames: int) -> int:
        """The nearest frame count the family accepts (ties go down), within 1..max_frames."""
        step = self.frame_step
        k = max(0, round((frames - 1) / step - 1e-9))
        return min(k * step + 1, self.max_frames)

    def frame_rule_text(self) -> str:
        return f"{self.frame_step}k+1 (1, {1 + self.frame_step}, {1 + 2 * self.frame_step}, ...)"


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    guidance: float
    description: str = ""
    step_cache: str = "off"  # the step cache a request without its own choice gets (engine/stepcache.py)


@dataclass(frozen=True)
class DecodeSettings:
    """How the VAE decode runs. Pixel sizes are output pixels."""

    enable_vae_tiling: bool = True
    tile_x: int = 272
    tile_y: int = 272
    tile_stride_x: int = 144
    tile_stride_y: int = 128
    chunk_frames: int = 0  # latent frames per causal chunk; 0 = the VAE's own chunk size
    # At the default tiles the planner sizes them (untiled when the frame fits, else the largest that fit);
    # True: these tiles as set, even at the defaults. Other tile values, or tiling off, are always as set.
    fixed_tiles: bool = False


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of a request: a name from the LoRA folder, a path or a hub file, and its strength.
    `strength_2`: the low-noise expert's strength on a two-expert model (None: the same as `strength`)."""

    name: str
    strength: float = 1.0
    strength_2: float | None = None

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """`NAME_OR_PATH[:STRENGTH[:STRENGTH_LOW_NOISE]]` (the CLI's `--lora`); a path may hold colons."""
        parts, numbers = str(text).strip(), []
        while len(numbers) < 2 and ":" in parts:
            head, tail = parts.rsplit(":", 1)
            try:
                numbers.insert(0, float(tail))
            except ValueError:
                break
            parts = head
        if not parts:
            raise RequestError(f"--lora {text!r} has no name; use NAME_OR_PATH[:STRENGTH[:STRENGTH_LOW_NOISE]]")
        return cls(parts, *numbers)


LORA_STRENGTH_MAX = 4.0


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    task: Task
    prompt: str
    negative_prompt: str = ""
    frames: int | None = None  # None = the model's default
    height: int | None = None
    width: int | None = None
    fps: int | None = None
    steps: int | None = None  # None = the preset's
    guidance: float | None = None
    preset: PresetName = "balanced"
    seed: int = 0
    image: str | None = None  # path, i2v
    video: str | None = None  # path, v2v
    strength: float = 0.7
    offload: OffloadChoice = "auto"
    quant: Quant = "none"
    decode: DecodeSettings = DecodeSettings()
    guidance_2: float | None = None  # two-expert models: guidance of the low-noise expert (None: the same as guidance)
    upscale: int = 0  # finishing step after the decode: 0 off, 2 / 4 (postprocess/; the un-finished video is kept)
    interpolate: int = 0  # finishing step after upscale: 0 off, 2 / 4 (N frames -> (N-1) x factor + 1)
    loras: tuple[LoraChoice, ...] = ()  # adapters on the transformer(s), each with its strength (engine/lora.py)
    shift: float | None = None  # the flow-matching scheduler's shift (Wan; a distill LoRA's preset); None: the model's
    step_cache: str | None = None  # "off", "first-block[:threshold]", "taylorseer[:interval]", ...; None: the preset's
    attention: str = "auto"  # attention backend: auto / native / flash / sage (engine/attention.py)
    compile: bool = False  # regional compile of Wan's repeated blocks (CUDA only; the first run compiles)

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRequest":
        data = dict(data)
        if isinstance(data.get("decode"), dict):
            data["decode"] = DecodeSettings(**data["decode"])
        if "loras" in data:
            data["loras"] = tuple(LoraChoice(**c) if isinstance(c, dict) else c for c in data["loras"] or ())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Plan:
    """What the planner decided for one run, with a reason per choice."""

    offload: Offload = "none"
    quant: Quant = "none"
    decode: DecodeSettings = DecodeSettings()
    predicted_peak_gpu_bytes: int = 0
    predicted_peak_host_bytes: int = 0
    stages: dict[str, int] = field(default_factory=dict)  # stage -> predicted peak GPU bytes
    reasons: tuple[str, ...] = ()
    summary: str = ""
    # Added by the memory engine. `stages` holds the peak on the device that computes: the GPU, or host
    # RAM when `device` is "cpu".
    device: str = "cpu"  # "cuda:<index>" or "cpu"
    fits: bool = True  # False: nothing fits; the plan is the lowest rung and the suggestions say what would
    budget_bytes: int = 0  # free bytes the plan was fitted into (margin already taken off)
    peak_stage: str = ""  # the stage that sets the peak
    suggested_frames: int | None = None  # the largest frame count that fits, when the request does not
    suggested_model: str | None = None  # a smaller registry model that fits, when the request does not
    refused: str = ""  # set when even the lowest rung needs more than the device has in all: the run is refused
    # Host RAM, the second budget (issue "Fit the whole computer"). The host rung the planner chose, fastest
    # first (vram_utils/ladder.py HOST_RUNGS), and what it means for the run, as flags the runner and
    # vram_utils.apply_plan read (they never interpret the rung's name):
    host_rung: HostRung = "ram"
    release_text_encoder: bool = False  # encode the prompt first, free the text encoder before the transformer loads
    experts_in_ram: int = 0  # two-expert models: experts resident in RAM at once (1: load the second at the switch)
    disk_offload: bool = False  # transformer weights streamed from disk (group offload to $FITVIDEO_HOME/offload)
    host_stages: dict[str, int] = field(default_factory=dict)  # stage -> predicted peak host RAM bytes
    host_budget_bytes: int = 0  # available host RAM the plan was fitted into (margin already taken off)

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- registry


def _model_from_yaml(model_id: str, raw: dict) -> ModelSpec:
    tasks = {
        t: TaskSpec(spec["pipeline"], spec["repo"], tuple(spec["fixed_size"]) if spec.get("fixed_size") else None)
        for t, spec in raw["tasks"].items()
    }
    if raw["family"] not in FAMILIES:
        raise ValueError(f"models.yaml: {model_id} has family {raw['family']!r}; known: {', '.join(FAMILIES)}")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"models.yaml: {model_id} has unknown task(s) {sorted(unknown)}; allowed: {TASKS}")
    return ModelSpec(
        id=model_id,
        family=raw["family"],
        label=raw["label"],
        default_dtype=raw["default_dtype"],
        resolutions=tuple(tuple(r) for r in raw["resolutions"]),
        default_frames=int(raw["default_frames"]),
        max_frames=int(raw["max_frames"]),
        fps=int(raw["fps"]),
        size_multiple=int(raw["size_multiple"]),
        params={k: int(v) for k, v in raw["params"].items()},
        tasks=tasks,
        download_gb=float(raw.get("download_gb", 0.0)),
        published_vram_gb={k: float(v) for k, v in (raw.get("published_vram_gb") or {}).items()},
        shared_weights=dict(raw.get("shared_weights") or {}),
        tiny=bool(raw.get("tiny", False)),
        config={c: dict(v) for c, v in (raw.get("config") or {}).items()},
        boundary_ratio=float(raw["boundary_ratio"]) if raw.get("boundary_ratio") is not None else None,
        parts={c: {k: int(n) for k, n in v.items()} for c, v in (raw.get("parts") or {}).items()},
    )


@functools.cache
def load_registry(path: Path = CONFIG_DIR / "models.yaml") -> dict[str, ModelSpec]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return {model_id: _model_from_yaml(model_id, spec) for model_id, spec in raw.items()}


@functools.cache
def load_presets(path: Path = CONFIG_DIR / "presets.yaml") -> dict[str, Preset]:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    presets = {name: Preset(name=name, **spec) for name, spec in raw.items()}
    if set(presets) != set(PRESETS):
        raise ValueError(f"presets.yaml must define exactly {PRESETS}, found {sorted(presets)}")
    return presets


def get_model_spec(model: str) -> ModelSpec:
    """A registry model by id, or a local diffusers folder by path (configs/local.py)."""
    registry = load_registry()
    if model in registry:
        return registry[model]
    from configs import local

    if local.is_model_folder(model):
        return local.spec_from_folder(model)
    raise RequestError(
        f"unknown model {model!r}; known models: {', '.join(registry)}, or a local diffusers folder "
        "(one with model_index.json)"
    )


def models_for_task(task: str) -> list[str]:
    return [m for m, spec in load_registry().items() if task in spec.tasks]


# --------------------------------------------------------------------------- validation


def _check_number(name: str, value, lo: float, hi: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
        raise RequestError(f"{name}={value!r} is not allowed; {allowed}")


def resolve_request(req: GenerationRequest, *, check_files: bool = True) -> GenerationRequest:
    """Validate a request once, before anything loads, and fill its defaults.

    Raises RequestError naming the offending value and what is allowed. `check_files=False` leaves out the
    input image / video checks (a plan preview before anything is uploaded: the file does not change the plan).
    """
    # 1. What is asked of which model, in words.
    spec = get_model_spec(req.model)
    _check_task(req, spec)
    prompt = (req.prompt or "").strip()
    if not prompt:
        raise RequestError("prompt is empty; describe the video you want")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    if req.preset not in PRESETS:
        raise RequestError(f"preset={req.preset!r} is not allowed; choose one of {PRESETS}")
    preset = load_presets()[req.preset]
    # 2. The video's shape, within the family's rules and the model's sizes.
    frames = _frames(req, spec)
    height, width = _size(req, spec)
    # 3. Sampling and memory settings.
    fps = spec.fps if req.fps is None else req.fps
    _check_number("fps", fps, 1, 120, "use 1 to 120 frames per second")
    steps = preset.steps if req.steps is None else req.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise RequestError(f"steps={steps!r} is not allowed; use a whole number from 1 to 1000")
    guidance = preset.guidance if req.guidance is None else req.guidance
    _check_number("guidance", guidance, 0.0, 100.0, "use a number from 0 to 100")
    guidance_2 = _guidance_2(req, spec, guidance)
    _check_number("seed", req.seed, 0, SEED_MAX, f"use 0 to {SEED_MAX} (-1 for random in the UI)")
    if not isinstance(req.seed, int):
        raise RequestError(f"seed={req.seed!r} is not allowed; use a whole number from 0 to {SEED_MAX}")
    if req.offload not in get_args(OffloadChoice):
        raise RequestError(f"offload={req.offload!r} is not allowed; choose one of {get_args(OffloadChoice)}")
    if req.quant not in QUANTS:
        raise RequestError(f"quant={req.quant!r} is not allowed; choose one of {QUANTS}")
    # 4. The inputs the task needs.
    _check_inputs(req, check_files)
    check_decode(req.decode)
    check_finishing(req)
    _check_loras(req, spec)
    if req.shift is not None:
        if not spec.family_module.flow_shift:
            with_shift = ", ".join(f.name for f in FAMILIES.values() if f.flow_shift)
            raise RequestError(f"shift={req.shift!r} is not allowed for {spec.label}: its scheduler has no flow shift "
                               f"(families with one: {with_shift}); leave it out")
        _check_number("shift", req.shift, 0.1, 50.0, "use a number from 0.1 to 50 (Wan's default is 3 to 5)")
    return req.replace(
        prompt=prompt, frames=frames, height=height, width=width, fps=int(fps), steps=steps, guidance=float(guidance),
        guidance_2=guidance_2,
    )


FINISH_FACTORS = (0, 2, 4)  # 0 = the finishing step is off


def check_finishing(req: GenerationRequest) -> None:
    """The finishing steps' factors (postprocess/ checks the rest when it runs)."""
    for name in ("upscale", "interpolate"):
        value = getattr(req, name)
        if isinstance(value, bool) or value not in FINISH_FACTORS:
            raise RequestError(f"{name}={value!r} is not allowed; use 0 (off), 2 or 4")


def _check_loras(req: GenerationRequest, spec: ModelSpec) -> None:
    """The LoRA list's shape and strengths (engine/lora.py finds the files and checks they fit)."""
    if not isinstance(req.loras, tuple) or not all(isinstance(c, LoraChoice) for c in req.loras):
        raise RequestError(f"loras={req.loras!r} is not allowed; give a list of LoRAs, each a name and a strength")
    allowed = f"use a number from -{LORA_STRENGTH_MAX:g} to {LORA_STRENGTH_MAX:g} (1 = as trained, 0 = off)"
    for c in req.loras:
        _check_number(f"strength of LoRA {c.name!r}", c.strength, -LORA_STRENGTH_MAX, LORA_STRENGTH_MAX, allowed)
        if c.strength_2 is None:
            continue
        if task_experts(spec, req.task) < 2:
            raise RequestError(f"a low-noise strength for LoRA {c.name!r} is not allowed for {req.model} {req.task}: "
                               "it runs one transformer; per-expert strengths are for Wan 2.2 A14B t2v / i2v")
        _check_number(f"low-noise strength of LoRA {c.name!r}", c.strength_2, -LORA_STRENGTH_MAX, LORA_STRENGTH_MAX,
                      allowed)


def task_experts(spec: ModelSpec, task: str) -> int:
    """Experts the (model, task) pipeline runs: 2 for a two-expert model's T2V and I2V; its V2V pipeline
    (diffusers' WanVideoToVideoPipeline has no `transformer_2`) runs the high-noise expert alone."""
    return 1 if task in spec.family_module.single_expert_tasks else spec.experts


def _guidance_2(req: GenerationRequest, spec: ModelSpec, guidance: float) -> float | None:
    """The low-noise expert's guidance: only two-expert pipelines have one; None there means `guidance`."""
    if task_experts(spec, req.task) < 2:
        if req.guidance_2 is not None:
            raise RequestError(
                f"guidance_2={req.guidance_2!r} is not allowed for {req.model} {req.task}: it runs one transformer; "
                "a second guidance is for two-expert models (Wan 2.2 A14B t2v / i2v). Leave it out and use guidance"
            )
        return None
    guidance_2 = guidance if req.guidance_2 is None else req.guidance_2
    _check_number("guidance_2", guidance_2, 0.0, 100.0, "use a number from 0 to 100")
    return float(guidance_2)


def _check_task(req: GenerationRequest, spec: ModelSpec) -> None:
    if req.task not in TASKS:
        raise RequestError(f"task={req.task!r} is not allowed; choose one of {TASKS}")
    if req.task not in spec.tasks:
        raise RequestError(
            f"model {req.model!r} has no {req.task} pipeline; it serves: {', '.join(spec.tasks)}. "
            f"Models with {req.task}: {', '.join(models_for_task(req.task))}"
        )


def _frames(req: GenerationRequest, spec: ModelSpec) -> int:
    frames = spec.default_frames if req.frames is None else req.frames
    if isinstance(frames, bool) or not isinstance(frames, int) or not spec.frames_ok(frames) or frames > spec.max_frames:
        raise RequestError(
            f"frames={frames!r} is not allowed for {spec.family} models; use {spec.frame_rule_text()} "
            f"up to {spec.max_frames} (nearest: {spec.snap_frames(frames) if isinstance(frames, int) else spec.default_frames})"
        )
    return frames


def _size(req: GenerationRequest, spec: ModelSpec) -> tuple[int, int]:
    height, width = spec.default_resolution
    height = height if req.height is None else req.height
    width = width if req.width is None else req.width
    for name, value in (("height", height), ("width", width)):
        m = spec.size_multiple
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m or value > MAX_SIDE_PX:
            raise RequestError(
                f"{name}={value!r} is not allowed; use a positive multiple of {m} up to {MAX_SIDE_PX} "
                f"(this model's sizes: {', '.join(f'{h}x{w}' for h, w in spec.resolutions)})"
            )
    fixed = spec.tasks[req.task].fixed_size
    if fixed and (height, width) != fixed:
        raise RequestError(
            f"size {height}x{width} is not allowed for {req.model} {req.task}: its learned positional "
            f"embeddings fix the size at {fixed[0]}x{fixed[1]}"
        )
    return height, width


def _check_inputs(req: GenerationRequest, check_files: bool) -> None:
    if req.task == "i2v" and check_files:
        _check_input_file("image", req.image)
    if req.task == "v2v":
        if check_files:
            _check_input_file("video", req.video)
        _check_number("strength", req.strength, 0.0, 1.0, "use a number from 0 to 1")


def _check_input_file(name: str, path: str | None) -> None:
    if not path:
        raise RequestError(f"{name} is missing; the task needs an input {name} file")
    p = Path(path)
    if not p.is_file():
        raise RequestError(f"{name} file {path!r} does not exist")
    if p.stat().st_size == 0:
        raise RequestError(f"{name} file {path!r} is empty (0 bytes)")


def check_decode(d: DecodeSettings, min_px: int = 32, max_px: int | None = MAX_SIDE_PX) -> None:
    """Decode settings a person may ask for (32 to 4096 px). The streaming decode itself takes any positive
    size (`min_px=1, max_px=None`): its own out-of-memory steps may go below what a person is offered."""
    for name in ("tile_x", "tile_y", "tile_stride_x", "tile_stride_y"):
        value = getattr(d, name)
        if (isinstance(value, bool) or not isinstance(value, int) or value < min_px
                or (max_px is not None and value > max_px)):
            allowed = f"from {min_px} to {max_px}" if max_px is not None else f"from {min_px} up"
            raise RequestError(f"{name}={value!r} is not allowed; use whole pixels {allowed}")
    if d.tile_stride_x > d.tile_x or d.tile_stride_y > d.tile_y:
        raise RequestError(
            f"tile stride ({d.tile_stride_x}x{d.tile_stride_y}) larger than the tile ({d.tile_x}x{d.tile_y}) "
            "would leave gaps; use a stride no larger than the tile"
        )
    if isinstance(d.chunk_frames, bool) or not isinstance(d.chunk_frames, int) or d.chunk_frames < 0:
        raise RequestError(f"chunk_frames={d.chunk_frames!r} is not allowed; use 0 (automatic) or a positive count")
