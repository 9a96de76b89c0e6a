"""The attribute adapter: zero effect when off, per-row masking, loader trio, saved config + safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from generator_plugin.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AttributeAdapter,
    AttributeAttnProcessor,
    AttributeTokenWidthError,
    load_attribute_adapter,
    set_attribute_scale,
    unload_attribute_adapter,
)
from generator_plugin.testing import random_attribute_tokens, randomize_attribute_adapter, tiny_transformer


def forward_inputs(batch: int = 1, seed: int = 0) -> dict:
    """Inputs of one forward of the tiny transformer: 16 image tokens, 8 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=generator),  # (B, S, 4 * C_lat)
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=generator),  # (B, T, joint_dim)
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "timestep": torch.full((batch,), 0.7),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, columns], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(8, 3),
    }


def run(transformer, inputs, adapter=None, tokens=None, mask=None) -> torch.Tensor:
    kwargs = adapter.attention_kwargs(tokens, mask) if adapter is not None else None
    with torch.no_grad():
        return transformer(**inputs, joint_attention_kwargs=kwargs, return_dict=False)[0]


@pytest.fixture
def transformer():
    return tiny_transformer(seed=0)


def test_fresh_adapter_leaves_the_output_exactly_equal_to_the_base_model(transformer):
    inputs = forward_inputs(batch=2)
    base = run(transformer, inputs)
    adapter = load_attribute_adapter(transformer, AttributeAdapter.for_transformer(transformer, token_dim=32))
    tokens = random_attribute_tokens(2, num_tokens=4, token_dim=32)

    assert torch.equal(run(transformer, inputs, adapter, tokens), base)
    randomize_attribute_adapter(adapter)  # a trained adapter does change the output
    assert (run(transformer, inputs, adapter, tokens) - base).abs().max() > 1e-3


def test_scale_zero_gives_the_base_model_exactly_and_scale_one_does_not(transformer):
    inputs = forward_inputs()
    base = run(transformer, inputs)
    adapter = randomize_attribute_adapter(AttributeAdapter.for_transformer(transformer, token_dim=32))
    load_attribute_adapter(transformer, adapter, scale=0.0)
    tokens = random_attribute_tokens(1)

    assert torch.equal(run(transformer, inputs, adapter, tokens), base)
    set_attribute_scale(transformer, 1.0)
    assert (run(transformer, inputs, adapter, tokens) - base).abs().max() > 1e-3


def test_masked_rows_are_the_base_model_exactly_within_one_batch(transformer):
    inputs = forward_inputs(batch=3)
    base = run(transformer, inputs)
    adapter = load_attribute_adapter(
        transformer, randomize_attribute_adapter(AttributeAdapter.for_transformer(transformer, token_dim=32))
    )
    output = run(transformer, inputs, adapter, random_attribute_tokens(3), torch.tensor([0.0, 1.0, 0.0]))

    assert torch.equal(output[0], base[0])
    assert torch.equal(output[2], base[2])
    assert (output[1] - base[1]).abs().max() > 1e-3


def test_unload_restores_the_base_processors_and_leaves_base_weights_untouched(transformer):
    inputs = forward_inputs()
    base = run(transformer, inputs)
    base_state = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    adapter = randomize_attribute_adapter(AttributeAdapter.for_transformer(transformer, token_dim=32))
    load_attribute_adapter(transformer, adapter)

    processors = [block.attn.processor for block in transformer.transformer_blocks]
    assert all(isinstance(processor, AttributeAttnProcessor) for processor in processors)
    assert all(isinstance(block.attn.processor, FluxAttnProcessor) for block in transformer.single_transformer_blocks)
    with_adapter = transformer.state_dict()
    added = set(with_adapter) - set(base_state)
    assert added and all(".processor.to_k_ip." in key or ".processor.to_v_ip." in key for key in added)
    assert all(torch.equal(with_adapter[name], tensor) for name, tensor in base_state.items())

    unload_attribute_adapter(transformer)
    assert all(isinstance(block.attn.processor, FluxAttnProcessor) for block in transformer.transformer_blocks)
    assert set(transformer.state_dict()) == set(base_state)
    assert torch.equal(run(transformer, inputs), base)
    with pytest.raises(ValueError, match="no attribute adapter is loaded"):
        unload_attribute_adapter(transformer)


def test_scale_per_block(transformer):
    inputs = forward_inputs()
    adapter = randomize_attribute_adapter(AttributeAdapter.for_transformer(transformer, token_dim=32))
    load_attribute_adapter(transformer, adapter)
    tokens = random_attribute_tokens(1)
    only_block_1 = AttributeAdapter.for_transformer(transformer, token_dim=32, blocks=[1])
    only_block_1.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith("processors.0.")})

    set_attribute_scale(transformer, [0.0, 1.0])
    assert adapter.scales == {0: 0.0, 1: 1.0}
    per_list = run(transformer, inputs, adapter, tokens)
    set_attribute_scale(transformer, {0: 0.0, 1: 1.0})
    assert torch.equal(run(transformer, inputs, adapter, tokens), per_list)
    set_attribute_scale(transformer, 1.0)
    assert (run(transformer, inputs, adapter, tokens) - per_list).abs().max() > 1e-4

    # Block 0 at scale 0 is the same model as an adapter on block 1 only.
    unload_attribute_adapter(transformer)
    load_attribute_adapter(transformer, only_block_1)
    assert torch.allclose(run(transformer, inputs, only_block_1, tokens), per_list, atol=1e-6)

    with pytest.raises(ValueError, match="got 3 scales for 1 adapted blocks"):
        set_attribute_scale(transformer, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"blocks \[0\] have no adapter"):
        set_attribute_scale(transformer, {0: 0.5})


def test_save_and_load_keep_config_and_weights(transformer, tmp_path):
    inputs = forward_inputs()
    adapter = randomize_attribute_adapter(AttributeAdapter.for_transformer(transformer, token_dim=32))
    adapter.save_pretrained(tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME).is_file()
    assert config["token_dim"] == 32 and config["blocks"] == [0, 1] and config["hidden_size"] == 32

    tokens = random_attribute_tokens(1)
    load_attribute_adapter(transformer, adapter)
    expected = run(transformer, inputs, adapter, tokens)
    unload_attribute_adapter(transformer)
    reloaded = load_attribute_adapter(transformer, tmp_path / "adapter")
    assert torch.equal(run(transformer, inputs, reloaded, tokens), expected)
    assert reloaded.config.weight_gain == 1.0  # the default
    unload_attribute_adapter(transformer)

    # an adapter saved before weight_gain existed loads with gain 1; a bad gain is refused with its value
    del config["weight_gain"]
    (tmp_path / "adapter" / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    assert AttributeAdapter.from_pretrained(tmp_path / "adapter").config.weight_gain == 1.0
    (tmp_path / "adapter" / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, "weight_gain": 0}))
    with pytest.raises(ValueError, match="weight_gain must be a finite number above 0, got 0"):
        AttributeAdapter.from_pretrained(tmp_path / "adapter")


def test_clear_errors(transformer, tmp_path):
    adapter = AttributeAdapter.for_transformer(transformer, token_dim=32)
    load_attribute_adapter(transformer, adapter)
    with pytest.raises(AttributeTokenWidthError, match="width 16 .* expects d_ctx = 32"):
        adapter.attention_kwargs(random_attribute_tokens(1, token_dim=16))
    with pytest.raises(ValueError, match="already loaded"):
        load_attribute_adapter(transformer, AttributeAdapter.for_transformer(transformer, token_dim=32))

    deeper = tiny_transformer(seed=0, num_layers=3)
    with pytest.raises(ValueError, match="2 double-stream blocks; this transformer has 32 and 3"):
        load_attribute_adapter(deeper, AttributeAdapter.for_transformer(transformer, token_dim=32))
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG_NAME):
        load_attribute_adapter(deeper, tmp_path / "nothing-here")


def test_pooled_token_appends_the_search_vector_which_steers_the_output(transformer, tmp_path):
    inputs = forward_inputs()
    tokens = random_attribute_tokens(1)  # (1, 4, 32)
    pooled = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)

    plain = AttributeAdapter.for_transformer(transformer, token_dim=32)
    assert torch.equal(plain.condition_tokens(tokens, pooled[:1]), tokens)

    adapter = randomize_attribute_adapter(
        AttributeAdapter.for_transformer(transformer, token_dim=32, pooled_token=True)
    )
    conditioned = adapter.condition_tokens(tokens, pooled[:1])
    assert conditioned.shape == (1, 5, 32)
    assert torch.equal(conditioned[:, :4], tokens) and torch.equal(conditioned[0, 4], pooled[0])

    load_attribute_adapter(transformer, adapter)
    first = run(transformer, inputs, adapter, adapter.condition_tokens(tokens, pooled[:1]))
    second = run(transformer, inputs, adapter, adapter.condition_tokens(tokens, pooled[1:]))
    assert not torch.allclose(first, second)  # same tokens, another pooled vector: another output
    unload_attribute_adapter(transformer)

    adapter.save_pretrained(tmp_path / "adapter")
    assert AttributeAdapter.from_pretrained(tmp_path / "adapter").config.pooled_token
