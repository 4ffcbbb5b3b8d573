"""Where FitVideo keeps its files: $FITVIDEO_HOME (default ~/.cache/fitvideo). The one definition every layer reads
(the tiny models, MagCache ratios, LoRAs, model folders, the disk rung's weight files, the planner's free-disk check).
Read each time it is asked: tests and the CLI may set the variable after import."""
from __future__ import annotations

import os
from pathlib import Path


def fitvideo_home() -> Path:
    return Path(os.environ.get("FITVIDEO_HOME", Path.home() / ".cache" / "fitvideo"))
