"""What memory this machine has right now: GPUs (nvidia-ml-py + torch), host RAM (psutil).

Free GPU memory is counted honestly, as FramePack does: the driver's free bytes
plus the bytes torch's caching allocator holds reserved but inactive (they are
ours to reuse). Nothing here runs at import time, and `probe()` does not create
a CUDA context that was not there already: with NVML present it reads the
driver's numbers, and asks torch only when CUDA is already initialised.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass

import psutil
import torch

logger = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int  # what the driver reports in use, every process together
    free_bytes: int  # what we can use: driver free + our reserved-but-inactive bytes
    other_process_bytes: int  # held by other processes (0 where the driver does not say)
    reserved_inactive_bytes: int  # reserved by our caching allocator, not holding live tensors
    capability: tuple[int, int] | None = None  # (major, minor) compute capability, where known


@dataclass(frozen=True)
class DeviceInfo:
    cuda: bool
    gpus: tuple[GpuInfo, ...]
    host_total_bytes: int  # the limit that binds (vram_utils/host_budget.py): the machine's RAM, or a container's
    host_available_bytes: int  # what a run may still take under it
    process_rss_bytes: int
    host_limit_kind: str = "machine"  # "machine", "container limit" (a memory cgroup), "commit limit" (Windows)
    host_limit_where: str = ""  # the cgroup's path

    @property
    def host_limit_text(self) -> str:
        """Where the host budget comes from: "machine 23.5 GiB" / "container limit 2.0 GiB (cgroup v1 /x)"."""
        where = f" ({self.host_limit_where})" if self.host_limit_where else ""
        return f"{self.host_limit_kind} {self.host_total_bytes / GIB:.1f} GiB{where}"

    @property
    def best_gpu(self) -> GpuInfo | None:
        """The GPU with the most free memory (where a run goes), or None without one."""
        return max(self.gpus, key=lambda g: g.free_bytes) if self.gpus else None

    def summary(self) -> str:
        host = f"host RAM {self.host_available_bytes / GIB:.1f}/{self.host_total_bytes / GIB:.1f} GiB available"
        if self.host_limit_kind != "machine":
            host += f" ({self.host_limit_kind}{', ' + self.host_limit_where if self.host_limit_where else ''})"
        if not self.cuda or not self.gpus:
            return f"no CUDA GPU; {host}"
        parts = []
        for g in self.gpus:
            others = f", other processes {g.other_process_bytes / GIB:.1f} GiB" if g.other_process_bytes else ""
            parts.append(f"GPU{g.index} {g.name}: {g.free_bytes / GIB:.1f}/{g.total_bytes / GIB:.1f} GiB free{others}")
        return "; ".join(parts) + f"; {host}"


# --------------------------------------------------------------------------- probing


def _nvml_gpus() -> list[dict] | None:
    """Per-GPU numbers from the driver, or None where NVML is absent (no driver, no GPU)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # NVMLError_LibraryNotFound on machines without a driver
        logger.debug("NVML unavailable: %s", exc)
        return None
    try:
        me = os.getpid()
        rows = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            others = 0
            try:
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid != me and proc.usedGpuMemory:  # None where the driver hides it
                        others += int(proc.usedGpuMemory)
            except pynvml.NVMLError:
                pass
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except pynvml.NVMLError:
                capability = None
            rows.append(
                dict(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    total=int(mem.total),
                    free=int(mem.free),
                    others=others,
                    capability=capability,
                )
            )
        return rows
    except pynvml.NVMLError as exc:
        logger.debug("NVML query failed: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _reserved_inactive(index: int) -> int:
    """Bytes torch has reserved on GPU `index` but that hold no live tensor (free to us)."""
    if not torch.cuda.is_initialized():
        return 0
    stats = torch.cuda.memory_stats(index)
    return max(0, int(stats.get("reserved_bytes.all.current", 0)) - int(stats.get("active_bytes.all.current", 0)))


def probe() -> DeviceInfo:
    """The memory of this machine right now: the GPUs, and the host RAM budget that binds (the least of the
    machine's and any memory cgroup's room: vram_utils/host_budget.py). Works, and says "no CUDA GPU", without one."""
    from vram_utils.host_budget import host_limit

    limit = host_limit()
    rss = psutil.Process().memory_info().rss
    cuda = torch.cuda.is_available()
    gpus: list[GpuInfo] = []
    if cuda:
        nvml = _nvml_gpus()
        for i in range(torch.cuda.device_count()):
            row = nvml[i] if nvml and i < len(nvml) else None
            if row is None:  # no NVML: ask torch (this creates a CUDA context on GPU i)
                free, total = torch.cuda.mem_get_info(i)
                props = torch.cuda.get_device_properties(i)
                row = dict(name=props.name, total=total, free=free, others=0, capability=(props.major, props.minor))
            inactive = _reserved_inactive(i)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=row["name"],
                    total_bytes=row["total"],
                    used_bytes=row["total"] - row["free"],
                    free_bytes=row["free"] + inactive,
                    other_process_bytes=row["others"],
                    reserved_inactive_bytes=inactive,
                    capability=row["capability"],
                )
            )
    return DeviceInfo(
        cuda=cuda and bool(gpus),
        gpus=tuple(gpus),
        host_total_bytes=limit.limit_bytes,
        host_available_bytes=limit.available_bytes,
        process_rss_bytes=int(rss),
        host_limit_kind=limit.kind,
        host_limit_where=limit.where,
    )


# --------------------------------------------------------------------------- seed 003 API


def _pick_gpu(info: DeviceInfo, gpu_index: int | None) -> GpuInfo | None:
    if not info.gpus:
        return None
    if gpu_index is None:
        return info.best_gpu
    for g in info.gpus:
        if g.index == gpu_index:
            return g
    raise ValueError(f"gpu_index={gpu_index} is not a GPU here; GPUs: {[g.index for g in info.gpus]}")


def get_gpu_memory_info(gpu_index: int | None = None, device: DeviceInfo | None = None) -> tuple[float, float, float]:
    """(total_gb, used_gb, available_gb) of one GPU in GiB; (0.0, 0.0, 0.0) without a CUDA GPU.

    `available` counts our reserved-but-inactive bytes as free; `used` is total minus available.
    Without `gpu_index`, the GPU with the most free memory (the one a run would use).
    """
    gpu = _pick_gpu(device or probe(), gpu_index)
    if gpu is None:
        return 0.0, 0.0, 0.0
    total, available = gpu.total_bytes / GIB, gpu.free_bytes / GIB
    return total, total - available, available


def vram_status_line(device: DeviceInfo | None = None, gpu_index: int | None = None) -> str:
    info = device or probe()
    gpu = _pick_gpu(info, gpu_index)
    if gpu is None:
        return "VRAM Status: no CUDA GPU (running on the CPU)"
    total, available = gpu.total_bytes / GIB, gpu.free_bytes / GIB
    used = total - available
    pct = round(100 * used / total) if total else 0
    return f"VRAM Status: {used:.2f}GB / {total:.2f}GB used ({pct}%), {available:.2f}GB available"


def log_vram_status(device: DeviceInfo | None = None, gpu_index: int | None = None) -> str:
    """Log (INFO) and return e.g. "VRAM Status: 8.20GB / 23.70GB used (35%), 15.50GB available"."""
    line = vram_status_line(device, gpu_index)
    logger.info(line)
    return line


# --------------------------------------------------------------------------- peak meter

_VMHWM_LOCK = threading.Lock()
_ACTIVE_METERS: "weakref.WeakSet[PeakMeter]" = weakref.WeakSet()


def _read_vmhwm() -> int | None:
    """The kernel's peak RSS of this process (Linux), exact where a sampling thread may miss a spike."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vmhwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMeter:
    """Measure the peak GPU allocated bytes and the peak host RSS inside a `with` block.

    GPU: `torch.cuda.max_memory_allocated` after a peak reset (0 without CUDA).
    Host: a psutil sampling thread, and on Linux the kernel's exact high-water mark
    (VmHWM, reset on entry; meters that are already open keep the peak seen so far).
    Bytes are absolute (they include the process baseline); `baseline_*` say what it was. `interval_s=None`: no
    sampling thread (VmHWM alone; a MemoryTimeline that owns the meter adds its own samples where VmHWM is missing).
    """

    def __init__(self, interval_s: float | None = 0.005, gpu_index: int | None = None):
        self.interval_s = interval_s
        self.gpu_index = gpu_index
        self.peak_gpu_bytes = 0
        self.peak_host_bytes = 0
        self.baseline_gpu_bytes = 0
        self.baseline_host_bytes = 0
        # anonymous resident memory (RssAnon): what a memory limit cannot reclaim; sampled where a sampler notes it
        self.peak_anon_bytes = 0
        self.baseline_anon_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_ok = False
        self._cuda = False

    def note_anon(self, value: int) -> None:
        self.peak_anon_bytes = max(self.peak_anon_bytes, int(value))

    def _note_host(self, value: int | None) -> None:
        if value:
            self.peak_host_bytes = max(self.peak_host_bytes, int(value))

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self._note_host(proc.memory_info().rss)

    def __enter__(self) -> "PeakMeter":
        self._cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self._cuda:
            torch.cuda.synchronize(self.gpu_index)
            torch.cuda.reset_peak_memory_stats(self.gpu_index)
            self.baseline_gpu_bytes = torch.cuda.memory_allocated(self.gpu_index)
        self.baseline_host_bytes = psutil.Process().memory_info().rss
        self.peak_host_bytes = self.baseline_host_bytes
        from vram_utils.host_budget import process_anon_bytes

        self.baseline_anon_bytes = self.peak_anon_bytes = process_anon_bytes()
        with _VMHWM_LOCK:
            before = _read_vmhwm()
            for meter in list(_ACTIVE_METERS):  # an outer meter keeps the peak it had seen
                meter._note_host(before)
            self._hwm_ok = _reset_vmhwm()
            _ACTIVE_METERS.add(self)
        self._stop.clear()
        if self.interval_s:
            self._thread = threading.Thread(target=self._sample, name="PeakMeter", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.read()
        with _VMHWM_LOCK:
            _ACTIVE_METERS.discard(self)

    def read(self) -> "PeakMeter":
        """Bring the peaks up to now (the meter goes on): RSS now, the kernel's high-water mark, CUDA's peak."""
        self._note_host(psutil.Process().memory_info().rss)
        with _VMHWM_LOCK:
            if self._hwm_ok:
                self._note_host(_read_vmhwm())
        if self._cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            torch.cuda.synchronize(self.gpu_index)
            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(self.gpu_index))
        return self

    @property
    def host_delta_bytes(self) -> int:
        """Peak host RSS above what the process held on entry."""
        return max(0, self.peak_host_bytes - self.baseline_host_bytes)

    @property
    def gpu_delta_bytes(self) -> int:
        return max(0, self.peak_gpu_bytes - self.baseline_gpu_bytes)

    def to_dict(self) -> dict[str, int]:
        return {
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "peak_host_bytes": self.peak_host_bytes,
            "baseline_gpu_bytes": self.baseline_gpu_bytes,
            "baseline_host_bytes": self.baseline_host_bytes,
            "peak_anon_bytes": self.peak_anon_bytes,
            "baseline_anon_bytes": self.baseline_anon_bytes,
        }
