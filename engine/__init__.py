"""The engine: what runs a generation, apart from how it is shown.

resolve (request -> ResolvedRun, every refusal), plan glue, modifiers (LoRA, step cache, attention, compile,
offload: applied in one order, removed after every run), the runner, the pipeline cache and loaders, the job
queue and its recovery, results on disk, finishing steps, the tiny offline models.

Nothing here imports gradio; nothing loads a model or touches a GPU at import time.
"""
