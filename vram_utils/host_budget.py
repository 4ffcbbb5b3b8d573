"""The host RAM budget that binds: the least of the machine's available memory, every memory cgroup limit on the
process's path (a Docker `--memory`, a Kubernetes limit, a systemd `MemoryMax`, a per-user slice), and on Windows
the commit limit. psutil reports the whole machine inside a cgroup; the cgroup's own files say what the process may
really use. Read each time it is asked (a few small files), never at import.

A cgroup's usage counts file pages (the page cache) with anonymous memory. Its inactive file pages are reclaimed
before anything is killed, so the room is `limit - (usage - inactive_file)`, as `docker stats` and Kubernetes'
working set count it.

    limit = host_limit()        # HostLimit(available_bytes, limit_bytes, kind, where)
    limit.text()                # "container limit 2.0 GiB (cgroup v1 /fitvideo), 1.4 GiB free"
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
UNLIMITED = 1 << 60  # cgroup v1 writes a page-rounded 2**63 for "no limit"


@dataclass(frozen=True)
class HostLimit:
    available_bytes: int  # what a run may still take under this limit
    limit_bytes: int  # the limit itself (the machine's total for "machine")
    kind: str  # "machine", "container limit" (a memory cgroup), "commit limit" (Windows)
    where: str = ""  # the cgroup's path, or ""

    def text(self) -> str:
        """"container limit 2.0 GiB (cgroup v1 /fitvideo), 1.4 GiB free" / "machine 23.5 GiB, 20.1 GiB free"."""
        where = f" ({self.where})" if self.where else ""
        return f"{self.kind} {_gib(self.limit_bytes)}{where}, {_gib(self.available_bytes)} free"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def host_limit() -> HostLimit:
    """The limit with the least room: the machine, each memory cgroup up the process's path, the commit limit."""
    import psutil

    vm = psutil.virtual_memory()
    limits = [HostLimit(int(vm.available), int(vm.total), "machine"), *cgroup_limits(), *commit_limit()]
    return min(limits, key=lambda lim: lim.available_bytes)


# --------------------------------------------------------------------------- cgroups


def cgroup_folders(proc_cgroup: str = "/proc/self/cgroup",
                   mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, list[Path]]]:
    """("cgroup v1" / "cgroup v2", the process's memory cgroup folders from its own up to the mount's root)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
        mounts = Path(mountinfo).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        hier, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v2 = hier == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        mount = _mount(mounts, "cgroup2" if v2 else "cgroup")
        if mount is None:
            continue
        point, root = mount
        rel = path[len(root):] if root != "/" and path.startswith(root) else path  # a container sees its own as "/"
        parts = [p for p in rel.split("/") if p]
        out.append(("cgroup v2" if v2 else "cgroup v1", [Path(point, *parts[:d]) for d in range(len(parts), -1, -1)]))
    return out


def _mount(mounts: list[str], fstype: str) -> tuple[str, str] | None:
    """(mount point, the cgroup path mounted there) of the first `fstype` mount that holds the memory controller."""
    for m in mounts:
        left, sep, right = m.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
            continue
        if fstype == "cgroup2" or "memory" in tail[2].split(","):
            return fields[4], fields[3]
    return None


def cgroup_limits() -> list[HostLimit]:
    """One HostLimit per limited memory cgroup from the process's own up to the root (v2 and v1)."""
    out = []
    for label, folders in cgroup_folders():
        room = _v2_room if label == "cgroup v2" else _v1_room
        for folder in folders:
            found = room(folder)
            if found is not None:
                where = "/" + "/".join(folder.parts[len(folders[-1].parts):])
                out.append(HostLimit(found[0], found[1], "container limit", f"{label} {where}"))
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.lstrip("-").isdigit() else int(text)


def _stat(path: Path, *keys: str) -> int:
    try:
        rows = dict(line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
    except (OSError, ValueError):
        return 0
    return next((int(rows[k]) for k in keys if k in rows), 0)


def _v2_room(folder: Path) -> tuple[int, int] | None:
    limit = _read_int(folder / "memory.max")
    current = _read_int(folder / "memory.current")
    if limit is None or current is None or limit >= UNLIMITED:
        return None
    reclaimable = _stat(folder / "memory.stat", "inactive_file")
    return max(0, limit - (current - reclaimable)), limit


def _v1_room(folder: Path) -> tuple[int, int] | None:
    limit = _read_int(folder / "memory.limit_in_bytes")
    usage = _read_int(folder / "memory.usage_in_bytes")
    if limit is None or usage is None or limit >= UNLIMITED:
        return None
    reclaimable = _stat(folder / "memory.stat", "total_inactive_file", "inactive_file")
    return max(0, limit - (usage - reclaimable)), limit


def oom_kills() -> int:
    """Processes the kernel's OOM killer has ended in this process's memory cgroup so far (0 where unknown):
    compared before and after, it tells a run killed for memory from one stopped otherwise."""
    return sum(_stat(folders[0] / ("memory.events" if label == "cgroup v2" else "memory.oom_control"), "oom_kill")
               for label, folders in cgroup_folders())  # on a hybrid system only one of them has the controller


# --------------------------------------------------------------------------- Windows


def commit_limit() -> list[HostLimit]:
    """Windows: what the commit limit (RAM + page file) still allows; it is what fails an allocation there."""
    if sys.platform != "win32":
        return []
    import ctypes

    class Status(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = Status()
    status.dwLength = ctypes.sizeof(Status)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return []
    return [HostLimit(int(status.ullAvailPageFile), int(status.ullTotalPageFile), "commit limit")]


def process_anon_bytes(pid: int | None = None) -> int:
    """This process's anonymous resident memory (RssAnon, Linux): what a memory limit cannot reclaim; elsewhere its
    whole RSS."""
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


# --------------------------------------------------------------------------- watching a run


class HostMemoryPressure(MemoryError):
    """The room left under the binding host limit fell below the reserve during a run: stop at the next step
    boundary (and step down, or stop with what is saved) rather than be killed without a word."""


def pressure_room() -> tuple[int, HostLimit]:
    """(room, the limit) for what cannot be reclaimed: under a memory cgroup its limit minus its anonymous memory
    (file pages, mapped weights among them, are dropped before anything is killed); on the machine what it has
    available. The limit with the least room."""
    import psutil

    vm = psutil.virtual_memory()
    best = (int(vm.available), HostLimit(int(vm.available), int(vm.total), "machine"))
    for label, folders in cgroup_folders():
        for folder in folders:
            limit = _read_int(folder / ("memory.max" if label == "cgroup v2" else "memory.limit_in_bytes"))
            if limit is None or limit >= UNLIMITED:
                continue
            anon = _stat(folder / "memory.stat", "anon" if label == "cgroup v2" else "total_rss")
            room = max(0, limit - anon)
            if room < best[0]:
                where = "/" + "/".join(folder.parts[len(folders[-1].parts):])
                best = (room, HostLimit(room, limit, "container limit", f"{label} {where}"))
    return best


class HostWatch:
    """Polled by the run's memory sampler (vram_utils/timeline.py); `check()` at every step and decode chunk raises
    HostMemoryPressure once the room under the binding limit has fallen below `reserve` (5 % of the limit, at
    least 64 MiB; 256 MiB on a machine without a limit, where the OS would start swapping)."""

    every_s = 0.25  # how often the room is read (the sampler ticks faster)

    def __init__(self):
        self.tripped: tuple[int, HostLimit] | None = None
        self.lowest: int | None = None
        self._last = 0.0

    @staticmethod
    def reserve(limit: HostLimit) -> int:
        if limit.kind == "machine":
            return 256 * 2**20
        return max(64 * 2**20, limit.limit_bytes // 20)

    def poll(self, now: float) -> None:
        if self.tripped is not None or now - self._last < self.every_s:
            return
        self._last = now
        room, limit = pressure_room()
        self.lowest = room if self.lowest is None else min(self.lowest, room)
        if room < self.reserve(limit):
            self.tripped = (room, limit)

    def check(self) -> None:
        if self.tripped is None:
            return
        room, limit = self.tripped
        self.tripped = None  # one trip, one step down: the next poll judges the lower rung afresh
        used = limit.limit_bytes - room
        raise HostMemoryPressure(
            f"host RAM {_gib(used)} of the {limit.kind} {_gib(limit.limit_bytes)}"
            f"{' (' + limit.where + ')' if limit.where else ''}: {_gib(room)} left, under the "
            f"{_gib(self.reserve(limit))} kept free")
