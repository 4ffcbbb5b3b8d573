"""Model loading, the pipeline cache, the tiny offline family and the runner.

Public API (seed 003): `load_pipeline`, `load_shared_pipeline`, `MAX_CACHE_SIZE`.
Nothing loads at import time.
"""
MAX_CACHE_SIZE = 2  # pipelines kept loaded; set before creating a PipelineCache (or --max-cache-size)

from pipeline_utils.loaders import ModelUnavailableError, load_pipeline, load_shared_pipeline  # noqa: E402,F401
from pipeline_utils.cache import PipelineCache  # noqa: E402,F401
