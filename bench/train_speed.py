"""Pairs per second of one encoder training step on this machine: the trunk every step vs the feature cache.

Rows 1 and 2 are the issue's before / after: the same model, batch and losses (a training config's), the
trunk run every step vs its features read from `training.feature_cache`. `--variant` adds rows with recipe
changes on top of the cache (`factor_sample`, a smaller connector: a different model), labelled as such.
The last row is the floor stage (training/floor_fit.py): the same batches, but only the floor trains (trunk, text
and connector frozen, their outputs computed once per image and phrase before the steps, a cost reported beside it).
Data loading is left out (batches are decoded before timing); `--warmup` steps are dropped and the median of
`--steps` steps is reported (the rows take turns step by step), with the median time spent inside each part
of the forward and in backward.

    .venv/bin/python bench/train_speed.py --config configs/starter-real.yaml --batch 16 --steps 4 --threads 2 \\
        --variant "factor_sample 2|factor_sample=2"
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import TrainConfig, load_train_config  # noqa: E402
from training.data.pairs import PairDataset, load_pairs, records_with_both  # noqa: E402
from training.feature_cache import FeatureCache  # noqa: E402
from training.floor_fit import FloorFitConfig, fit_loss, prepare, trainable_parameters  # noqa: E402
from training.trainer import AttributeTrainingModule, _CachedPairDataset, build_encoder  # noqa: E402

PARTS = ("features", "text", "connector", "floor", "backward+step")


class Timers:
    """Wall time spent inside wrapped callables, by name (forward only: backward is timed as a whole)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


class Row:
    """One measured configuration: a training module, its batches and optimizer, timers around its parts."""

    def __init__(self, module: AttributeTrainingModule, batches: list) -> None:
        self.module, self.batches = module, batches
        backbone = module.encoder.backbone
        self.timers = timers = Timers()
        module.image_features = timers.wrap("features", module.image_features)  # trunk or cache + projector
        backbone.text.forward = timers.wrap("text", backbone.text.forward)
        backbone.connector.forward = timers.wrap("connector", backbone.connector.forward)
        if backbone.floor is not None:
            for name in ("forward", "gates", "group_vectors"):
                setattr(backbone.floor, name, timers.wrap("floor", getattr(backbone.floor, name)))
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.totals: list[float] = []
        self.parts: dict[str, list[float]] = {name: [] for name in PARTS}

    def step(self, index: int, keep: bool) -> None:
        """One optimizer step on batch `index`; its times are kept unless it is a warm-up step."""
        self.module.train()
        self.timers.seconds = {}
        start = time.perf_counter()
        losses = self.module(self.batches[index], random.Random(index))
        backward_start = time.perf_counter()
        losses["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if keep:
            self.totals.append(end - start)
            self.timers.seconds["backward+step"] = end - backward_start
            for name in PARTS:
                self.parts[name].append(self.timers.seconds.get(name, 0.0))

    def result(self) -> tuple[float, dict[str, float]]:
        """Median seconds per step and median seconds per part."""
        return statistics.median(self.totals), {k: statistics.median(v) for k, v in self.parts.items()}


def _with_overrides(values: dict[str, Any], spec: str) -> dict[str, Any]:
    values = json.loads(json.dumps(values))
    for item in filter(None, spec.split("|")):
        key, _, raw = item.partition("=")
        value = json.loads(raw)
        if key.startswith("encoder."):
            values["encoder"][key.removeprefix("encoder.")] = value
        else:
            values[key] = value
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/starter-real.yaml", help="training config (model, losses)")
    parser.add_argument("--data", help="pair dataset (default: procedural pairs rendered into a temp dir)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL|KEY=JSON|...",
        help="an extra row from the cache with these config overrides (encoder.KEY for the encoder)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="train-speed-"))
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        from training.data.procedural import main as procedural

        procedural(["--out", str(data), "--pairs", str(max(64, args.batch * 2)), "--size", "224", "--seed", "1"])
    base = load_train_config(args.config).to_dict()
    base.update(data_dir=str(data), output_dir=str(work / "out"), init_encoder=None, grow_floor=False)
    base.update(grow_image_levels=[], feature_cache=None)
    records = records_with_both(load_pairs(data, verify_images=False).records)
    count = args.warmup + args.steps
    picks = [[(i * args.batch + j) % len(records) for j in range(args.batch)] for i in range(count)]
    paths = sorted({str(data / p) for r in records for p in (r.image_x, r.image_y)})
    measured: dict[str, Row] = {}
    fill_note = ""
    specs = [("trunk every step (before)", "", False), ("feature cache (after)", "", True)]
    specs += [(f"cache + {spec.split('|')[0]}", spec.split("|", 1)[1], True) for spec in args.variant]
    for label, overrides, use_cache in specs:
        config = TrainConfig.from_dict(_with_overrides(base, overrides))
        torch.manual_seed(0)
        encoder = build_encoder(config, None)
        cache = None
        dataset: PairDataset = PairDataset(data, records, seed=0)
        if use_cache:
            cache = FeatureCache(work / "cache", encoder.backbone)
            start = time.perf_counter()
            added = cache.fill(paths)
            if added:
                fill_note = f"cache fill: {time.perf_counter() - start:.1f} s for {added} images (once per image)"
            dataset = _CachedPairDataset(data, records, seed=0)
        module = AttributeTrainingModule(config, encoder, feature_cache=cache)
        measured[label] = Row(module, [[dataset[i] for i in pick] for pick in picks])
    # Rows take turns step by step, so that load from other processes on a shared machine hits all alike.
    for index in range(count):
        for label, row in measured.items():
            row.step(index, keep=index >= args.warmup)
            print(f"step {index} {label}: {row.totals[-1] if row.totals else 0:.2f} s", file=sys.stderr)
    rows = {label: row.result() for label, row in measured.items()}
    floor_label, floor_seconds, prepare_note = floor_stage(base, data, work, picks, records, args)
    rows[floor_label] = (floor_seconds, {name: float("nan") for name in PARTS})
    print(f"config {args.config}; batch {args.batch} pairs ({2 * args.batch} images); {args.threads} threads;")
    print(f"median of {args.steps} steps after {args.warmup} warm-up; {fill_note}; {prepare_note}\n")
    print("| path | s / step | pairs / s | speed-up | " + " | ".join(PARTS) + " |")
    print("|---" * (4 + len(PARTS)) + "|")
    before = rows["trunk every step (before)"][0]
    for label, (seconds, parts) in rows.items():
        cells = " | ".join("-" if parts[name] != parts[name] else f"{parts[name]:.2f}" for name in PARTS)
        print(f"| {label} | {seconds:.2f} | {args.batch / seconds:.2f} | {before / seconds:.1f}x | {cells} |")
    return 0


def floor_stage(base: dict, data: Path, work: Path, picks, records, args) -> tuple[str, float, str]:
    """Median seconds of a floor-fit step over the same batches (the config's model with the connector gate)."""
    config = TrainConfig.from_dict(_with_overrides(base, "encoder.floor=true|encoder.floor_gate_connector=true"))
    torch.manual_seed(0)
    encoder = build_encoder(config, None)
    fit_config = FloorFitConfig(encoder="", data=[str(data)], cache=str(work / "cache"), out=str(work / "floor"))
    start = time.perf_counter()
    fit_data = prepare(encoder, fit_config)
    prepared = time.perf_counter() - start
    row_of = {pair_id: i for i, pair_id in enumerate(fit_data.pair_ids)}
    floor = encoder.backbone.floor
    floor.train()
    optimizer = torch.optim.AdamW(trainable_parameters(floor), lr=1e-3)  # as in the fit: FIXED_GROUPS stay fixed
    times = []
    for index, pick in enumerate(picks):
        batch = fit_data.pairs[[row_of[records[i].id] for i in pick]]
        start = time.perf_counter()
        loss = fit_loss(floor, fit_data, batch, random.Random(index), tau=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    note = (
        f"floor stage: frozen inputs prepared once in {prepared:.1f} s for {len(fit_data.descriptors)} images "
        f"({len(fit_data.factors)} factors; features from the cache)"
    )
    return "floor stage (only the floor trains; training/floor_fit.py)", statistics.median(times), note


if __name__ == "__main__":
    sys.exit(main())
