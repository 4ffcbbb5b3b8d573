"""Host RAM per rung on the CPU, and the time of a denoising step with the weights streamed from disk vs in RAM.

The model is a full-width, reduced-depth Wan 2.1 14B transformer (diffusers' `WanTransformer3DModel` with the
14B config: 40 heads x 128 = 5120 hidden, ffn 13824, text 4096; `--blocks` of its 40 blocks, 4 by default:
3.05 GiB of random bf16 weights), saved once with `save_pretrained`. It is built on the meta device and
materialised tensor by tensor in bf16, so the builder never holds the weights twice.

Each case runs in a fresh child process (`--child`), after the model's and the offload folder's pages are
dropped from the page cache (fsync + POSIX_FADV_DONTNEED on those files only), so each reads from the disk
as a first run would. A case loads the transformer the way its rung holds it, places it with
`vram_utils.apply_plan` and denoises one step (one transformer forward: `--latent-frames` x `--latent-height` x
`--latent-width` latents, `--text-tokens` prompt tokens). It reports its peak anonymous memory (RssAnon,
sampled every 10 ms: what a RAM cap cannot reclaim) and peak RSS with mapped files (VmHWM) above what it had
before loading, the RSS after placing, the step time and the output.

  ram            weights in anonymous RAM at bf16, read tensor by tensor (`load_into_ram`): what the planner's
                 `ram` rung counts
  in-place       loaded as the pipeline cache does (memory-mapped safetensors pages, read in place), uncapped and
                 then under RAM caps of its start + 1.0x, 0.5x, 0.25x the weight bytes (`--caps`): two steps each,
                 the second showing what re-reading dropped pages costs (the planner's in-place rung)
  low-precision  loaded as the pipeline cache does (memory-mapped), then stored as fp8 (quant.apply
                 "fp8-storage"), cast layer by layer
  disk           `plan.disk_offload`: group offload, one block per group, to $FITVIDEO_HOME/offload

and the rungs that free a component before the next one loads (bench/host_ram_stages.py), each next to the
`ram` rung holding the same components at once, every weight in anonymous RAM as `ram` reads it:

  ram+text-encoder    a full-width UMT5-XXL text encoder (`--encoder-layers` of its 24, 2 by default: 2.67 GiB,
                      2 GiB of it the 256384 x 4096 embedding) and the transformer both loaded, then the prompt
                      encoded (`--encoder-tokens`, Wan's 512) and one step
  text-encoder-first  the encoder loaded, the prompt encoded, the encoder freed, then the transformer loaded
                      and one step: the peak is the larger of the two, not the sum
  ram+experts         Wan 2.2 A14B's two experts (two stacks of `--expert-blocks`, 2 by default: 1.74 GiB each,
                      different weights) both loaded, one step with each
  one-expert          the high-noise expert loaded, one step, freed, then the low-noise expert loaded, one step

The predicted host peak of each rung is the planner's estimator (`vram_utils.estimate.estimate`, which fills
`plan_for(...).host_stages`) run on the Wan 2.1 14B registry entry cut to the same blocks, without text
encoder or VAE weights (`predicted()`; for the free-before-load rungs Wan 2.1 14B with the encoder cut to the
built one, or Wan 2.2 A14B with both experts cut to the built stack: `host_ram_stages.predicted_stages`, the
larger of the "text" and "denoise" host stages); it is compared with the anonymous peak (what a RAM cap cannot
reclaim) and with the peak RSS including memory-mapped file pages (page cache a cap can reclaim).

    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/host_ram.py
    flock /tmp/fitvideo-heavy.lock .venv/bin/python bench/host_ram.py \
        --rungs ram,ram+text-encoder,text-encoder-first,ram+experts,one-expert

tests/test_host_ram.py imports the builder, the child and the cgroup-v1 RAM cap from here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
# diffusers' Wan 2.1 T2V 14B transformer config (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json)
WAN_14B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)
# disk twice: the first run writes the files, the second reuses them. "low-precision" is also accepted: left out
# by default while quant.apply("fp8-storage") picks float32 as the compute dtype of a bf16 Wan transformer (its
# first parameter, scale_shift_table, is kept in float32) and the step fails on a dtype mismatch. Then the
# free-before-load rungs, each after the `ram` case that holds the same components (bench/host_ram_stages.py).
RUNGS = ("ram", "in-place", "disk", "disk", "ram+text-encoder", "text-encoder-first", "ram+experts", "one-expert")
CAPS = (1.0, 0.5, 0.25)  # the in-place rung under a RAM cap of its start + this share of the weight bytes


# --------------------------------------------------------------------------- the model


def random_bf16_model(cls, config: dict, blocks: int, seed: int = 0, pool_size: int = 1 << 24):
    """A `blocks`-deep `cls(**config)` with random bf16 weights, built on meta and materialised one tensor at a
    time from a shared random pool (a 3 GiB model in about 20 s on 2 cores instead of minutes of randn), so RAM
    holds the weights once. bench/lora.py builds its transformers with it too."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta, the rope tables real
            model = cls(num_layers=blocks, **config)
    finally:
        torch.set_default_dtype(previous)
    pool = (torch.randn(pool_size, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    for i, (name, param) in enumerate(list(model.named_parameters())):
        n = param.numel()
        values = torch.roll(pool, (i * 7919) % pool.numel()).repeat(-(-n // pool.numel()))[:n]
        set_module_tensor_to_device(model, name, "cpu", value=values.reshape(param.shape), dtype=torch.bfloat16)
    return model


def build_stack(folder: Path, blocks: int, seed: int = 0) -> int:
    """Save a `blocks`-deep Wan 14B-width transformer with random bf16 weights (from `seed`) to `folder`; returns
    its weight bytes."""
    from diffusers import WanTransformer3DModel

    model = random_bf16_model(WanTransformer3DModel, WAN_14B_CONFIG, blocks, seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder)
    return weight_bytes


def build_pipeline(folder: Path, blocks: int, seed: int = 0) -> int:
    """A Wan T2V pipeline folder around the `blocks`-deep 14B-width stack (`build_stack`), with a tiny VAE (tiny-wan's
    architecture), a 4096-wide two-layer UMT5 text encoder (the width the transformer reads) and a 32-token
    tokenizer, all stored in bf16 so every component loads memory-mapped: what `app.py generate --model FOLDER`
    runs. Returns the transformer's weight bytes."""
    import json

    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from families.tiny import make_tokenizer, t5_config

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(32)
    config = t5_config(UMT5Config, len(tokenizer))
    config.d_model = WAN_14B_CONFIG["text_dim"]
    parts = dict(
        tokenizer=tokenizer, text_encoder=UMT5EncoderModel(config).to(torch.bfloat16),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]).to(torch.bfloat16),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=3.0),
    )
    WanPipeline(transformer=None, **parts).save_pretrained(folder)
    weight_bytes = build_stack(folder / "transformer", blocks, seed)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "WanTransformer3DModel"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return weight_bytes


def drop_page_cache(paths) -> None:
    """Write back and drop these files' pages from the page cache (only theirs), so the next read comes from
    the disk and is charged to whoever reads it: a RAM cap then sees a first run's reads."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Holder:
    """The one component a pipeline would hand `vram_utils.apply_plan`, under the name it has there."""

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def components(self) -> dict:
        return {"transformer": self.transformer}

    def to(self, device) -> "_Holder":
        self.transformer.to(device)
        return self


def load_into_ram(model_dir: str):
    """The transformer with its weights in anonymous RAM, read tensor by tensor with plain file reads (no
    memory map, no second copy): the weights in RAM that the planner's `ram` rung counts. A plain
    `from_pretrained` keeps bf16 weights memory-mapped instead (page cache), and `disable_mmap=True` reads the
    whole file into one buffer first (twice the weights at the peak)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(model_dir)
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(config)
    keep = WanTransformer3DModel._keep_in_fp32_modules or []  # float32 in from_pretrained(torch_dtype=bf16) too
    for name, value in tensors_of(model_dir):
        dtype = torch.float32 if any(k in name.split(".") for k in keep) else value.dtype
        set_module_tensor_to_device(model, name, "cpu", value=value, dtype=dtype)
    return model.eval()


def tensors_of(model_dir: str):
    """(name, tensor) for every tensor of a safetensors folder, each read with a plain file read into its own
    anonymous buffer (no memory map, no second copy)."""
    import torch

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                buf = torch.empty(end - start, dtype=torch.uint8)
                f.seek(8 + header_len + start)
                f.readinto(memoryview(buf.numpy()))
                yield name, buf.view(dtypes[info["dtype"]]).reshape(info["shape"])


def _load(model_dir: str, rung: str):
    import torch
    from diffusers import WanTransformer3DModel

    import quant
    import vram_utils
    from configs.schema import DecodeSettings, Plan

    if rung == "ram":
        model = load_into_ram(model_dir)
    else:  # as the pipeline cache loads: memory-mapped, then quantized (fp8 copies) or written to group files
        model = WanTransformer3DModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    if rung == "low-precision":
        quant.apply(model, "fp8-storage")
    plan = Plan(offload="none", device="cpu", disk_offload=rung == "disk", decode=DecodeSettings(enable_vae_tiling=False))
    vram_utils.apply_plan(_Holder(model), plan)
    return model


class _AnonPeak:
    """The peak of RssAnon (memory no page-cache reclaim can take back: what a RAM cap binds on), sampled."""

    def __init__(self, interval_s: float = 0.01):
        import threading

        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = _status_bytes("RssAnon")
            with self._lock:
                self.peak = max(self.peak, now)

    def mark(self) -> int:
        """The peak so far (this phase's); the next phase's peak is sampled from now on."""
        now = _status_bytes("RssAnon")
        with self._lock:
            peak, self.peak = max(self.peak, now), 0
        return peak

    def __enter__(self) -> "_AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))


def child(args: argparse.Namespace) -> dict:
    """One case in this (fresh) process: load as the rung holds it, place it, one step; what it measured."""
    import torch

    from bench import host_ram_stages

    if args.child in host_ram_stages.CASES:
        return host_ram_stages.stages_child(args)

    torch.set_num_threads(args.threads)
    from vram_utils.offload import offload_root

    drop_page_cache([*Path(args.model).glob("*.safetensors"), *offload_root().glob("*/*.safetensors")])
    import diffusers  # noqa: F401  (imports before the baseline: they are not the rung's)
    import quant  # noqa: F401

    start, start_anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, args.latent_frames, args.latent_height, args.latent_width, generator=g)  # (B, C, F, H, W)
    text = torch.randn(1, args.text_tokens, 4096, generator=g) * 0.1  # (B, L, D)
    with _AnonPeak() as anon:
        t0 = time.perf_counter()
        model = _load(args.model, args.child)
        place_s = time.perf_counter() - t0
        placed = _status_bytes("VmRSS")
        steps = []
        with torch.inference_mode():
            for _ in range(max(1, args.repeat)):  # the first step reads from the disk; later ones re-read what dropped
                t0 = time.perf_counter()
                out = model(latents.to(torch.bfloat16), torch.tensor([500]), text.to(torch.bfloat16),
                            return_dict=False)[0]
                steps.append(time.perf_counter() - t0)
    if args.out:
        torch.save(out.float(), args.out)
    return dict(rung=args.child, start_rss=start, placed_rss=placed, peak_rss=_status_bytes("VmHWM"),
                start_anon=start_anon, peak_anon=anon.peak, place_s=place_s, step_s=steps[-1], first_step_s=steps[0])


# --------------------------------------------------------------------------- a RAM cap (cgroup v1)


def cgroup_v1_problem() -> str:
    """Why a cgroup-v1 memory cap cannot be set here ('' when it can)."""
    if os.geteuid() != 0:
        return f"capping RAM needs root (cgroup v1 memory controller); running as uid {os.geteuid()}"
    if not (CGROUP_V1_MEMORY / "cgroup.procs").is_file():
        return f"no cgroup-v1 memory controller at {CGROUP_V1_MEMORY} (cgroup v2 only, or not mounted)"
    if not os.access(CGROUP_V1_MEMORY, os.W_OK):
        return f"{CGROUP_V1_MEMORY} is not writable"
    return ""


@contextlib.contextmanager
def memory_cgroup(name: str, limit_bytes: int):
    """A cgroup-v1 memory group capping resident memory + page cache at `limit_bytes`; removed on exit."""
    group = CGROUP_V1_MEMORY / name
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        yield group
    finally:
        group.rmdir()


def run_child(rung: str, args: argparse.Namespace, cap_bytes: int | None = None, out: Path | None = None,
              env: dict | None = None) -> dict:
    """Run one case in a fresh process (under a RAM cap when `cap_bytes`): returncode, its report, and the
    cgroup's max usage (page cache included)."""
    cmd = [sys.executable, str(Path(__file__)), "--child", rung, "--model", str(args.model),
           "--threads", str(args.threads), "--latent-frames", str(args.latent_frames),
           "--latent-height", str(args.latent_height), "--latent-width", str(args.latent_width),
           "--text-tokens", str(args.text_tokens), "--out", str(out or ""), "--repeat", str(getattr(args, "repeat", 1))]
    for flag in ("encoder", "experts", "encoder_tokens"):  # the free-before-load cases' (bench/host_ram_stages.py)
        if getattr(args, flag, None):
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    full_env = {**os.environ, **(env or {})}
    if cap_bytes is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env, check=False)
        return _report(proc, None)
    with memory_cgroup(f"fitvideo-{rung}-{os.getpid()}", cap_bytes) as group:
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: everything it runs is capped
            Path(procs).write_text(str(os.getpid()))

        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env, check=False,
                              preexec_fn=enter)
        return _report(proc, int((group / "memory.max_usage_in_bytes").read_text()))


def _report(proc: subprocess.CompletedProcess, group_max: int | None) -> dict:
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    result = json.loads(line[len("RESULT "):]) if line else {}
    return dict(result, returncode=proc.returncode, group_max_bytes=group_max, stderr_tail=proc.stderr[-1500:])


# --------------------------------------------------------------------------- the bench


def predicted(rung: str, args: argparse.Namespace, params: int) -> int:
    """The planner's predicted host peak of the denoising stage for this stack under `rung`, on the CPU: the
    estimator (`vram_utils.estimate.estimate`, what `plan_for` fills `host_stages` from) run on the Wan 2.1 14B
    registry entry cut to `--blocks` blocks (`params` transformer parameters), with no text encoder or VAE
    weights (this bench loads only the transformer), one step without classifier-free guidance."""
    import dataclasses

    from configs.schema import GenerationRequest
    from configs.registry import get_model_spec
    from vram_utils.archs import arch_for
    from vram_utils.estimate import estimate, workload_for

    spec = get_model_spec("Wan-AI/Wan2.1-T2V-14B-Diffusers")
    config = {**spec.config, "transformer": {**spec.config["transformer"], "num_layers": args.blocks}}
    stack = dataclasses.replace(spec, params={**spec.params, "transformer": params, "text_encoder": 1, "vae": 1},
                                config=config)
    request = GenerationRequest(model=spec.id, task="t2v", prompt="a cat", frames=(args.latent_frames - 1) * 4 + 1,
                                height=args.latent_height * 8, width=args.latent_width * 8, steps=1, guidance=1.0)
    w = workload_for(request, stack)
    w = w.replace(host_rung=rung, quant="fp8-storage" if rung == "low-precision" else w.quant)
    if rung == "ram":  # read into anonymous memory (load_into_ram): nothing stays memory-mapped
        w = w.replace(mapped=frozenset())
    est = estimate(arch_for(stack), w, "none", "cpu")
    stage = next(st for st in est.host_stages if st.name == "denoise")
    return stage.need_bytes(rung == "in-place")


def disk_line(path: Path) -> str:
    """What disk holds `path`: the filesystem (df) and the block device's model (lsblk)."""
    df = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True, check=False).stdout.splitlines()
    source = df[-1].split()[0] if len(df) > 1 else "?"
    lsblk = subprocess.run(["lsblk", "-ndo", "NAME,MODEL,ROTA,SIZE", source], capture_output=True, text=True,
                           check=False).stdout.strip()
    return f"{df[-1] if len(df) > 1 else '?'} | lsblk NAME MODEL ROTA SIZE: {lsblk or 'n/a'}"


def _weight_bytes(model_dir: Path) -> int:
    """The tensors' bytes in a safetensors folder (from the headers)."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def table(rows: list[dict], weight_bytes: int, args: argparse.Namespace) -> str:
    ram = next((r for r in rows if r["rung"] == "ram"), None)
    lines = ["| rung | predicted host peak (denoise) | measured peak, anonymous | predicted / measured "
             "| measured peak RSS incl. mapped files | predicted / measured | RSS after placing | place s | s/step "
             "| x ram |", "|" + "---|" * 10]
    for r in rows:
        anon, rss = r["peak_anon"] - r["start_anon"], r["peak_rss"] - r["start_rss"]  # above the start
        pred = predicted(r["rung"].split(",")[0], args, weight_bytes // 2)
        lines.append(
            f"| {r['rung']} | {pred / GIB:.2f} GiB | {anon / GIB:.2f} GiB | {pred / anon:.2f} "
            f"| {rss / GIB:.2f} GiB | {pred / rss:.2f} | {(r['placed_rss'] - r['start_rss']) / GIB:.2f} GiB | {r['place_s']:.1f} | {r['step_s']:.2f} "
            f"| {r['step_s'] / ram['step_s'] if ram else float('nan'):.2f} |"
        )
    lines.append(f"weights {weight_bytes / GIB:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4, help="transformer blocks of the 40 (4 = 3.05 GiB)")
    p.add_argument("--model", default="", help="a folder holding the stack (built there when empty)")
    p.add_argument("--rungs", default=",".join(RUNGS))
    p.add_argument("--latent-frames", type=int, default=1)
    # 64 video tokens: little compute per weight byte, the hard case for streaming weights from disk
    p.add_argument("--latent-height", type=int, default=16)
    p.add_argument("--latent-width", type=int, default=16)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--encoder-layers", type=int, default=2, help="UMT5-XXL layers of the 24 (2 = 2.67 GiB)")
    p.add_argument("--encoder", default="", help="a folder holding the encoder (built there when empty)")
    p.add_argument("--encoder-tokens", type=int, default=512, help="tokens encoded (Wan pads prompts to 512)")
    p.add_argument("--expert-blocks", type=int, default=2, help="blocks of each expert (2 = 1.74 GiB)")
    p.add_argument("--experts", default="", help="two expert folders, high-noise,low-noise (built when empty)")
    p.add_argument("--caps", default=",".join(map(str, CAPS)),
                   help="in-place under RAM caps of its start + these shares of the weight bytes")
    p.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)  # a child's steps
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    return _bench(args)


def _build(what: str, folder: Path, n: int, seed: int = 0) -> None:
    """Build a stack ("stack": build_stack) or an encoder ("encoder": build_encoder) in a child process, so this
    one never holds the weights."""
    t0 = time.perf_counter()
    call = f"build_stack(Path({str(folder)!r}), {n}, {seed})" if what == "stack" else \
        f"build_encoder(Path({str(folder)!r}), {n})"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
                    f"from bench.host_ram import build_stack; from bench.host_ram_stages import build_encoder; {call}"],
                   check=True, cwd=ROOT)
    print(f"built {what} {folder.name} ({n} deep) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def _folders(args: argparse.Namespace, rungs: list[str], work: Path) -> dict[str, Path]:
    """The folders the cases need, built under `work` when not given."""
    from bench.host_ram_stages import ENCODER_CASES, EXPERT_CASES

    if not args.model:
        args.model = str(work / "model")
        _build("stack", Path(args.model), args.blocks)
    folders = {"model": Path(args.model)}
    if any(r in ENCODER_CASES for r in rungs):
        if not args.encoder:
            args.encoder = str(work / "encoder")
            _build("encoder", Path(args.encoder), args.encoder_layers)
        folders["encoder"] = Path(args.encoder)
    if any(r in EXPERT_CASES for r in rungs):
        if not args.experts:
            args.experts = f"{work / 'high-noise'},{work / 'low-noise'}"
            for seed, folder in enumerate(args.experts.split(",")):
                _build("stack", Path(folder), args.expert_blocks, seed + 1)
        folders["high"], folders["low"] = map(Path, args.experts.split(","))
    return folders


def in_place_rows(args: argparse.Namespace, env: dict) -> list[dict]:
    """The in-place rung uncapped, then under caps of its start + each share of the weight bytes: two steps each."""
    args.repeat = 2
    weights = _weight_bytes(Path(args.model))
    rows = [dict(run_child("in-place", args, env=env), rung="in-place", cap=None)]
    for share in (float(s) for s in args.caps.split(",") if s.strip()):
        cap = rows[0]["start_rss"] + int(share * weights)
        r = run_child("in-place", args, cap_bytes=cap, env=env)
        rows.append(dict(r, rung=f"in-place, cap start + {share:g}x weights", cap=cap))
    args.repeat = 1
    for r in rows:
        if r["returncode"] != 0:
            raise SystemExit(f"{r['rung']} failed (exit {r['returncode']}): {r['stderr_tail']}")
        print(f"[{r['rung']}] steps {r['first_step_s']:.2f} s, {r['step_s']:.2f} s", file=sys.stderr, flush=True)
    return rows


def cap_table(rows: list[dict], weight_bytes: int) -> str:
    """The in-place rung: the second step's time under each cap against the uncapped one's."""
    free = next(r for r in rows if r["cap"] is None)
    lines = ["| in-place, RAM cap | cap above start | 1st step s (reads the disk) | 2nd step s | 2nd step x uncapped "
             "| anonymous peak above start |", "|---|---|---|---|---|---|"]
    for r in rows:
        above = f"{(r['cap'] - r['start_rss']) / GIB:.2f} GiB ({(r['cap'] - r['start_rss']) / weight_bytes:.2f}x)" \
            if r["cap"] else "none"
        lines.append(f"| {r['rung']} | {above} | {r['first_step_s']:.2f} | {r['step_s']:.2f} | "
                     f"{r['step_s'] / free['step_s']:.2f} | {(r['peak_anon'] - r['start_anon']) / GIB:.2f} GiB |")
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from bench.host_ram_stages import CASES, stages_table

    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    work = Path(tempfile.mkdtemp(prefix="fitvideo-host-ram-"))
    try:
        folders = _folders(args, rungs, work)
        env = {"FITVIDEO_HOME": str(work / "home")}
        rows = []
        for rung in rungs:
            if rung == "in-place":
                rows += in_place_rows(args, env)
                continue
            r = run_child(rung, args, env=env)
            if r["returncode"] != 0:
                raise SystemExit(f"{rung} failed (exit {r['returncode']}): {r['stderr_tail']}")
            if rung == "disk":
                r["rung"] = "disk, files reused" if any(x["rung"].startswith("disk") for x in rows) else "disk, writes files"
            rows.append(r)
            print(f"[{rung}] anonymous peak {(r['peak_anon'] - r['start_anon']) / GIB:.2f} GiB, step {r['step_s']:.2f} s",
                  file=sys.stderr, flush=True)
        print(f"CPU: {cpu_model()}, {args.threads} threads; disk: {disk_line(work)}")
        print(f"Wan 2.1 14B width, {args.blocks} blocks, bf16, random weights; one step of "
              f"{args.latent_frames}x{args.latent_height}x{args.latent_width} latents, {args.text_tokens} text tokens; "
              "each rung in a fresh process, first read from the disk (page cache dropped)")
        plain = [r for r in rows if r["rung"] not in CASES and not r["rung"].startswith("in-place")]
        if plain:
            print(table(plain, _weight_bytes(Path(args.model)), args))
        capped = [r for r in rows if r["rung"].startswith("in-place")]
        if capped:
            print("\n" + cap_table(capped, _weight_bytes(Path(args.model))))
        staged = [r for r in rows if r["rung"] in CASES]
        if staged:
            print(f"\nFree before load: UMT5-XXL width, {args.encoder_layers} layers, {args.encoder_tokens} tokens "
                  f"encoded; experts: 2 stacks of {args.expert_blocks} blocks (Wan 2.2 A14B, one step each)")
            print(stages_table(staged, args, folders))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
