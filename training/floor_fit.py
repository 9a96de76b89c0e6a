"""Fit the floor (encoder/floor.py) of a trained compact encoder on real-content pairs, everything else frozen.

    python -m training.floor_fit --encoder models/starter/encoder --data runs/real/data-train \
        --cache runs/real/feature-cache --out runs/real/floor [--steps N] [--seed S]

A second call with the same --out continues from its last checkpoint (`floor_state.pt`) unless --restart.

Why a stage of its own: the floor's learned parts (one projection per descriptor group and the text gate) read
only fixed per-image descriptors, the pooled attribute text and, with `floor_gate_connector`, the connector's
pooled vector. With the trunk, MiniLM + LoRA and the connector frozen, all three are computed once: the
descriptors and head maps come from the feature cache (training/feature_cache.py), the text once per phrase, the
connector once per (image, factor) under the factor's first paraphrase. A step is then a few small matrix
products over a batch of pairs (bench/train_speed.py, the "floor stage" row), so a CPU fits the floor on
thousands of real-content pairs in minutes.

The gate gets one more entry than the descriptor groups, the connector's weight (config `floor_gate_connector`):
the attribute text decides per attribute how much of the connector's reading and of each fixed descriptor the
search vector holds, so an attribute the descriptors know nothing about (pose, layout) keeps the connector.

What is fixed and what learns. The descriptors are centred on their training mean (`FloorHead.center`), so that
unrelated images are no longer alike under every attribute. The holistic-trunk and style groups (FIXED_GROUPS) are
projected onto their principal directions and stay there: learned, those projections served the training pairs
(instances, filter classes) and lost what the frozen features know of images unlike them; on the held-out
packages a learned head projection fell below the trunk on object categories (stamps 0.317 against 0.369) and a
learned style projection below the raw statistics on sky-culture art (bench/RESULTS.md, "The floor fit").
The colour and lighting projections and the gate learn.

Loss: per step, a batch of pairs (both images of each); for every factor with labelled images in the batch, a
phrase drawn from its paraphrases and the supervised contrastive loss of training/losses.py over the images
(positives: the same recorded value, training.data.realpairs.factor_label). The factors read are those of the
real-content pairs; "identity" is also read under SUBJECT_PHRASES, the words a user types for it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from encoder import AttributeEncoder
from encoder.attributes import attribute_phrase
from encoder.compact import CompactBackbone
from encoder.config import EncoderConfig
from encoder.floor import GROUPS, FloorHead
from training.data.pairs import PAIRS_FILENAME, load_pairs
from training.data.realpairs import FACTOR_NAMES, REAL_FACTORS, factor_label
from training.feature_cache import FeatureCache
from training.losses import factor_contrastive_loss

STATE_NAME = "floor_state.pt"
INPUTS_NAME = "fit_inputs.pt"  # the frozen inputs, kept for a later call (prepared_inputs)
LOG_NAME = "floor_log.jsonl"
ENCODER_DIR = "encoder"
# What users type for the main subject; read as the "identity" factor besides its own paraphrases.
SUBJECT_PHRASES = ("subject", "object", "the subject", "what is shown", "main object")
# Groups whose projection is fixed to the principal directions of the training images' centred descriptors
# (principal_projection) instead of learned: see the module docstring.
FIXED_GROUPS = ("head", "style")
CONNECTOR_CHUNK = 256  # (image, phrase) pairs per frozen connector call while precomputing


@dataclass
class FloorFitConfig:
    """One floor fit: where from, where to, and the optimisation (seeds fixed)."""

    encoder: str
    data: list[str]
    cache: str
    out: str
    steps: int = 1500
    batch_pairs: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    tau: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 50
    threads: int = 1  # one torch thread: on the shared 2-core machine 3x the pairs/s of two (bench/RESULTS.md)
    stop_at: int | None = None  # stop (with a checkpoint) after this step; a later call continues the schedule


def factor_phrases(name: str) -> tuple[str, ...]:
    """The phrases factor `name` is read under (the first is the one the connector is precomputed with)."""
    phrases = REAL_FACTORS[name].paraphrases + (SUBJECT_PHRASES if name == "identity" else ())
    return tuple(attribute_phrase(phrase) for phrase in phrases)  # the one normalisation search uses


@dataclass
class FitData:
    """The frozen inputs of the fit, one row per distinct image of the pairs."""

    descriptors: torch.Tensor  # (N, DESCRIPTOR_DIM)
    connector: torch.Tensor  # (N, F, d_ctx): connector pooled under each factor's first phrase
    labels: torch.Tensor  # (N, F) value ids, -1 where unknown
    pairs: torch.Tensor  # (P, 2) rows of x and y
    pair_ids: list[str | None]  # each pair's record id
    factors: list[str]
    phrases: list[str]  # every phrase of every factor
    phrase_factor: list[int]  # factor index of each phrase
    text_pooled: torch.Tensor  # (len(phrases), d_text)


def prepare(encoder: AttributeEncoder, config: FloorFitConfig) -> FitData:
    """Load the pairs, fill the feature cache, compute the frozen connector and text inputs once."""
    backbone = encoder.backbone
    if not isinstance(backbone, CompactBackbone) or backbone.floor is None:
        raise ValueError("floor_fit needs a compact encoder with the floor (add it with backbone.add_floor())")
    paths: dict[str, int] = {}
    assignments: list[dict[str, str]] = []
    pairs: list[tuple[int, int]] = []
    pair_ids: list[str | None] = []
    for directory in config.data:
        report = load_pairs(directory, verify_images=False)
        if report.bad_lines:
            print(f"{directory}: {len(report.bad_lines)} invalid lines skipped", file=sys.stderr)
        root = Path(directory).resolve()
        for record in report.records:
            if record.factors_x is None or record.factors_y is None:
                continue
            row = []
            for relative, factors in ((record.image_x, record.factors_x), (record.image_y, record.factors_y)):
                path = str(root / relative)
                if path not in paths:
                    paths[path] = len(paths)
                    assignments.append(dict(factors))
                row.append(paths[path])
            pairs.append((row[0], row[1]))
            pair_ids.append(record.id)
    if not pairs:
        raise ValueError(
            f"{config.data}: no pairs with factors_x / factors_y (render them with training.data.realpairs)"
        )
    ordered = list(paths)
    cache = FeatureCache(config.cache, backbone)
    for start in range(0, len(ordered), 2000):  # fill in parts, so an interrupted fill keeps what it did
        added = cache.fill(ordered[start : start + 2000])
        print(f"feature cache: {min(start + 2000, len(ordered))}/{len(ordered)} images ({added} new)", file=sys.stderr)
    factors = [name for name in FACTOR_NAMES if any(name in a for a in assignments)]
    value_ids: dict[tuple[str, str], int] = {}
    labels = torch.full((len(ordered), len(factors)), -1, dtype=torch.long)
    for row, values in enumerate(assignments):
        for column, name in enumerate(factors):
            label = factor_label(name, values[name]) if name in values else None
            if label is not None:
                labels[row, column] = value_ids.setdefault((name, label), len(value_ids))
    phrases, phrase_factor = [], []
    for column, name in enumerate(factors):
        for phrase in factor_phrases(name):
            phrases.append(phrase)
            phrase_factor.append(column)
    encoder.eval()
    with torch.no_grad():
        text_states, text_mask = backbone.text_tokens(phrases)
        text_pooled = backbone.text_pooled(text_states, text_mask)  # (A, d_text)
        first = [phrases.index(factor_phrases(name)[0]) for name in factors]
        descriptors, connector = [], []
        chunk = CONNECTOR_CHUNK // len(factors) + 1  # images per connector call
        for start in range(0, len(ordered), chunk):
            part = ordered[start : start + chunk]
            features = backbone.project(cache.trunk_features(part))
            image_index = torch.arange(len(part)).repeat_interleave(len(factors))
            text_index = torch.tensor(first).repeat(len(part))
            _, pooled = backbone.connector_pooled(features.tokens, text_states, text_mask, image_index, text_index)
            connector.append(pooled.view(len(part), len(factors), -1))
            descriptors.append(features.descriptors)
    return FitData(
        descriptors=torch.cat(descriptors).float(),
        connector=torch.cat(connector).float(),
        labels=labels,
        pairs=torch.tensor(pairs),
        pair_ids=pair_ids,
        factors=factors,
        phrases=phrases,
        phrase_factor=phrase_factor,
        text_pooled=text_pooled.float(),
    )


def prepared_inputs(encoder: AttributeEncoder, config: FloorFitConfig, path: Path) -> FitData:
    """`prepare`'s result, kept at `path` for a later call with the same encoder and data (the connector pass over
    every (image, factor) is the slow part of a fit on a CPU); recomputed when either differs."""
    stamp = {
        "encoder": EncoderConfig.load(config.encoder).version,
        "data": [[str(Path(d).resolve()), (Path(d) / PAIRS_FILENAME).stat().st_size] for d in config.data],
    }
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["stamp"] == json.dumps(stamp, sort_keys=True):
            return FitData(**saved["data"])
    data = prepare(encoder, config)
    partial = path.with_suffix(".partial")
    torch.save(
        {"stamp": json.dumps(stamp, sort_keys=True), "data": {f.name: getattr(data, f.name) for f in fields(data)}},
        partial,
    )
    partial.replace(path)
    return data


def fit_loss(
    floor: FloorHead,
    data: FitData,
    batch: torch.Tensor,
    generator: random.Random,
    tau: float,
    connector_weight: float = 1.0,
) -> torch.Tensor:
    """The supervised contrastive loss of one batch of pairs, every factor read under one drawn phrase; the
    search vector is the model's own (`FloorHead.mix`, `connector_weight` = config.floor_connector_weight)."""
    rows = batch.flatten()  # (2B,) images: x and y of each pair
    images, factors = len(rows), len(data.factors)
    groups = floor.group_vectors(data.descriptors[rows])  # (2B, G, d)
    chosen = [
        generator.choice([i for i, f in enumerate(data.phrase_factor) if f == column]) for column in range(factors)
    ]
    gates = floor.gates(data.text_pooled[chosen])  # (F, G + 1)
    vectors = floor.mix(
        groups.repeat_interleave(factors, dim=0),  # (2B * F, G, d): image-major, as the rows below
        gates.repeat(images, 1),  # (2B * F, G + 1)
        data.connector[rows].flatten(0, 1),  # (2B * F, d)
        connector_weight,
    )
    return factor_contrastive_loss(vectors.view(images, factors, -1), data.labels[rows], tau=tau)


def trainable_parameters(floor: FloorHead) -> list[torch.nn.Parameter]:
    """Freeze the FIXED_GROUPS projections and return what the fit trains: the other projections and the gate."""
    for name in FIXED_GROUPS:
        floor.projections[name].requires_grad_(False)
    return [parameter for parameter in floor.parameters() if parameter.requires_grad]


def principal_projection(centred: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, D) projection onto the top principal directions of centred (N, D) descriptors, each L2-normalised
    first (the floor compares directions); where rows >= D an orthonormal basis of all of them, padded with zeros."""
    unit = F.normalize(centred.double(), dim=-1)
    covariance = unit.t() @ unit / len(unit)  # (D, D)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    top = vectors.flip(1)[:, : min(rows, centred.shape[1])].t()  # (k, D), largest variance first
    return torch.cat([top, top.new_zeros(rows - len(top), centred.shape[1])]).float()


def fit(config: FloorFitConfig, *, restart: bool = False) -> Path | None:
    """Run (or continue) the fit; returns the saved encoder directory under config.out (None if stopped early)."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = AttributeEncoder.from_pretrained(config.encoder)
    backbone = encoder.backbone
    if backbone.floor is None:
        backbone.add_floor(gate_connector=True)
    elif not backbone.config.floor_gate_connector:
        raise ValueError(f"{config.encoder} has a floor without the connector gate; start from an encoder without one")
    started = time.perf_counter()
    data = prepared_inputs(encoder, config, out / INPUTS_NAME)
    print(
        f"{len(data.pairs)} pairs, {len(data.descriptors)} images, factors {data.factors}, "
        f"{len(data.phrases)} phrases; prepared in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    floor = backbone.floor
    # The fixed parts (a resumed fit computes the same and loads them from its state anyway): the centre
    # (encoder/floor.py) and the principal projections of FIXED_GROUPS.
    with torch.no_grad():
        floor.center.copy_(data.descriptors.mean(0))
        centred = (data.descriptors - floor.center).split(list(GROUPS.values()), dim=1)
        for name in FIXED_GROUPS:
            projection = floor.projections[name]
            projection.weight.copy_(principal_projection(centred[list(GROUPS).index(name)], projection.out_features))
    floor.train()
    optimizer = torch.optim.AdamW(trainable_parameters(floor), lr=config.lr, weight_decay=config.weight_decay)
    step = 0
    state_path = out / STATE_NAME
    if state_path.is_file() and not restart:
        state = torch.load(state_path, weights_only=True)
        floor.load_state_dict(state["floor"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        print(f"continuing from step {step}", file=sys.stderr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)), last_epoch=step - 1
    )
    log = (out / LOG_NAME).open("a")
    window, tick = [], time.perf_counter()
    last = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
    while step < last:
        generator = random.Random(config.seed * 1_000_003 + step)  # a step's draws depend only on its number
        order = torch.randperm(len(data.pairs), generator=torch.Generator().manual_seed(config.seed * 7919 + step))
        batch = data.pairs[order[: config.batch_pairs]]
        loss = fit_loss(floor, data, batch, generator, config.tau, backbone.config.floor_connector_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        window.append(loss.item())
        if step % config.log_every == 0 or step == last:
            seconds = time.perf_counter() - tick
            entry = {
                "step": step,
                "loss": float(np.mean(window)),
                "pairs_per_s": len(window) * config.batch_pairs / seconds,
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(json.dumps(entry), file=sys.stderr)
            window, tick = [], time.perf_counter()
        if step % config.checkpoint_every == 0 or step == last:
            partial = state_path.with_suffix(".partial")
            torch.save({"floor": floor.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, partial)
            partial.replace(state_path)
    log.close()
    if step < config.steps:
        print(f"stopped at step {step} of {config.steps}; run again to continue", file=sys.stderr)
        return None
    floor.eval()
    encoder.eval()
    target = out / ENCODER_DIR
    encoder.save_pretrained(target)
    record = {**asdict(config), "start_version": EncoderConfig.load(config.encoder).version}
    (out / "floor_fit_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="the trained compact encoder to add the floor to")
    parser.add_argument("--data", action="append", required=True, help="a real-content pair directory (repeatable)")
    parser.add_argument("--cache", required=True, help="feature cache directory (training/feature_cache.py)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=FloorFitConfig.steps)
    parser.add_argument("--batch-pairs", type=int, default=FloorFitConfig.batch_pairs)
    parser.add_argument("--lr", type=float, default=FloorFitConfig.lr)
    parser.add_argument("--tau", type=float, default=FloorFitConfig.tau)
    parser.add_argument("--seed", type=int, default=FloorFitConfig.seed)
    parser.add_argument("--threads", type=int, default=FloorFitConfig.threads)
    parser.add_argument("--log-every", type=int, default=FloorFitConfig.log_every)
    parser.add_argument("--checkpoint-every", type=int, default=FloorFitConfig.checkpoint_every)
    parser.add_argument("--stop-at", type=int, help="stop with a checkpoint after this step (resume later)")
    parser.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out and start again")
    args = parser.parse_args(argv)
    config = FloorFitConfig(
        encoder=args.encoder,
        data=args.data,
        cache=args.cache,
        out=args.out,
        steps=args.steps,
        batch_pairs=args.batch_pairs,
        lr=args.lr,
        tau=args.tau,
        seed=args.seed,
        threads=args.threads,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        stop_at=args.stop_at,
    )
    saved = fit(config, restart=args.restart)
    if saved is not None:
        print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
