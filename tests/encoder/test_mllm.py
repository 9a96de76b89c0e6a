"""The mllm backend on tiny random Qwen2-VL and Qwen2.5-VL models built from configs (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from encoder import AttributeEncoder
from encoder.testing import QWEN_KINDS, tiny_mllm_encoder

ATTRIBUTES = ["image lighting", "dog pose", ["man identity", "man hairstyle"]]


@pytest.fixture(scope="module")
def images():
    return [data.chelsea(), data.coffee(), Image.fromarray(data.camera())]


@pytest.fixture(scope="module", params=QWEN_KINDS)
def encoder(request, tmp_path_factory):
    model = tiny_mllm_encoder(tmp_path_factory.mktemp(request.param), kind=request.param).eval()
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the tests below
        for name, param in model.backbone.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.mark.slow
def test_shapes(encoder, images):
    with torch.no_grad():
        out = encoder.encode(images, ATTRIBUTES)
    assert out.tokens.shape == (3, 4, 32) and out.pooled.shape == (3, 32)
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    assert (out.pooled[0] - out.pooled[1]).abs().max() > 1e-4


@pytest.mark.slow
def test_grid_equals_encode_pair_by_pair(encoder, images):
    with torch.no_grad():
        grid = encoder.encode_grid(images, ATTRIBUTES)
        assert grid.tokens.shape == (3, 3, 4, 32)
        for k, attribute in enumerate(ATTRIBUTES):
            single = encoder.encode(images, [attribute] * 3)
            assert (grid.tokens[:, k] - single.tokens).abs().max() <= 1e-4
            assert (grid.pooled[:, k] - single.pooled).abs().max() <= 1e-4


def test_positions_and_pixels_match_the_models_own_processing(encoder, images):
    """Our hand-built patches and M-RoPE positions equal what transformers computes itself."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    backbone = encoder.backbone
    prefix = backbone.prefix_inputs(images[:1])
    resized = Image.fromarray(images[0]).resize((56, 56), Image.BICUBIC)
    reference = Qwen2VLImageProcessorPil(do_resize=False)(images=[resized], return_tensors="pt")
    torch.testing.assert_close(prefix["pixel_values"], reference["pixel_values"], atol=1e-5, rtol=0)
    assert prefix["image_grid_thw"].tolist() == reference["image_grid_thw"].tolist()

    start = int(prefix["position_ids"].max()) + 1
    suffix_ids, _, suffix_positions = backbone.suffix_inputs(["image lighting"], start)
    input_ids = torch.cat([prefix["input_ids"], suffix_ids], dim=1)
    own_positions, _ = backbone.vlm.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == backbone.image_token_id).int(),
        image_grid_thw=prefix["image_grid_thw"],
    )
    assert torch.equal(own_positions, torch.cat([prefix["position_ids"], suffix_positions], dim=2))


def test_lora_only_on_language_model_attention(encoder):
    wrapped = [n for n, _ in encoder.backbone.backbone.named_modules() if n.endswith(".lora_A")]
    assert wrapped and all("language_model" in n for n in wrapped)
    assert {n.split(".")[-2] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.slow
def test_gradients_reach_lora_and_connector_not_frozen_weights(encoder, images):
    encoder.zero_grad()
    out = encoder.encode_grid(images[:2], ATTRIBUTES[:2])  # through the shared, repeated KV cache
    out.tokens.square().mean().backward()
    grads = {n: p.grad for n, p in encoder.named_parameters()}
    trained = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
    assert any(n.startswith("backbone.connector.") for n in trained)
    frozen = [n for n in grads if "lora_" not in n and not n.startswith("backbone.connector.")]
    assert frozen and all(grads[n] is None for n in frozen)
    assert all(not p.requires_grad for n, p in encoder.named_parameters() if n in frozen)
    encoder.zero_grad()


@pytest.mark.slow
def test_save_load_round_trip(encoder, images, tmp_path):
    encoder.save_pretrained(tmp_path)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    loaded = AttributeEncoder.from_pretrained(tmp_path).eval()
    assert loaded.version == encoder.version and loaded.version.startswith("mllm-")
    with torch.no_grad():
        before = encoder.encode(images, ATTRIBUTES)
        after = loaded.encode(images, ATTRIBUTES)
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)
    with pytest.raises(ValueError, match="is a 'mllm' encoder, not 'compact'"):
        AttributeEncoder.from_pretrained(tmp_path, backend="compact")


@pytest.mark.slow
def test_bf16(encoder, images):
    with torch.no_grad():
        reference = encoder.encode(images[:2], ATTRIBUTES[:2]).pooled
        encoder.to(dtype=torch.bfloat16)
        try:
            half = encoder.encode_grid(images[:2], ATTRIBUTES[:2])
        finally:
            encoder.to(dtype=torch.float32)
    assert half.tokens.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(half.pooled[[0, 1], [0, 1]].float(), reference).min() > 0.95


def test_image_size_must_fit_the_patch_grid(tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size x spatial_merge_size = 28"):
        tiny_mllm_encoder(tmp_path, image_size=50)


def test_bad_images_name_the_problem(encoder):
    with pytest.raises(ValueError, match="image 0: .*channels last"):
        encoder.encode([np.zeros((3, 30, 30), np.uint8)], ["lighting"])


@pytest.mark.slow
def test_backbone_protocol_defaults(encoder, images):
    """mllm keeps no per-image tokens between calls, encodes pairs as `encode` does, and has no trunk levels."""
    backbone = encoder.backbone
    assert backbone.image_tokens(images) is None
    with torch.no_grad():
        tokens, pooled = backbone.encode_pairs(images, ["image lighting", "dog pose"], [2, 0, 2], [0, 1, 1])
        expected = encoder.encode([images[2], images[0], images[2]], ["image lighting", "dog pose", "dog pose"])
    assert torch.equal(tokens, expected.tokens) and torch.equal(pooled, expected.pooled)
    with pytest.raises(ValueError, match="only be added to a compact encoder"):
        backbone.add_image_levels(["pixels"])
