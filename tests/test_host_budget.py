"""cgroup v2 read from a synthetic tree (these machines mount v1; tests/test_container.py caps real v1 groups): the
process's folders up to the mount's root, the tightest `memory.max` among them, reclaimable file pages counted as room."""
from __future__ import annotations

from pathlib import Path

from vram_utils import host_budget
from vram_utils.probe import GIB

MIB = 2**20
READ = host_budget.cgroup_folders  # the reader itself, before a test points it at a tree


def _tree(tmp_path: Path, proc_path: str, root: str) -> tuple[Path, Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    mount = tmp_path / "sys" / "fs" / "cgroup"
    (tmp_path / "cgroup").write_text(f"0::{proc_path}\n")
    (tmp_path / "mountinfo").write_text(
        f"25 30 0:22 / /proc rw,nosuid - proc proc rw\n"
        f"31 25 0:26 {root} {mount} rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw,nsdelegate\n")
    return tmp_path / "cgroup", tmp_path / "mountinfo", mount


def _group(folder: Path, limit: str, current: int, inactive_file: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(limit + "\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon {current - inactive_file}\ninactive_file {inactive_file}\n")


def test_a_systemd_unit_inside_a_limited_slice_is_bound_by_the_slice(tmp_path, monkeypatch):
    proc, mounts, mount = _tree(tmp_path, "/user.slice/fitvideo.service", "/")
    assert READ(str(proc), str(mounts)) == [
        ("cgroup v2", [mount / "user.slice" / "fitvideo.service", mount / "user.slice", mount])]
    _group(mount / "user.slice" / "fitvideo.service", "max", 900 * MIB)
    _group(mount / "user.slice", str(2 * GIB), 1500 * MIB, inactive_file=300 * MIB)
    monkeypatch.setattr(host_budget, "cgroup_folders", lambda: READ(str(proc), str(mounts)))
    (limit,) = host_budget.cgroup_limits()  # "max" is no limit: only the slice binds
    assert (limit.available_bytes, limit.limit_bytes) == (2 * GIB - 1200 * MIB, 2 * GIB)
    assert limit.where == "cgroup v2 /user.slice"
    assert limit.text() == "container limit 2.0 GiB (cgroup v2 /user.slice), 848 MiB free"


def test_a_container_sees_its_own_group_as_the_root(tmp_path, monkeypatch):
    # Docker's --memory 1g with a private cgroup namespace: /proc/self/cgroup reads "0::/", the mount's root is "/"
    proc, mounts, mount = _tree(tmp_path, "/", "/")
    _group(mount, str(GIB), 700 * MIB)
    monkeypatch.setattr(host_budget, "cgroup_folders", lambda: READ(str(proc), str(mounts)))
    (limit,) = host_budget.cgroup_limits()
    assert (limit.available_bytes, limit.limit_bytes, limit.kind) == (324 * MIB, GIB, "container limit")
    # without a private namespace the process sees the host's path under a mount rooted at the container's group
    proc, mounts, mount = _tree(tmp_path / "host", "/docker/abc123", "/docker/abc123")
    assert READ(str(proc), str(mounts)) == [("cgroup v2", [mount])]
