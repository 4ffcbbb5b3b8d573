"""Out-of-memory recovery, the runner's side: recognise an OOM and record each step down for the sidecar.

The rungs themselves, and which one comes next, are the one ladder's (vram_utils/ladder.py); the streaming
decode steps its decode rungs itself and reports them in its stats (`DecodeStats.oom_steps`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vram_utils.ladder import Stage as RecoveryStage
from vram_utils.sizes import is_out_of_memory


@dataclass(frozen=True)
class StepDown:
    stage: RecoveryStage
    error: str
    change: str  # what was changed, for the person and the sidecar

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decode_step_downs(stats) -> list[StepDown]:
    """The streaming decode's own steps (`DecodeStats.oom_steps`: smaller tiles, then smaller chunks)."""
    return [StepDown("decoding", s.error, s.change()) for s in stats.oom_steps]


# One definition of "out of memory" for the whole house (the decode's own ladder uses it too).
is_oom = is_out_of_memory
