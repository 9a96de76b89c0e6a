"""Models as the indexer sees them: encoder checkpoints described without torch; the encoder and the generator
loaded once per process, on first use."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from store.errors import InvalidInputError

if TYPE_CHECKING:
    from encoder import AttributeEncoder
    from generator_plugin.pipeline import AttributePipeline

ENCODER_CONFIG_NAME = "encoder_config.json"  # the encoder package's checkpoint format (docs/architecture.md, "Encoder")


@dataclass(frozen=True)
class EncoderInfo:
    """What the metadata store records about a checkpoint; read from its files, no model loaded."""

    path: Path
    name: str
    version: str
    backend: str
    dimension: int
    checkpoint_sha256: str


def describe_encoder(path: Path) -> EncoderInfo:
    """Read a checkpoint's config and hash its files, so an API process can register it without torch."""
    path = Path(path)
    config_file = path / ENCODER_CONFIG_NAME
    if not config_file.is_file():
        raise InvalidInputError(
            f"{path} is not an encoder checkpoint ({ENCODER_CONFIG_NAME} is missing); "
            "point OMNIATTR_ENCODER_PATH at a directory written by AttributeEncoder.save_pretrained"
        )
    config = json.loads(config_file.read_text())
    if not config.get("version"):
        raise InvalidInputError(f"{config_file} has no version; re-save the encoder with save_pretrained")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return EncoderInfo(
        path=path,
        name=path.name,
        version=str(config["version"]),
        backend=str(config["backend"]),
        dimension=int(config["context_dim"]),
        checkpoint_sha256=digest.hexdigest(),
    )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EncoderProvider:
    """Loads the encoder on first use and keeps it for the life of the process (one per worker process)."""

    def __init__(self, path: Path, *, device: str = "auto"):
        self.path = Path(path)
        self.device = device
        self._encoder: AttributeEncoder | None = None
        self._lock = threading.Lock()

    def get(self) -> AttributeEncoder:
        """The loaded `encoder.AttributeEncoder`, in eval mode on its device."""
        with self._lock:
            if self._encoder is None:
                from encoder import AttributeEncoder  # torch is imported only by processes that encode

                encoder = AttributeEncoder.from_pretrained(self.path)
                self._encoder = encoder.to(resolve_device(self.device)).eval()
            return self._encoder


class GeneratorProvider:
    """Loads the generator plugin's pipeline on first use and keeps it for the life of the process."""

    def __init__(self, plugin: str, path: Path, *, device: str = "auto", steps: int = 28, size: int | None = None):
        self.plugin = plugin
        self.path = Path(path)
        self.device = device
        self.steps = steps  # denoising steps when a request names none
        self.size = size  # output height and width; None: the pipeline's default
        self._pipeline: AttributePipeline | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """InvalidInputError unless the plugin exists and the weights directory has its parts; run at start-up.

        A cheap check (no weights are read), so a wrong OMNIATTR_GENERATOR_PATH or _PLUGIN fails `omniattr up`
        at once instead of the first generation.
        """
        from generator_plugin.plugins import REQUIRED_SUBFOLDERS, UnknownGeneratorError, get_generator_plugin

        try:
            get_generator_plugin(self.plugin)
        except UnknownGeneratorError as error:
            raise InvalidInputError(f"OMNIATTR_GENERATOR_PLUGIN: {error}") from None
        if not self.path.is_dir():
            raise InvalidInputError(
                f"OMNIATTR_GENERATOR_PATH {self.path} is not a directory; point it at a diffusers-format generator "
                "folder, or set OMNIATTR_GENERATIONS_ENABLED=false to run without generations"
            )
        missing = [name for name in REQUIRED_SUBFOLDERS if not (self.path / name).is_dir()]
        if self.plugin == "flux" and missing:
            raise InvalidInputError(
                f"OMNIATTR_GENERATOR_PATH {self.path} is not a diffusers FLUX directory: it lacks "
                f"{', '.join(name + '/' for name in missing)}; point it at the folder that holds "
                f"{', '.join(name + '/' for name in REQUIRED_SUBFOLDERS)}, or set OMNIATTR_GENERATIONS_ENABLED=false"
            )

    def get(self) -> AttributePipeline:
        """The loaded pipeline, on its device, with diffusers' progress bars off."""
        with self._lock:
            if self._pipeline is None:
                from generator_plugin import load_generator

                self._pipeline = load_generator(self.plugin, self.path, device=resolve_device(self.device))
                self._pipeline.set_progress_bar_config(disable=True)  # workers report progress on the job
            return self._pipeline
