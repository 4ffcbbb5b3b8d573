"""The disk rung under a real RAM cap: a model whose weights exceed the cap still denoises a step, unchanged.

A full-width, reduced-depth Wan 2.1 14B transformer (bench/host_ram.py `build_stack`: 5120 hidden, 40 heads,
ffn 13824, 4 of its 40 blocks; 3.05 GiB of random bf16 weights) is saved once per session. Each run is a
fresh child process (bench/host_ram.py `child`) that first drops the model's and the offload folder's pages
from the page cache, so what it reads is charged to it. Capped runs are placed in a cgroup-v1 memory group
(`memory.limit_in_bytes`: resident memory and page cache together; clean page cache is reclaimed first,
anonymous memory over the cap gets the process OOM-killed), removed afterwards.

1. Uncapped, weights in RAM (the planner's `ram` rung): the reference output.
2. Capped at 2 GiB, below the weights' 3.05 GiB, with `plan.disk_offload` applied through
   `vram_utils.apply_plan`: a first run (it writes the group files under a fresh $FITVIDEO_HOME itself, from
   the memory-mapped checkpoint) finishes, its output equals the reference exactly (the same kernels on the
   same weights in the same order; the tolerance is 0), and its peak RSS (VmHWM) and the group's max usage
   stay under the cap.
3. The same cap without the disk rung (weights in RAM): killed by the OOM killer (returncode -9): the cap binds.

One step is one transformer forward on 1x8x8 latents (16 video tokens) and 16 text tokens: the forward of
4 full-width blocks in bf16 took 9-15 s on 2 shared AVX-512 cores, and more tokens only add compute time.
Wall time here: about 2.5 minutes (building and saving the model about 40 s).

Needs root and a writable cgroup-v1 memory controller: without them the test fails, saying which is missing.
"""
from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch

from bench import host_ram

GIB = 2**30
BLOCKS = 4
CAP_BYTES = 2 * GIB


@pytest.fixture(scope="session")
def wan_stack(wan_pipeline):
    """The stack alone (the pipeline's transformer folder), its weight bytes, and the arguments child runs take."""
    folder, weight_bytes = wan_pipeline
    args = argparse.Namespace(model=str(folder / "transformer"), threads=os.cpu_count() or 1, latent_frames=1,
                              latent_height=8, latent_width=8, text_tokens=16)
    return folder / "transformer", weight_bytes, args


def test_the_disk_rung_denoises_under_a_ram_cap_below_the_weights_and_without_it_the_run_is_killed(
        wan_stack, tmp_path):
    problem = host_ram.cgroup_v1_problem()
    assert not problem, f"this test caps RAM with a cgroup-v1 memory group: {problem}"
    folder, weight_bytes, args = wan_stack
    assert weight_bytes == 3_276_593_280 and weight_bytes > CAP_BYTES * 1.5  # 3.05 GiB against a 2 GiB cap
    home = tmp_path / "home"

    # 1. The reference: no cap, the weights in RAM.
    reference = host_ram.run_child("ram", args, out=tmp_path / "ram.pt", env={"FITVIDEO_HOME": str(home)})
    assert reference["returncode"] == 0, reference["stderr_tail"]
    assert reference["peak_anon"] - reference["start_anon"] > weight_bytes  # the weights really were in anonymous RAM

    # 2. Under the cap with the disk rung: a first run, writing its own group files.
    disk = host_ram.run_child("disk", args, cap_bytes=CAP_BYTES, out=tmp_path / "disk.pt",
                              env={"FITVIDEO_HOME": str(home)})
    assert disk["returncode"] == 0, f"the disk rung did not finish under the cap: {disk['stderr_tail']}"
    files = list((home / "offload").glob("*/group_*.safetensors"))
    assert len(files) == BLOCKS + 1 and sum(f.stat().st_size for f in files) >= weight_bytes
    assert disk["peak_rss"] < CAP_BYTES and disk["group_max_bytes"] <= CAP_BYTES
    assert disk["placed_rss"] - disk["start_rss"] < weight_bytes / BLOCKS  # not even one block stays in RAM
    expected, got = torch.load(tmp_path / "ram.pt"), torch.load(tmp_path / "disk.pt")
    assert expected.shape == got.shape == (1, 16, 1, 8, 8) and expected.abs().max() > 0
    assert torch.equal(got, expected), f"outputs differ by {(got - expected).abs().max().item():.3g}"

    # 3. The same cap without the disk rung: the weights do not fit, the OOM killer ends it.
    capped_ram = host_ram.run_child("ram", args, cap_bytes=CAP_BYTES, env={"FITVIDEO_HOME": str(home)})
    assert capped_ram["returncode"] == -9, (
        f"without the disk rung the capped run should be killed, got exit {capped_ram['returncode']}"
    )
    assert capped_ram["group_max_bytes"] >= CAP_BYTES - 64 * 2**20  # it ran into the cap
    print(f"cap {CAP_BYTES / GIB:.2f} GiB, weights {weight_bytes / GIB:.2f} GiB; disk rung: peak RSS "
          f"{disk['peak_rss'] / GIB:.2f} GiB, group max {disk['group_max_bytes'] / GIB:.2f} GiB, placing "
          f"{disk['place_s']:.1f} s, step {disk['step_s']:.1f} s; in RAM uncapped: peak RSS "
          f"{reference['peak_rss'] / GIB:.2f} GiB, step {reference['step_s']:.1f} s")
    shutil.rmtree(home, ignore_errors=True)
