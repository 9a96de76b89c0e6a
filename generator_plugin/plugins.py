"""Generator plugins: named loaders of an AttributePipeline, found through the `omniattr.generators` group.

A plugin is a class (or object) with a `name` and a `load(weights_dir, *, device, dtype, adapter_dir)` method
returning an `AttributePipeline`. Third-party packages register one in their packaging metadata:

    [project.entry-points."omniattr.generators"]
    my_generator = "my_package.plugin:MyGeneratorPlugin"

The built-in `flux` plugin is declared the same way in the project's pyproject.toml, and is also known in code
so that a source checkout whose metadata predates the declaration still finds it.
"""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch and diffusers load with a generator, not with this registry (start-up checks use it)
    import torch

    from generator_plugin.pipeline import AttributePipeline

ENTRY_POINT_GROUP = "omniattr.generators"
ADAPTER_SUBFOLDER = "attribute_adapter"
REQUIRED_SUBFOLDERS = ("transformer", "vae", "scheduler")

logger = logging.getLogger(__name__)


class UnknownGeneratorError(LookupError):
    """No generator plugin has the requested name."""


class GeneratorWeightsNotFoundError(FileNotFoundError):
    """The weights directory given to a plugin does not exist or lacks a required part."""


@runtime_checkable
class GeneratorPlugin(Protocol):
    """What a generator plugin provides."""

    name: str

    def load(
        self,
        weights_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        adapter_dir: str | Path | None = None,
    ) -> AttributePipeline: ...


class FluxGeneratorPlugin:
    """Built-in plugin: FLUX-class weights in diffusers layout from a local directory.

    Layout: transformer/ (FluxTransformer2DModel), vae/ (AutoencoderKL), scheduler/
    (FlowMatchEulerDiscreteScheduler), optionally text_encoder/ + tokenizer/ (CLIP) and text_encoder_2/ +
    tokenizer_2/ (T5), and attribute_adapter/.
    A FLUX.1 checkpoint saved by diffusers and the project's starter generator (written by
    `AttributePipeline.save_pretrained`) both have this layout.
    """

    name = "flux"

    def load(
        self,
        weights_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        adapter_dir: str | Path | None = None,
    ) -> AttributePipeline:
        """Load the pipeline; dtype defaults to float32 on the CPU and bfloat16 elsewhere."""
        root = Path(weights_dir)
        if not root.is_dir():
            raise GeneratorWeightsNotFoundError(
                f"generator weights directory {root} does not exist. Pass the folder that holds "
                f"{', '.join(name + '/' for name in REQUIRED_SUBFOLDERS)} (diffusers layout)."
            )
        missing = [name for name in REQUIRED_SUBFOLDERS if not (root / name).is_dir()]
        if missing:
            raise GeneratorWeightsNotFoundError(
                f"{root} is not a diffusers FLUX directory: missing "
                f"{', '.join(name + '/' for name in missing)}. "
                f"It needs {', '.join(name + '/' for name in REQUIRED_SUBFOLDERS)}."
            )
        import torch
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        from generator_plugin.pipeline import AttributePipeline

        if dtype is None:
            dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
        text_parts = _load_text_encoders(root, dtype)
        pipeline = AttributePipeline(transformer=transformer, vae=vae, scheduler=scheduler, **text_parts)
        adapter_path = Path(adapter_dir) if adapter_dir is not None else root / ADAPTER_SUBFOLDER
        if adapter_dir is not None and not adapter_path.is_dir():
            raise GeneratorWeightsNotFoundError(f"attribute adapter directory {adapter_path} does not exist.")
        if adapter_path.is_dir():
            pipeline.load_attribute_adapter(adapter_path)
        return pipeline.to(device)


def _load_text_encoders(root: Path, dtype: torch.dtype) -> dict:
    """CLIP (pooled) and T5 (sequence) encoders and their tokenizers, when the directory has them."""
    present = {name: (root / name).is_dir() for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    if not any(present.values()):
        return {}
    if not all(present.values()):
        missing = [name + "/" for name, found in present.items() if not found]
        raise GeneratorWeightsNotFoundError(
            f"{root} has part of FLUX's text encoders; missing {', '.join(missing)}. Provide all of "
            "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, or none (and pass prompt embeddings)."
        )
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    return {
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype),
        "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer"),
        "text_encoder_2": T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=dtype),
        "tokenizer_2": AutoTokenizer.from_pretrained(root / "tokenizer_2"),
    }


BUILTIN_GENERATORS: dict[str, type] = {"flux": FluxGeneratorPlugin}


def available_generators() -> dict[str, EntryPoint | type]:
    """Every generator name: the built-ins plus the entry points of the `omniattr.generators` group."""
    found: dict[str, EntryPoint | type] = dict(BUILTIN_GENERATORS)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        builtin = BUILTIN_GENERATORS.get(entry_point.name)
        if builtin is not None:
            if entry_point.value != f"{builtin.__module__}:{builtin.__qualname__}":
                logger.warning(
                    "ignoring entry point %s = %s: %r is a built-in generator name",
                    entry_point.name,
                    entry_point.value,
                    entry_point.name,
                )
            continue
        found[entry_point.name] = entry_point
    return found


def get_generator_plugin(name: str) -> GeneratorPlugin:
    """The plugin registered as `name`, instantiated."""
    generators = available_generators()
    if name not in generators:
        raise UnknownGeneratorError(
            f"unknown generator plugin {name!r}; available: {', '.join(sorted(generators))}. A package adds "
            f'one by declaring an entry point in the "{ENTRY_POINT_GROUP}" group.'
        )
    target = generators[name]
    plugin = target.load() if isinstance(target, EntryPoint) else target
    if isinstance(plugin, type):
        plugin = plugin()
    if not isinstance(plugin, GeneratorPlugin):
        raise TypeError(
            f"generator plugin {name!r} ({type(plugin).__name__}) does not provide `name` and `load(weights_dir, ...)`."
        )
    return plugin


def load_generator(
    name: str,
    weights_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    adapter_dir: str | Path | None = None,
) -> AttributePipeline:
    """Load an AttributePipeline with the plugin called `name` (e.g. "flux") from `weights_dir`."""
    return get_generator_plugin(name).load(weights_dir, device=device, dtype=dtype, adapter_dir=adapter_dir)
