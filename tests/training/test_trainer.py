"""The trainer on tiny real parts: the compact encoder (real trunk and MiniLM, small connector) and the tiny
random FLUX-style generator built in code, on a few procedural pairs at 64 px."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from encoder import AttributeEncoder
from encoder.testing import tiny_compact_config
from generator_plugin.adapter import AttributeAdapter
from training.config import TrainConfig, load_train_config
from training.data.procedural import ProceduralConfig, generate_dataset
from training.trainer import (
    ADAPTER_DIR,
    ENCODER_DIR,
    AttributeTrainingModule,
    build_encoder,
    build_generator,
    contrastive_embeddings,
    train,
    trainable_parameters,
)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("pairs")
    generate_dataset(directory, 8, seed=11, config=ProceduralConfig(size=64))
    return directory


def _config(pairs_dir, output_dir, **overrides) -> dict:
    values = dict(
        data_dir=str(pairs_dir),
        output_dir=str(output_dir),
        encoder=tiny_compact_config(image_size=64).to_dict(),
        generator="tiny",
        generator_resolution=64,
        max_text_tokens=16,
        steps=4,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        lr_schedule="cosine",
        checkpoint_every=2,
        keep_checkpoints=None,
        device="cpu",
        progress=False,
        seed=3,
    )
    values.update(overrides)
    return values


def test_unknown_config_key_fails_at_start_naming_it(tmp_path, pairs_dir):
    with pytest.raises(ValueError, match="'lamda_con'"):
        TrainConfig.from_dict({**_config(pairs_dir, tmp_path), "lamda_con": 0.1})
    path = tmp_path / "run.yaml"
    path.write_text(f"data_dir: {pairs_dir}\noutput_dir: {tmp_path}\nlambda_gen: 0\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="'batchsize'"):
        load_train_config(path)
    with pytest.raises(ValueError, match="'batchsize'"):
        train(path)
    path.write_text(f"data_dir: {pairs_dir}\noutput_dir: {tmp_path}\nlambda_gen: 0\nbatch_size: 4\n")
    assert load_train_config(path).batch_size == 4
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig.from_dict(_config(pairs_dir, tmp_path, lambda_gen=0, lambda_con=0))
    with pytest.raises(ValueError, match="needs a generator"):
        TrainConfig.from_dict(_config(pairs_dir, tmp_path, generator=None))


@pytest.mark.slow
def test_only_lora_connector_projector_and_adapter_train(tmp_path, pairs_dir):
    config = TrainConfig.from_dict(_config(pairs_dir, tmp_path / "run", steps=2, checkpoint_every=2))
    encoder = build_encoder(config, None)
    pipeline = build_generator(config, encoder.dimension, torch.device("cpu"), None)
    module = AttributeTrainingModule(config, encoder, pipeline)
    names = [name for name, _ in trainable_parameters(module)]
    allowed = ("lora_A", "lora_B", "backbone.projector.", "backbone.connector.", "to_k_ip", "to_v_ip", "token_")
    assert names and all(any(part in name for part in allowed) for name in names), names
    assert any("lora_" in n for n in names) and any("connector" in n for n in names)
    assert any("projector" in n for n in names) and any("to_k_ip" in n for n in names)
    frozen_before = {
        "trunk": {k: v.clone() for k, v in encoder.backbone.trunk.state_dict().items()},
        "text": {k: v.clone() for k, v in encoder.backbone.text.state_dict().items() if "lora_" not in k},
        "transformer": {k: v.clone() for k, v in pipeline.transformer.state_dict().items() if "_ip" not in k},
    }
    checkpoint = train(config)
    trained = AttributeEncoder.from_pretrained(checkpoint / ENCODER_DIR)
    for key, value in frozen_before["trunk"].items():
        assert torch.equal(trained.backbone.trunk.state_dict()[key], value), key
    text_state = trained.backbone.text.state_dict()
    for key, value in frozen_before["text"].items():
        assert torch.equal(text_state[key], value), key
    # ... and the trainable parts did move.
    fresh = build_encoder(config, None).trainable_state_dict()
    moved = trained.trainable_state_dict()
    assert any(not torch.equal(fresh[k], moved[k]) for k in moved if k.startswith("lora."))
    assert any(not torch.equal(fresh[k], moved[k]) for k in moved if k.startswith("connector."))
    adapter = AttributeAdapter.from_pretrained(checkpoint / ADAPTER_DIR)
    assert any(p.abs().sum() > 0 for n, p in adapter.named_parameters() if "to_v_ip" in n)  # left zero-init
    # The frozen transformer of a rebuilt generator is the same as before training (built from the seed).
    rebuilt = build_generator(config, encoder.dimension, torch.device("cpu"), checkpoint)
    for key, value in frozen_before["transformer"].items():
        assert torch.equal(rebuilt.transformer.state_dict()[key], value), key
    saved = json.loads((checkpoint / "train_config.json").read_text())
    assert saved["lambda_con"] == 0.01 and saved["steps"] == 2
    assert (checkpoint / "trainer_state.pt").is_file()


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path, pairs_dir):
    # Both losses and gradient accumulation, so every source of randomness and every state file is covered.
    common = dict(grad_accum=2, batch_size=2, text_dropout=0.3, attribute_dropout=0.3)
    full = train(_config(pairs_dir, tmp_path / "full", steps=4, **common))
    interrupted = train(_config(pairs_dir, tmp_path / "split", steps=4, **common), stop_at_step=2)
    assert interrupted.name == "checkpoint-0000002"
    with pytest.raises(ValueError, match="resume_from"):
        train(_config(pairs_dir, tmp_path / "split", steps=4, **common))
    resumed = train(_config(pairs_dir, tmp_path / "split", steps=4, resume_from="latest", **common))
    assert resumed.name == full.name == "checkpoint-0000004"
    a = AttributeEncoder.from_pretrained(full / ENCODER_DIR).trainable_state_dict()
    b = AttributeEncoder.from_pretrained(resumed / ENCODER_DIR).trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    start = build_encoder(TrainConfig.from_dict(_config(pairs_dir, tmp_path / "x")), None).trainable_state_dict()
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a)  # training moved the weights
    adapter_a = AttributeAdapter.from_pretrained(full / ADAPTER_DIR).state_dict()
    adapter_b = AttributeAdapter.from_pretrained(resumed / ADAPTER_DIR).state_dict()
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_encoder_only_and_no_con_ablation(tmp_path, pairs_dir):
    seen: list[dict] = []
    checkpoint = train(
        _config(pairs_dir, tmp_path / "con", lambda_gen=0.0, generator=None, steps=2),
        on_step=lambda step, losses: seen.append(losses),
    )
    assert not (checkpoint / ADAPTER_DIR).exists()  # no generator was built
    assert all("l_gen" not in losses and losses["l_con"] > 0 for losses in seen)
    assert seen[0]["loss"] == pytest.approx(0.01 * seen[0]["l_con"])
    log = [json.loads(line) for line in (tmp_path / "con" / "train_log.jsonl").read_text().splitlines()]
    assert log and "l_con" in log[-1]
    seen.clear()
    checkpoint = train(
        _config(pairs_dir, tmp_path / "gen", lambda_con=0.0, steps=1), on_step=lambda s, losses: seen.append(losses)
    )
    assert (checkpoint / ADAPTER_DIR).is_dir()
    assert all("l_con" not in losses and losses["loss"] == pytest.approx(losses["l_gen"]) for losses in seen)


@pytest.mark.slow
def test_contrastive_embeddings_fast_path_equals_encode(pairs_dir):
    from training.data.pairs import PairDataset

    torch.manual_seed(0)
    encoder = AttributeEncoder(tiny_compact_config(image_size=64)).eval()
    dataset = PairDataset.from_directory(pairs_dir)
    samples = [dataset[i] for i in range(3)]
    xs, ys = [s.image_x for s in samples], [s.image_y for s in samples]
    pos, neg = [s.positive_attribute for s in samples], [s.negative_attribute for s in samples]
    with torch.no_grad():
        fast = contrastive_embeddings(encoder, xs, ys, pos, neg)
        for got, images, attributes in zip(fast, (xs, xs, ys, ys), (pos, neg, pos, neg), strict=True):
            torch.testing.assert_close(got, encoder.encode(images, attributes).pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_factor_loss_trains_on_recorded_factors_and_max_seconds_stops_with_a_checkpoint(tmp_path, pairs_dir):
    seen: list[dict] = []
    checkpoint = train(
        _config(pairs_dir, tmp_path / "factor", lambda_gen=0.0, generator=None, lambda_factor=0.5, max_seconds=0.0),
        on_step=lambda step, losses: seen.append(losses),
    )
    # max_seconds 0: the first step is over time, so the run ends there with a checkpoint (of 4 steps planned).
    assert checkpoint.name == "checkpoint-0000001" and (checkpoint / ENCODER_DIR).is_dir()
    assert len(seen) == 1 and seen[0]["l_factor"] > 0
    assert seen[0]["loss"] == pytest.approx(0.01 * seen[0]["l_con"] + 0.5 * seen[0]["l_factor"])
    log = [json.loads(line) for line in (tmp_path / "factor" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and "l_factor" in log[-1]


def test_factor_loss_on_pairs_without_factors_says_what_to_do(tmp_path, pairs_dir):
    from training.data.pairs import load_pairs, write_pairs

    plain = tmp_path / "plain"
    plain.mkdir()
    records = load_pairs(pairs_dir).records
    for record in records:
        for name in (record.image_x, record.image_y):
            (plain / name).parent.mkdir(parents=True, exist_ok=True)
            (plain / name).write_bytes((pairs_dir / name).read_bytes())
    write_pairs(plain, [dataclasses.replace(r, factors_x=None, factors_y=None) for r in records])
    with pytest.raises(ValueError, match="set lambda_factor: 0"):
        train(_config(plain, tmp_path / "run", lambda_gen=0.0, generator=None, lambda_con=0.0, lambda_factor=1.0))


@pytest.mark.slow
def test_factor_loss_with_the_shared_trunk_pass_equals_its_own(tmp_path, pairs_dir):
    """forward runs the frozen trunk once for L_con and the factor loss; the loss must not change."""
    import random

    from training.data.pairs import PairDataset

    config = TrainConfig.from_dict(_config(pairs_dir, tmp_path, lambda_gen=0.0, generator=None, lambda_factor=1.0))
    torch.manual_seed(0)
    module = AttributeTrainingModule(config, AttributeEncoder(tiny_compact_config(image_size=64))).eval()
    dataset = PairDataset.from_directory(pairs_dir)
    batch = [dataset[i] for i in range(4)]
    with torch.no_grad():
        alone = module.factor_loss(batch, random.Random(5))
        tokens = module.encoder.backbone.image_tokens([s.image_x for s in batch] + [s.image_y for s in batch])
        shared = module.factor_loss(batch, random.Random(5), tokens)
        losses = module(batch, random.Random(5))
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-6)
    assert losses["l_factor"].item() == pytest.approx(alone.item(), rel=1e-5)


@pytest.mark.slow
def test_grow_image_levels_starts_from_the_same_function_and_trains_the_new_projection(tmp_path, pairs_dir):
    from training.data.pairs import PairDataset

    torch.manual_seed(0)
    base = AttributeEncoder(tiny_compact_config(image_size=64)).eval()
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="set init_encoder"):
        TrainConfig.from_dict(_config(pairs_dir, tmp_path, grow_image_levels=["pixels"]))
    overrides = dict(lambda_gen=0.0, generator=None, init_encoder=str(tmp_path / "base"), steps=2)
    with pytest.raises(ValueError, match="unknown: \\['edges'\\]"):
        build_encoder(
            TrainConfig.from_dict(_config(pairs_dir, tmp_path, grow_image_levels=["edges"], **overrides)), None
        )
    config = TrainConfig.from_dict(
        _config(pairs_dir, tmp_path / "run", grow_image_levels=["pixels", "stage2"], **overrides)
    )
    grown = build_encoder(config, None).eval()
    assert grown.config.image_levels == ["head", "pixels", "stage2"] and grown.config.version is None
    samples = [PairDataset.from_directory(pairs_dir)[i] for i in range(3)]
    images = [s.image_x for s in samples]
    with torch.no_grad():
        torch.testing.assert_close(
            grown.encode(images, ["lighting"] * 3).pooled, base.encode(images, ["lighting"] * 3).pooled
        )
    assert "backbone.projector.extra.weight" in dict(trainable_parameters(grown))
    checkpoint = train(dataclasses.asdict(config))
    trained = AttributeEncoder.from_pretrained(checkpoint / ENCODER_DIR)
    assert trained.config.image_levels == ["head", "pixels", "stage2"]
    assert trained.version != base.version
    assert trained.backbone.projector.extra.weight.abs().sum() > 0  # the new projection moved off zero


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml")))
def test_every_shipped_training_config_loads(path):
    from encoder import EncoderConfig

    config = load_train_config(path)  # unknown keys, bad values and bad levels fail here, naming the key
    EncoderConfig(**config.encoder)
