"""The starter generator's pretraining stages and the transfer-score check, on tiny sizes and a few pairs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from generator_plugin.adapter import AttributeAdapter
from generator_plugin.plugins import load_generator
from training import generator_pretrain as gp
from training.data.procedural import generate_dataset

ROOT = Path(__file__).resolve().parents[2]


def _load_bench(name: str):
    """bench/ holds scripts, not a package: load one as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    generate_dataset(out, num_pairs=8, seed=5, config=_procedural_config())
    return out


def _procedural_config():
    from training.data.procedural import ProceduralConfig

    return ProceduralConfig(size=64)


def test_vocabulary_covers_captions_and_ends_with_eos(pair_dir):
    _, captions = gp.load_examples(pair_dir, 32)
    vocabulary = gp.caption_vocabulary(captions)
    parts = gp.caption_text_encoders(vocabulary, max_length=64)
    ids = parts["tokenizer"](captions[0]).input_ids
    assert vocabulary[-1] == gp.EOS_TOKEN and ids[-1] == len(vocabulary) - 1
    assert vocabulary.index("<unk>") not in ids  # every caption word is known


@pytest.mark.slow
def test_one_norm_group_learns_flat_colours_better_than_an_instance_norm():
    """Flat random colours, 300 steps: the chroma (colour minus grey) left in the reconstruction error, as a share
    of the chroma's variance. The instance-norm setting (8 groups on 8 channels) kept the starter VAE grey."""
    colours = torch.randint(0, 256, (256, 3, 1, 1), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    images = colours.expand(256, 3, 32, 32).contiguous()
    x = gp.to_unit_range(images[:64])
    left = {}
    for groups in (1, 8):
        vae = gp.build_vae(seed=0, channels=(8, 16), latent_channels=4, size=32, norm_groups=groups)
        gp.train_vae(vae, images, steps=300, batch_size=16, lr=1e-3, log_every=1000)
        with torch.no_grad():
            y = vae.eval().decode(vae.encode(x).latent_dist.mean).sample
        left[groups] = float(((gp.chroma(x) - gp.chroma(y)) ** 2).mean() / (gp.chroma(x) ** 2).mean())
    assert left[1] < 0.4 and left[1] < 0.6 * left[8], left


@pytest.mark.slow
def test_vae_loss_decreases_on_a_fixed_batch(pair_dir):
    images, _ = gp.load_examples(pair_dir, 32)
    vae = gp.build_vae(seed=0, channels=(8, 16))
    batch = images[:4].repeat(4, 1, 1, 1)  # one fixed set of images, sampled with replacement
    losses = gp.train_vae(vae, batch, steps=30, batch_size=8, lr=3e-3)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    gp.set_latent_statistics(vae, images)
    latents = gp.encode_latents(vae, images)  # (N, S, 4 C)
    assert latents.shape == (len(images), 16 * 16 // 4, 16)
    assert abs(float(latents.std()) - 1.0) < 1e-3 and abs(float(latents.mean())) < 1e-3


@pytest.mark.slow
def test_transformer_loss_decreases_on_a_fixed_batch():
    transformer = gp.build_transformer(seed=0, num_layers=1, num_single_layers=1, heads=2, head_dim=16)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 16, 16, generator=generator)
    text = torch.randn(4, 8, 32, generator=generator)
    pooled = torch.randn(4, 32, generator=generator)
    _, losses = gp.train_transformer(
        transformer, latents, text, pooled, steps=60, batch_size=4, lr=3e-3, text_dropout=0.0
    )
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


@pytest.fixture(scope="module")
def generator_dir(pair_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generator")
    gp.pretrain_base(
        pair_dir,
        out,
        vae_channels=(8, 16, 16),
        vae_steps=3,
        vae_seconds=None,
        vae_batch_size=4,
        transformer_layers=(1, 1),
        transformer_heads=2,
        transformer_head_dim=16,
        transformer_steps=3,
        transformer_seconds=None,
        transformer_batch_size=4,
    )
    return out


TINY_BASE = dict(
    vae_channels=(8, 16, 16),
    vae_steps=3,
    vae_seconds=None,
    vae_batch_size=4,
    transformer_layers=(1, 1),
    transformer_heads=2,
    transformer_head_dim=16,
    transformer_seconds=None,
    transformer_batch_size=4,
)


@pytest.mark.slow
def test_base_stage_resumes_from_its_work_folder_as_if_never_stopped(pair_dir, tmp_path):
    from safetensors.torch import load_file

    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    gp.pretrain_base(pair_dir, stopped / "gen", size=32, transformer_steps=3, work=stopped / "work", **TINY_BASE)
    record = gp.pretrain_base(
        pair_dir, stopped / "gen", size=32, transformer_steps=5, work=stopped / "work", **TINY_BASE
    )
    gp.pretrain_base(pair_dir, straight / "gen", size=32, transformer_steps=5, **TINY_BASE)

    assert record["vae_steps"] == 3 and record["transformer_steps"] == 5
    assert {p.name for p in (stopped / "work").iterdir()} == {"images.pt", "vae.ckpt", "latents.pt", "transformer.ckpt"}
    resumed = load_file(next((stopped / "gen" / "transformer").glob("*.safetensors")))
    uninterrupted = load_file(next((straight / "gen" / "transformer").glob("*.safetensors")))
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-5, atol=1e-6)
    assert load_generator("flux", stopped / "gen").vae.config.sample_size == 32


def test_trunk_style_distance_prefers_the_same_texture_where_pixel_mse_prefers_a_blur():
    """The reason for the decoder stage: a blurred copy is closer in pixel MSE than another sample of the same
    texture, but farther in the trunk's style statistics and its perceptual distance keeps it far from zero."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1  # two samples of one texture (uniform noise)
    texture, other_sample = noise[:1], noise[1:]
    blurred = torch.nn.functional.avg_pool2d(texture, 5, stride=1, padding=2, count_include_pad=False)
    loss = gp.TrunkPerceptualLoss()
    assert float(((blurred - texture) ** 2).mean()) < float(((other_sample - texture) ** 2).mean())
    perceptual_blur, style_blur = loss(blurred, texture)
    perceptual_other, style_other = loss(other_sample, texture)
    assert float(style_other) < 0.5 * float(style_blur), (float(style_other), float(style_blur))
    same = loss(texture, texture)
    assert float(same[0]) < 1e-6 and float(same[1]) < 1e-10 and float(perceptual_blur) > 0.1

    reconstruction = blurred.clone().requires_grad_(True)
    sum(loss(reconstruction, texture)).backward()
    assert reconstruction.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in loss.trunk.parameters())


@pytest.mark.slow
def test_decoder_stage_changes_only_the_decoder_and_keeps_the_rest(pair_dir, generator_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "sharper"
    record = gp.pretrain_decoder(
        pair_dir, generator_dir, out, steps=3, max_seconds=None, batch_size=2, lr=1e-2, style_weight=1.0
    )
    assert record["steps"] == 3 and record["examples"] == 16
    before = load_file(next((generator_dir / "vae").glob("*.safetensors")))
    after = load_file(next((out / "vae").glob("*.safetensors")))
    assert before.keys() == after.keys()
    for name, weight in before.items():
        if name.startswith("decoder."):
            continue
        torch.testing.assert_close(after[name], weight, rtol=0, atol=0)  # the latent space does not move
    assert any(not torch.equal(after[name], weight) for name, weight in before.items() if name.startswith("decoder."))
    for name in ("transformer", "text_encoder", "scheduler"):
        copied, original = (sorted(p.name for p in (root / name).iterdir()) for root in (out, generator_dir))
        assert copied == original
    stored = json.loads((out / gp.PRETRAIN_CONFIG_NAME).read_text())
    assert stored["stage"] == "base" and stored["decoder"]["steps"] == 3
    pipeline = load_generator("flux", out)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        prompt="A photo of a red matte star.", height=64, width=64, num_inference_steps=2, max_sequence_length=64
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
def test_transformer_stage_continues_at_a_new_size_and_makes_it_the_default(pair_dir, generator_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bigger"
    record = gp.pretrain_transformer(
        pair_dir, generator_dir, out, size=96, steps=3, max_seconds=None, batch_size=2, work=tmp_path / "work"
    )
    assert record["steps"] == 3 and record["examples"] == 16
    before = load_file(next((generator_dir / "transformer").glob("*.safetensors")))
    after = load_file(next((out / "transformer").glob("*.safetensors")))
    assert before.keys() == after.keys()  # the base transformer alone: no adapter weights saved into it
    assert any(not torch.equal(after[name], weight) for name, weight in before.items())
    vae_before = load_file(next((generator_dir / "vae").glob("*.safetensors")))
    vae_after = load_file(next((out / "vae").glob("*.safetensors")))
    for name, weight in vae_before.items():
        torch.testing.assert_close(vae_after[name], weight, rtol=0, atol=0)
    assert {p.name for p in (tmp_path / "work").iterdir()} == {"images.pt", "latents.pt", "transformer.ckpt"}
    pipeline = load_generator("flux", out)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompt="A photo of a red matte star.", num_inference_steps=2, max_sequence_length=64).images[0]
    assert image.size == (96, 96)  # the new size is the pipeline's default output side


def test_transfer_example_keeps_shared_attributes_of_two_different_subjects():
    from training.data.pairs import PairRecord

    pair = PairRecord(
        image_x="x.png",
        image_y="y.png",
        caption_x="A photo of a cup.",
        caption_y="A photo of a dog.",
        positive=("image lighting", "art style", "environment behind the object"),
        negative=("object identity",),
        factors_x={"identity": "photo:a", "lighting": "L", "style": "photo"},
        factors_y={"identity": "photo:b", "lighting": "L", "style": "photo"},
        positive_factors=("lighting", "style", "background"),
        negative_factors=("identity",),
    )
    kept = gp.transfer_example(pair, ["lighting", "palette", "style"])
    assert kept.positive == ("image lighting", "art style") and kept.positive_factors == ("lighting", "style")
    assert gp.transfer_example(pair, ["palette"]) is None
    same_subject = dataclasses.replace(pair, factors_y={**pair.factors_y, "identity": "photo:a"})
    assert gp.transfer_example(same_subject, ["lighting"]) is None


@pytest.mark.slow
def test_saved_generator_loads_and_generates_the_requested_size(generator_dir):
    record = gp.PRETRAIN_CONFIG_NAME
    assert (generator_dir / record).is_file()
    pipeline = load_generator("flux", generator_dir)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        prompt="A photo of a red matte star on a plain white background.",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pair", "self"])
def test_adapter_stage_trains_and_loads_with_the_generator(pair_dir, generator_dir, tmp_path, target):
    from encoder import AttributeEncoder
    from encoder.config import EncoderConfig

    encoder_dir = tmp_path / "encoder"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AttributeEncoder(
            EncoderConfig(
                backend="compact",
                context_dim=32,
                num_queries=4,
                connector_depth=1,
                connector_width=32,
                connector_heads=2,
                image_size=64,
            )
        ).save_pretrained(encoder_dir)
    adapter_dir = tmp_path / "adapter"
    record = gp.pretrain_adapter(
        pair_dir, generator_dir, encoder_dir, out=adapter_dir, steps=5, max_seconds=None, batch_size=4, target=target
    )
    assert record["steps"] == 5 and np.isfinite(record["loss_first_last"]).all()
    pipeline = load_generator("flux", generator_dir, adapter_dir=adapter_dir)
    weights = [p.detach().abs().sum() for name, p in pipeline.attribute_adapter.named_parameters() if "to_v_ip" in name]
    assert float(sum(weights)) > 0  # moved away from the zero initialisation
    assert pipeline.attribute_adapter.config.pooled_token  # the default: tokens plus the pooled search vector


@pytest.mark.slow
def test_adapter_stage_continues_from_an_adapter(pair_dir, generator_dir, tmp_path):
    """--init-adapter: training starts from the saved adapter's weights (lr 0 keeps them exactly) and refuses
    an adapter of another shape."""
    from encoder import AttributeEncoder
    from encoder.testing import tiny_compact_config

    encoder_dir = tmp_path / "encoder"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AttributeEncoder(tiny_compact_config(image_size=64)).save_pretrained(encoder_dir)
    common = dict(steps=3, max_seconds=None, batch_size=4)
    gp.pretrain_adapter(pair_dir, generator_dir, encoder_dir, out=tmp_path / "first", **common)
    record = gp.pretrain_adapter(
        pair_dir, generator_dir, encoder_dir, out=tmp_path / "second", init_adapter=tmp_path / "first", lr=0.0,
        weight_gain=2.0, **common,
    )  # fmt: skip
    assert record["settings"]["init_adapter"] == str(tmp_path / "first")
    first = AttributeAdapter.from_pretrained(tmp_path / "first")
    second = AttributeAdapter.from_pretrained(tmp_path / "second")
    assert second.config.weight_gain == 2.0  # the run's gain, not the init's
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert any(p.abs().sum() > 0 for n, p in first.named_parameters() if "to_v_ip" in n)  # not the zero init

    with pytest.raises(ValueError, match="pooled_token differ"):
        gp.pretrain_adapter(
            pair_dir, generator_dir, encoder_dir, out=tmp_path / "third", init_adapter=tmp_path / "first",
            pooled_token=False, **common,
        )  # fmt: skip


@pytest.mark.slow
def test_adapter_stage_trains_apply_to_my_image_from_the_pairs_base_images(pair_dir, generator_dir, tmp_path):
    import json
    import shutil

    from encoder import AttributeEncoder
    from encoder.testing import tiny_compact_config

    data = tmp_path / "pairs"
    shutil.copytree(pair_dir, data)
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    for row in rows[::2]:  # every other pair gets bases (realpairs --bases writes them; any image will do here)
        row["meta"] = {**(row.get("meta") or {}), "base_x": row["image_y"], "base_y": row["image_x"]}
    (data / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    encoder_dir = tmp_path / "encoder"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AttributeEncoder(tiny_compact_config(image_size=64)).save_pretrained(encoder_dir)

    record = gp.pretrain_adapter(
        data, generator_dir, encoder_dir, out=tmp_path / "adapter", steps=4, max_seconds=None, batch_size=4,
        bridge_share=1.0, work=tmp_path / "work",
    )  # fmt: skip

    assert record["examples"] == 2 * len(rows) and record["with_base"] == 2 * len(rows[::2])
    assert record["settings"]["bridge_share"] == 1.0 and np.isfinite(record["loss_first_last"]).all()
    _tokens, _pooled, latents, bases, *_ = torch.load(tmp_path / "work" / "adapter-inputs.pt", weights_only=False)[
        "value"
    ]
    # x's base is y and y's is x (encoded in other batches: equal up to the batch's float rounding)
    assert torch.allclose(bases[0], latents[1], atol=1e-5) and torch.allclose(bases[1], latents[0], atol=1e-5)
    assert bases[2:4].isnan().all()  # the second pair has none


@pytest.mark.slow
def test_transfer_score_identical_reference_wins_and_scores_are_cosines():
    from encoder import AttributeEncoder
    from encoder.config import EncoderConfig

    bench = _load_bench("transfer_score")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = AttributeEncoder(
            EncoderConfig(
                backend="compact",
                context_dim=32,
                num_queries=4,
                connector_depth=1,
                connector_width=32,
                connector_heads=2,
                image_size=64,
            )
        ).eval()
    cases = bench.make_cases(count=3, seed=0, size=64)
    assert [case.factor for case in cases] == list(bench.ATTRIBUTE_FACTORS)
    for case in cases:
        true_score, random_score = bench.score_against(
            encoder, case.reference, case.attribute, case.reference, case.other
        )
        assert true_score == pytest.approx(1.0, abs=1e-4)
        assert -1.0 <= random_score <= 1.0 and true_score > random_score
    summary = bench.summarise(
        [{"factor": "color", "true": 0.9, "random": 0.1}, {"factor": "color", "true": 0.2, "random": 0.3}]
    )
    assert summary["true_wins"] == 0.5 and summary["per_factor"]["color"]["mean_true"] == pytest.approx(0.55)
    assert summary["true_wins_se"] == pytest.approx(0.5 / 2**0.5)  # sqrt(p (1 - p) / n), p = 0.5, n = 2


@pytest.mark.slow
def test_ideal_outputs_score_the_ceiling_as_is_and_through_the_vae(generator_dir):
    from encoder import AttributeEncoder
    from encoder.testing import tiny_compact_config

    bench = _load_bench("transfer_score")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = AttributeEncoder(tiny_compact_config(image_size=64)).eval()
    procedural = bench.make_cases(count=4, seed=1, size=64)
    cases = [  # the ideal output is the reference itself: it wins against any other reference
        dataclasses.replace(case, base=procedural[(i + 1) % 4].reference, ideal=case.reference)
        for i, case in enumerate(procedural)
    ]
    as_is = bench.score_ideal(cases, encoder)
    assert as_is["true_wins"] == 1.0 and as_is["mean_true"] == pytest.approx(1.0, abs=1e-4)
    assert -1.0 <= as_is["mean_subject"] <= 1.0
    pipeline = load_generator("flux", generator_dir)
    through_vae = bench.score_ideal(cases, encoder, pipeline, size=64)
    assert through_vae["cases"] == 4 and through_vae["mean_true"] < as_is["mean_true"]  # the VAE loses a little
    # keeping the base's detail puts the base back on the tiny VAE's near-flat decodes: closer to it in "subject"
    with_detail = bench.score_ideal(cases, encoder, pipeline, size=64, keep_detail=2.0)
    assert with_detail["mean_subject"] > through_vae["mean_subject"]


def test_prompt_without_drops_the_attribute_phrase():
    from training.data.procedural import FACTORS, caption_for

    bench = _load_bench("transfer_score")
    rng = np.random.default_rng(0)
    for _ in range(5):
        factors = bench.sample_factors(rng)
        for factor in bench.ATTRIBUTE_FACTORS:
            phrase = FACTORS[factor].describe(factors[factor])
            prompt = bench.prompt_without(factors, factor)
            caption = caption_for(factors, template=2).lower()
            assert prompt.lower().count(phrase.lower()) == caption.count(phrase.lower()) - 1


def test_vae_colour_scores_a_perfect_and_a_grey_reconstruction():
    bench = _load_bench("vae_colour")
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    exact = gp.to_unit_range(images)
    assert bench.colour_scores(images, exact) == {"mse": 0.0, "chroma_left": 0.0}
    grey = exact.mean(dim=1, keepdim=True).expand_as(exact)  # the grey level kept, the colour gone
    scores = bench.colour_scores(images, grey)
    assert scores["chroma_left"] == 1.0 and scores["mse"] > 0
