"""Architecture numbers the memory estimator needs, per model (pure).

Each family module builds them (families/cogvideox.py, families/wan.py: `ModelFamily.arch`) from the
component configs and parameter counts of a model: configs/models.yaml for registry models, a local
folder's config.json files and safetensors headers for folders (configs/local.py). Parameter counts are
written only in models.yaml; `largest_leaf_params` is the biggest single layer (what leaf-level offload keeps
on the GPU), `non_block_params` what stays outside the repeated blocks (resident under block-level offload).

Activation coefficients are measured, not guessed: `act_elems_per_dim` and the VAE `*_elems_per_px` figures
are the peak of live tensor bytes (every storage an op creates, freed when its last reference goes) of the
real architectures with random weights on the CPU, divided by the tensor sizes they scale with and by the
element size. Live tensor bytes are what `torch.cuda.max_memory_allocated` counts, so the same figures serve
the CUDA estimate. Re-measure with `bench/plan_accuracy.py --calibrate` when diffusers moves.
"""
from __future__ import annotations

from collections.abc import Mapping

from configs.schema import ModelSpec, task_experts
from configs.registry import get_model_spec, load_registry
from families import ModelArch, TextEncoderArch, TransformerArch, VaeArch  # noqa: F401  (re-exported)


def arch_for(spec: ModelSpec, task: str | None = None) -> ModelArch:
    """The estimator's numbers for a model, from its family and its configs and counts. With `task`, the
    experts that task's pipeline runs (a two-expert model's V2V pipeline holds the high-noise expert alone)."""
    note = f"sizes read from the local folder {spec.folder}" if spec.folder else ""
    arch = spec.family_module.arch(spec.config, spec.component_parts(), spec.params.get("image_encoder", 0))
    experts = arch.experts if task is None else min(arch.experts, task_experts(spec, task))
    return ModelArch(arch.transformer, arch.text_encoder, arch.vae, arch.image_encoder_params, note, experts)


class _Archs(Mapping):
    """`ARCHS[model_id]`: the registry's architectures, built on first use (no file read at import)."""

    def __getitem__(self, model: str) -> ModelArch:
        return arch_for(get_model_spec(model))

    def __iter__(self):
        return iter(load_registry())

    def __len__(self) -> int:
        return len(load_registry())


ARCHS: Mapping[str, ModelArch] = _Archs()
