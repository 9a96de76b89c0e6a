"""Attribute adapter: zero-initialised key/value projections added to the attention of a FLUX transformer.

The adapter is the x-flux / diffusers IP-Adapter arrangement, fed with attribute tokens instead of CLIP image
embeddings:

    tokens (B, l, d_ctx) -> token_projection, token_norm -> (B, l, P)     once per forward, in the adapter
    in each adapted double-stream block:
        k = to_k_ip(tokens), v = to_v_ip(tokens)                         (B, l, heads * head_dim)
        ip = softmax(q_img k^T / sqrt(head_dim)) v                        q_img: the block's image queries
                                                                          after QK-norm, before RoPE
        hidden_states += scale * mask[b] * ip                             after the block's feed-forward

It is installed by swapping the attention processors of the adapted blocks (`load_attribute_adapter`), never
by editing the base model's weights or classes, and removed by swapping the base processors back. Each
processor holds only its added weights (`to_k_ip`, `to_v_ip`); the shared token projection lives in
`AttributeAdapter`.

Only double-stream blocks are adapted. A single-stream block's attention sees one concatenated [text, image]
sequence and its processor is not told where the text ends, so it cannot restrict the added attention to image
tokens without editing the block; x-flux and diffusers' FLUX IP-Adapter also adapt double-stream blocks only.

The per-row `mask` is what makes one batched forward evaluate D(0, .) and D(A_i, .) rows together: a row with
mask 0 gets exactly zero from the adapter, i.e. it is the frozen base model. Training must drop the attribute
condition the same way (mask 0), so the null attribute seen at inference is the one seen in training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG_NAME = "attribute_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "attribute_adapter.safetensors"
ADAPTER_FORMAT_VERSION = 1


class AttributeTokenWidthError(ValueError):
    """Attribute tokens whose width is not the width the adapter was built for."""


@dataclass
class AttributeAdapterConfig:
    """Everything needed to rebuild an `AttributeAdapter`; saved as attribute_adapter_config.json."""

    token_dim: int  # d_ctx: width of the encoder's attribute tokens
    projection_dim: int  # P: width after the token projection, input of every block's to_k_ip / to_v_ip
    hidden_size: int  # the transformer's inner dim (heads * head_dim)
    num_attention_heads: int
    num_double_blocks: int  # of the transformer the adapter was built for
    blocks: list[int] = field(default_factory=list)  # adapted double-stream block indices
    format_version: int = ADAPTER_FORMAT_VERSION
    # True: the encoder's pooled search vector is appended to its tokens as one more token (`condition_tokens`).
    # With the floor-fitted starter encoder the pooled vector carries what real photos' lighting and palette are
    # (the connector's tokens alone do not: bench/RESULTS.md, "The floor fit").
    pooled_token: bool = False
    # A reference of weight w steers with w * weight_gain in the guidance rule (pipeline.combine_velocities): the
    # adapter's calibrated strength, so that a user's default weight 1 gives a visible transfer. Set after training
    # (training.generator_pretrain adapter --weight-gain), e.g. from bench/transfer_score.py on tuning cases.
    weight_gain: float = 1.0

    def __post_init__(self) -> None:
        if not (
            isinstance(self.weight_gain, (int, float)) and math.isfinite(self.weight_gain) and self.weight_gain > 0
        ):
            raise ValueError(f"weight_gain must be a finite number above 0, got {self.weight_gain!r}")

    @classmethod
    def for_transformer(
        cls,
        transformer: FluxTransformer2DModel,
        token_dim: int,
        projection_dim: int | None = None,
        blocks: Sequence[int] | None = None,
        pooled_token: bool = False,
    ) -> AttributeAdapterConfig:
        """Config of an adapter for `transformer`: all double-stream blocks unless `blocks` names some."""
        config = transformer.config
        num_double_blocks = config.num_layers
        hidden_size = config.num_attention_heads * config.attention_head_dim
        return cls(
            token_dim=token_dim,
            projection_dim=projection_dim or hidden_size,
            hidden_size=hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_double_blocks=num_double_blocks,
            blocks=sorted(blocks) if blocks is not None else list(range(num_double_blocks)),
            pooled_token=pooled_token,
        )


class AttributeAttnProcessor(nn.Module):
    """FLUX double-stream joint attention plus attention from the image queries to the attribute tokens.

    The joint-attention path is `FluxAttnProcessor`'s, line for line, so that with the adapter off (scale 0,
    no tokens, or mask 0 for a row) the block's output is bit-identical to the base model's.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, hidden_size: int, projection_dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.to_k_ip = nn.Linear(projection_dim, hidden_size, bias=True)
        self.to_v_ip = nn.Linear(projection_dim, hidden_size, bias=True)
        # Zero-initialised so a fresh adapter adds exactly nothing; v = 0 alone would do, k = 0 as well keeps
        # the
        # first training steps from depending on random key directions.
        for linear in (self.to_k_ip, self.to_v_ip):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        # The processor it replaced (a plain, weightless object), restored by unload_attribute_adapter.
        self.base_processor = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,  # (B, S, D) image tokens
        encoder_hidden_states: torch.Tensor | None = None,  # (B, T, D) text tokens
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,  # (B, l, P) projected attribute tokens
        ip_adapter_masks: torch.Tensor | None = None,  # (B,) 1 = this row is conditioned, 0 = null attribute
    ):
        # The two keyword names are diffusers' own IP-Adapter names: FluxAttention.forward passes them to
        # every
        # processor and silently drops them for processors that do not take them (the single-stream blocks).
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        encoder_query = attn.add_q_proj(encoder_hidden_states)
        encoder_key = attn.add_k_proj(encoder_hidden_states)
        encoder_value = attn.add_v_proj(encoder_hidden_states)

        query = query.unflatten(-1, (-1, attn.head_dim))  # (B, S, H, Dh)
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        image_query = query  # (B, S, H, Dh), normalised, without RoPE: the adapter's queries

        encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))  # (B, T, H, Dh)
        encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)

        query = torch.cat([encoder_query, query], dim=1)  # (B, T + S, H, Dh)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)  # (B, T + S, D)
        hidden_states = hidden_states.to(query.dtype)

        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

        if ip_hidden_states is None or self.scale == 0.0:
            return hidden_states, encoder_hidden_states

        ip_hidden_states = ip_hidden_states.to(self.to_k_ip.weight.dtype)
        ip_key = self.to_k_ip(ip_hidden_states).unflatten(-1, (-1, attn.head_dim))  # (B, l, H, Dh)
        ip_value = self.to_v_ip(ip_hidden_states).unflatten(-1, (-1, attn.head_dim))
        ip_attention = dispatch_attention_fn(
            image_query,
            ip_key,
            ip_value,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # (B, S, H, Dh)
        ip_attention = ip_attention.flatten(2, 3).to(image_query.dtype)  # (B, S, D)
        if ip_adapter_masks is not None:
            ip_attention = ip_attention * ip_adapter_masks.to(ip_attention.dtype).view(-1, 1, 1)
        # A third output is added by FluxTransformerBlock to the image stream after its feed-forward.
        return hidden_states, encoder_hidden_states, self.scale * ip_attention


class AttributeAdapter(nn.Module):
    """The learned part of D(A, c): a shared token projection and one processor per adapted block."""

    def __init__(self, config: AttributeAdapterConfig):
        super().__init__()
        self.config = config
        # The "small projection" from the encoder's token width to the adapter's: (B, l, d_ctx) -> (B, l, P).
        self.token_projection = nn.Linear(config.token_dim, config.projection_dim)
        self.token_norm = nn.LayerNorm(config.projection_dim)
        self.processors = nn.ModuleDict(
            {str(index): AttributeAttnProcessor(config.hidden_size, config.projection_dim) for index in config.blocks}
        )

    @classmethod
    def for_transformer(
        cls,
        transformer: FluxTransformer2DModel,
        token_dim: int,
        projection_dim: int | None = None,
        blocks: Sequence[int] | None = None,
        pooled_token: bool = False,
    ) -> AttributeAdapter:
        """A fresh, zero-initialised adapter matching `transformer` and the encoder's token width."""
        config = AttributeAdapterConfig.for_transformer(transformer, token_dim, projection_dim, blocks, pooled_token)
        return cls(config).to(device=transformer.device, dtype=transformer.dtype)

    def condition_tokens(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The adapter's input from an encoder's output: `tokens` (B, l, d_ctx), with `pooled` (B, d_ctx) appended
        as token l + 1 when the adapter was trained so (`pooled_token`). Training and the pipeline both call this.
        """
        if not self.config.pooled_token:
            return tokens
        return torch.cat([tokens, pooled.to(tokens.dtype).unsqueeze(1)], dim=1)  # (B, l + 1, d_ctx)

    def project_tokens(self, attribute_tokens: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, l, d_ctx) -> adapter tokens (B, l, P)."""
        check_attribute_tokens(attribute_tokens, self.config.token_dim)
        weight = self.token_projection.weight
        tokens = attribute_tokens.to(device=weight.device, dtype=weight.dtype)
        return self.token_norm(self.token_projection(tokens))  # (B, l, P)

    def attention_kwargs(
        self, attribute_tokens: torch.Tensor, attribute_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """`joint_attention_kwargs` for `FluxTransformer2DModel.forward`: one row of tokens per batch row.

        attribute_tokens: (B, l, d_ctx), one row per transformer batch row.
        attribute_mask: (B,), 1 for conditioned rows and 0 for null-attribute rows; None = all conditioned.
        """
        kwargs = {"ip_hidden_states": self.project_tokens(attribute_tokens)}
        if attribute_mask is not None:
            if attribute_mask.shape != (attribute_tokens.shape[0],):
                raise ValueError(
                    f"attribute_mask must have shape ({attribute_tokens.shape[0]},), one value per row of "
                    f"attribute_tokens; got {tuple(attribute_mask.shape)}."
                )
            kwargs["ip_adapter_masks"] = attribute_mask.to(self.token_projection.weight.device)
        return kwargs

    def set_scale(self, scale: float | Sequence[float] | Mapping[int, float]) -> None:
        """Adapter strength: a float for all blocks, one value per adapted block, or {block index: scale}."""
        _set_processor_scales({index: self.processors[str(index)] for index in self.config.blocks}, scale)

    @property
    def scales(self) -> dict[int, float]:
        """The current scale of each adapted block."""
        return {index: self.processors[str(index)].scale for index in self.config.blocks}

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write attribute_adapter_config.json and attribute_adapter.safetensors into `save_directory`."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> AttributeAdapter:
        """Load an adapter written by `save_pretrained` (on the CPU, float32 as stored)."""
        directory = Path(directory)
        config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
        missing = [path.name for path in (config_path, weights_path) if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not an attribute adapter directory: missing {', '.join(missing)}. "
                "Point at a folder written by AttributeAdapter.save_pretrained."
            )
        config = AttributeAdapterConfig(**json.loads(config_path.read_text()))
        if config.format_version != ADAPTER_FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {config.format_version}; this code reads version "
                f"{ADAPTER_FORMAT_VERSION}."
            )
        adapter = cls(config)
        result = adapter.load_state_dict(load_file(weights_path), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{weights_path} does not match {config_path}: missing {result.missing_keys}, unexpected "
                f"{result.unexpected_keys}. Save the adapter again with AttributeAdapter.save_pretrained."
            )
        return adapter


def check_attribute_tokens(attribute_tokens: torch.Tensor, token_dim: int) -> None:
    """Raise a clear error unless `attribute_tokens` is a (B, l, token_dim) tensor."""
    if not isinstance(attribute_tokens, torch.Tensor) or attribute_tokens.ndim != 3:
        shape = tuple(attribute_tokens.shape) if isinstance(attribute_tokens, torch.Tensor) else type(attribute_tokens)
        raise AttributeTokenWidthError(
            f"attribute tokens must be a (batch, tokens, {token_dim}) tensor (AttributeEmbeddings.tokens); got {shape}."
        )
    if attribute_tokens.shape[-1] != token_dim:
        raise AttributeTokenWidthError(
            f"attribute tokens have width {attribute_tokens.shape[-1]} but the loaded attribute adapter "
            f"expects d_ctx = {token_dim}. Encode with the encoder the adapter was trained with, or load "
            "the adapter trained for this encoder."
        )


def _set_processor_scales(
    processors: Mapping[int, AttributeAttnProcessor], scale: float | Sequence[float] | Mapping[int, float]
) -> None:
    blocks = sorted(processors)
    if isinstance(scale, Mapping):
        unknown = sorted(set(scale) - set(blocks))
        if unknown:
            raise ValueError(f"set_attribute_scale: blocks {unknown} have no adapter; adapted blocks: {blocks}.")
        scales = dict(scale)
    elif isinstance(scale, Sequence) and not isinstance(scale, str):
        if len(scale) != len(blocks):
            raise ValueError(
                f"set_attribute_scale: got {len(scale)} scales for {len(blocks)} adapted blocks {blocks}; "
                "pass one float, one scale per adapted block, or a {block index: scale} dict."
            )
        scales = dict(zip(blocks, scale, strict=True))
    else:
        scales = dict.fromkeys(blocks, scale)
    for index, value in scales.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"set_attribute_scale: the scale of block {index} is {value}; use a finite float.")
        processors[index].scale = value


def _adapted_attention(transformer: FluxTransformer2DModel, index: int):
    return transformer.transformer_blocks[index].attn


def _attribute_processors(transformer: FluxTransformer2DModel) -> dict[int, AttributeAttnProcessor]:
    return {
        index: block.attn.processor
        for index, block in enumerate(transformer.transformer_blocks)
        if isinstance(block.attn.processor, AttributeAttnProcessor)
    }


def load_attribute_adapter(
    transformer: FluxTransformer2DModel, adapter: AttributeAdapter | str | Path, scale: float = 1.0
) -> AttributeAdapter:
    """Install `adapter` (or one saved in a directory) into `transformer` by swapping attention processors.

    The adapter is moved to the transformer's device and dtype; the base weights are not touched.
    """
    if not isinstance(adapter, AttributeAdapter):
        adapter = AttributeAdapter.from_pretrained(adapter)
    config = adapter.config
    hidden_size = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if (config.hidden_size, config.num_double_blocks) != (hidden_size, transformer.config.num_layers):
        raise ValueError(
            f"this attribute adapter was built for a transformer with hidden size {config.hidden_size} and "
            f"{config.num_double_blocks} double-stream blocks; this transformer has {hidden_size} and "
            f"{transformer.config.num_layers}. Load the adapter trained for this generator."
        )
    if config.num_attention_heads != transformer.config.num_attention_heads:
        raise ValueError(
            f"this attribute adapter was built for {config.num_attention_heads} attention heads; this "
            f"transformer has {transformer.config.num_attention_heads}."
        )
    if _attribute_processors(transformer):
        raise ValueError("an attribute adapter is already loaded; call unload_attribute_adapter() first.")
    for index in config.blocks:
        current = _adapted_attention(transformer, index).processor
        if isinstance(current, nn.Module):
            raise ValueError(
                f"double-stream block {index} already runs a processor with weights "
                f"({type(current).__name__}, e.g. a diffusers IP-Adapter); unload it before loading the "
                "attribute adapter."
            )
    adapter.to(device=transformer.device, dtype=transformer.dtype)
    for index in config.blocks:
        attention = _adapted_attention(transformer, index)
        processor = adapter.processors[str(index)]
        processor.base_processor = attention.processor
        attention.set_processor(processor)
    adapter.set_scale(scale)
    return adapter


def set_attribute_scale(
    transformer: FluxTransformer2DModel, scale: float | Sequence[float] | Mapping[int, float]
) -> None:
    """Strength of the loaded adapter: a float, one value per adapted block, or {block index: scale}."""
    processors = _attribute_processors(transformer)
    if not processors:
        raise ValueError("no attribute adapter is loaded; call load_attribute_adapter() first.")
    _set_processor_scales(processors, scale)


def unload_attribute_adapter(transformer: FluxTransformer2DModel) -> None:
    """Put the base attention processors back; the transformer is then exactly the base model again."""
    processors = _attribute_processors(transformer)
    if not processors:
        raise ValueError("no attribute adapter is loaded; nothing to unload.")
    for index, processor in processors.items():
        _adapted_attention(transformer, index).set_processor(processor.base_processor)
        processor.base_processor = None


class AttributeAdapterLoaderMixin:
    """The loader trio on a pipeline that has a `transformer`, like diffusers' `FluxIPAdapterMixin`."""

    attribute_adapter: AttributeAdapter | None

    def load_attribute_adapter(self, adapter: AttributeAdapter | str | Path, scale: float = 1.0) -> AttributeAdapter:
        """Install an adapter (object or saved directory) into this pipeline's transformer."""
        self.attribute_adapter = load_attribute_adapter(self.transformer, adapter, scale)
        return self.attribute_adapter

    def set_attribute_scale(self, scale: float | Sequence[float] | Mapping[int, float]) -> None:
        """Adapter strength: a float, one value per adapted block, or {block index: scale}."""
        set_attribute_scale(self.transformer, scale)

    def unload_attribute_adapter(self) -> None:
        """Restore the base attention processors and forget the adapter."""
        unload_attribute_adapter(self.transformer)
        self.attribute_adapter = None
