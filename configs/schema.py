"""Plain frozen dataclasses for the registry, presets, requests and plans.

Choices are `Literal` types; the UI and CLI derive their option lists from them
with `typing.get_args`, so there is one source of truth.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from families import ModelFamily, get_family

CONFIG_DIR = Path(__file__).resolve().parent

Task = Literal["t2v", "i2v", "v2v"]
Family = str  # a module of families/ ("cogvideox", "wan"): families.FAMILIES is the list
Offload = Literal["none", "model", "group", "sequential"]
OffloadChoice = Literal["auto", "none", "model", "group", "sequential"]
Quant = Literal["none", "int8", "fp8", "fp8-storage"]
PresetName = Literal["fast", "balanced", "quality"]
# Ways to fit host RAM, fastest first: everything in RAM at the model's dtype; the text encoder run first and
# freed; one expert of a two-expert model in RAM at a time; memory-mapped weights read in place (the kernel drops
# and re-reads their pages when RAM holds less than them); transformer weights stored in RAM at fp8; the
# transformer's weights streamed from disk.
HostRung = Literal["ram", "text-encoder-first", "one-expert", "in-place", "low-precision", "disk"]
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
    # component -> the dtype its weights are stored in (a local folder's safetensors headers); absent: the model's
    # default dtype. Weights stored in the dtype they load in are memory-mapped from their files (file-backed pages
    # the kernel may drop and read again), any other are converted into anonymous memory (vram_utils/estimate.py).
    stored_dtypes: dict[str, str] = field(default_factory=dict)
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
    context_parallel: int = 1  # processes sharing the denoise (diffusers' context parallel, engine/parallel.py)

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
    encoder_device: str = ""  # the text encoder's GPU when it runs apart from the transformer's ("": `device`)
    host_stages: dict[str, int] = field(default_factory=dict)  # stage -> predicted peak host RAM bytes
    host_budget_bytes: int = 0  # available host RAM the plan was fitted into (margin already taken off)
    host_limit: str = ""  # where that budget comes from: "machine 23.5 GiB" / "container limit 2.0 GiB (cgroup v1 /x)"
    # What must fit the host budget (the peak, or on the in-place rung anonymous memory + the layer computing), and
    # the host peak split into anonymous memory and memory-mapped weights (file pages the kernel may drop)
    host_need_bytes: int = 0
    predicted_anon_host_bytes: int = 0
    predicted_mapped_host_bytes: int = 0

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def task_experts(spec: ModelSpec, task: str) -> int:
    """Experts the (model, task) pipeline runs: 2 for a two-expert model's T2V and I2V; its V2V pipeline
    (diffusers' WanVideoToVideoPipeline has no `transformer_2`) runs the high-noise expert alone."""
    return 1 if task in spec.family_module.single_expert_tasks else spec.experts
