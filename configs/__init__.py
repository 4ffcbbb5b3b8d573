"""Registry, presets and request/plan dataclasses. Imports nothing of ours."""
from configs.schema import (  # noqa: F401
    DecodeSettings,
    GenerationRequest,
    ModelSpec,
    Plan,
    Preset,
    RequestError,
    get_model_spec,
    load_presets,
    load_registry,
    models_for_task,
    resolve_request,
)
