"""Generation: a diffusers decoder D(A, c) with an attribute IP-Adapter, personalization and composition."""

from __future__ import annotations

import importlib

# Public names -> the module that defines them. Loaded on first use so that `import generator_plugin` stays
# cheap
# (diffusers and torch are imported only when a generator is actually used).
_EXPORTS = {
    "AttributeAdapter": "generator_plugin.adapter",
    "AttributeAdapterConfig": "generator_plugin.adapter",
    "AttributeAttnProcessor": "generator_plugin.adapter",
    "AttributeTokenWidthError": "generator_plugin.adapter",
    "load_attribute_adapter": "generator_plugin.adapter",
    "set_attribute_scale": "generator_plugin.adapter",
    "unload_attribute_adapter": "generator_plugin.adapter",
    "AttributePipeline": "generator_plugin.pipeline",
    "AttributePipelineOutput": "generator_plugin.pipeline",
    "GeneratorInputError": "generator_plugin.pipeline",
    "AttributePipelineInputs": "generator_plugin.pipeline",
    "PromptInputs": "generator_plugin.pipeline",
    "ReferenceInputs": "generator_plugin.pipeline",
    "SamplingInputs": "generator_plugin.pipeline",
    "MAX_REFERENCES": "omniattr.domain",  # the domain's limit, re-exported: one definition
    "transfer_scores": "generator_plugin.pipeline",
    "ENTRY_POINT_GROUP": "generator_plugin.plugins",
    "FluxGeneratorPlugin": "generator_plugin.plugins",
    "GeneratorPlugin": "generator_plugin.plugins",
    "GeneratorWeightsNotFoundError": "generator_plugin.plugins",
    "UnknownGeneratorError": "generator_plugin.plugins",
    "available_generators": "generator_plugin.plugins",
    "get_generator_plugin": "generator_plugin.plugins",
    "load_generator": "generator_plugin.plugins",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'generator_plugin' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
