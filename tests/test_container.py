"""Plans that hold inside a container (a memory cgroup, as Docker's --memory, Kubernetes and systemd's MemoryMax
set): the host budget is the cgroup's room, memory-mapped weights count as file pages read in place, and a run under
a cap ends in a video or a refusal naming the limit, never in the OOM killer's SIGKILL.

The model: the 4-block Wan-14B-width pipeline folder of tests/test_host_ram.py (3.05 GiB of bf16 transformer
weights, loaded memory-mapped), one step on one 16x16 frame (1 token: seconds, not minutes, on any CPU). Each run is
`app.py generate` in a fresh process placed in a cgroup-v1 memory group before it starts. Needs root and a writable
cgroup-v1 memory controller: where none can be made, the tests skip, saying which is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import host_ram

MIB, GIB = 2**20, 2**30
RUN = ["--prompt", "a cat", "--frames", "1", "--height", "16", "--width", "16", "--steps", "1", "--guidance", "1",
       "--seed", "0", "--progress", "off"]
CAPS_MIB = (2048, 1024, 600, 400)

pytestmark = pytest.mark.skipif(bool(host_ram.cgroup_v1_problem()),
                                reason=f"needs a memory cgroup: {host_ram.cgroup_v1_problem()}")


def generate(folder, out, cap_bytes: int | None, home, *extra: str) -> subprocess.CompletedProcess:
    """`app.py generate` on the folder, in a fresh process under a memory cap (a cgroup-v1 group) when given."""
    cmd = [sys.executable, str(host_ram.ROOT / "app.py"), "generate", "--model", str(folder), *RUN, "--out", str(out),
           *extra]
    env = {**os.environ, "FITVIDEO_HOME": str(home)}
    if cap_bytes is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    with host_ram.memory_cgroup(f"fitvideo-cap-{os.getpid()}-{cap_bytes}", cap_bytes) as group:
        procs = str(group / "cgroup.procs")

        def enter() -> None:  # in the child, before exec: everything it runs is capped
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, preexec_fn=enter)
        proc.oom_kills = int(next(line.split()[1] for line in (group / "memory.oom_control").read_text().splitlines()
                                  if line.startswith("oom_kill")))
        return proc


def test_the_host_budget_is_the_cgroups_room_and_the_plan_says_so(wan_pipeline, tmp_path):
    folder, _ = wan_pipeline
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from vram_utils.host_budget import host_limit; "
            "from vram_utils import probe; from vram_utils.planner import host_margin_bytes; lim = host_limit(); "
            "info = probe(); print(json.dumps(dict(kind=lim.kind, limit=lim.limit_bytes, room=lim.available_bytes, "
            "total=info.host_total_bytes, available=info.host_available_bytes, margin=host_margin_bytes(info))))")
    with host_ram.memory_cgroup(f"fitvideo-probe-{os.getpid()}", GIB) as group:
        def enter() -> None:
            with open(group / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

        proc = subprocess.run([sys.executable, "-c", code, str(host_ram.ROOT)], capture_output=True, text=True,
                              check=False, preexec_fn=enter)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kind"] == "container limit" and got["limit"] == got["total"] == GIB, got
    assert 0 < got["available"] <= got["room"] + 32 * MIB and got["room"] < GIB, got  # the room under the cap
    assert got["margin"] == 64 * MIB  # 5 % of 1 GiB is under the 64 MiB floor
    plan = generate(folder, tmp_path / "p.mp4", GIB, tmp_path / "home", "--plan")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "budget from the container limit 1.0 GiB (cgroup v1 /fitvideo-cap-" in plan.stdout, plan.stdout
    assert "host RAM `in-place`" in plan.stdout  # 3 GiB of mapped weights under a 1 GiB cap: read in place


@pytest.fixture(scope="module")
def reference(wan_pipeline, tmp_path_factory):
    folder, _ = wan_pipeline
    out = tmp_path_factory.mktemp("container") / "ref.mp4"
    proc = generate(folder, out, None, out.parent / "home")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("cap_mib", CAPS_MIB)
def test_under_a_cap_a_run_ends_in_its_video_or_a_refusal_naming_the_limit_never_a_kill(wan_pipeline, reference,
                                                                                       tmp_path, cap_mib):
    folder, weight_bytes = wan_pipeline
    assert weight_bytes > 1.5 * GIB * 2  # 3.05 GiB of weights: more than every cap
    proc = generate(folder, tmp_path / "v.mp4", cap_mib * MIB, tmp_path / "home")
    assert proc.returncode in (0, 2) and proc.oom_kills == 0, (proc.returncode, proc.stderr[-2000:])
    if proc.returncode == 2:  # refused before anything loaded, naming the limit and what the run needs
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error:") and f"container limit {cap_mib / 1024:.1f} GiB" in line, line
        return
    side = json.loads((tmp_path / "v.json").read_text())
    ref = json.loads(reference.with_suffix(".json").read_text())
    assert side["plan"]["host_rung"] == "in-place" and "container limit" in side["plan"]["host_limit"]
    got = torch.load(tmp_path / "v.latents.pt", weights_only=False)["latents"]
    want = torch.load(reference.with_suffix(".latents.pt"), weights_only=False)["latents"]
    assert torch.equal(got, want)  # pages dropped and read again are the same bytes: the same video
    m, plan = side["measured"], side["plan"]
    predicted = m["baseline_anon_bytes"] + plan["predicted_anon_host_bytes"]  # the planner counts above the baseline
    assert 0.8 <= predicted / m["peak_anon_bytes"] <= 1.2, (predicted / MIB, m["peak_anon_bytes"] / MIB)
    # what the cap must hold stayed under it, while the same run uncapped held more than the cap (its mapped pages)
    assert m["peak_anon_bytes"] < cap_mib * MIB < ref["measured"]["peak_host_bytes"]
