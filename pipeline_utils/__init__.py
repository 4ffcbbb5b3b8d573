"""The seed-003 public API, kept where that document shows it:

    from pipeline_utils import load_pipeline, load_shared_pipeline, MAX_CACHE_SIZE

The code lives in engine/ (engine/loaders.py, engine/cache.py). Nothing loads at import time.
"""
MAX_CACHE_SIZE = 2  # pipelines kept loaded; set before creating a PipelineCache (or --max-cache-size)

from engine.loaders import ModelUnavailableError, load_pipeline, load_shared_pipeline  # noqa: E402,F401
from engine.cache import PipelineCache  # noqa: E402,F401
