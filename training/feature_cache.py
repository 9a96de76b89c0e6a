"""The frozen trunk's per-image features on disk (fp16), so training runs only the trainable parts.

The compact encoder's trunk is frozen: what it computes from an image (`CompactBackbone.trunk_features`: the
head map, the configured earlier levels pooled to the head's cells, and the floor's descriptors) never
changes during training. `FeatureCache` computes it once per image and keeps it under

    ROOT/{trunk_version}/shard-{n:04d}/   keys.json (image sha256 per row), head.npy (N, 1280, h, w) fp16,
                                          extra.npy (N, C, h, w) fp16 (with image_levels), descriptors.npy
                                          (N, D) fp16 (with the floor)

`trunk_version` hashes the trunk weights, image size, levels and descriptor definition
(`CompactBackbone.trunk_version`), so any change to them reads an empty directory: nothing stale is used.
Rows are keyed by the sha256 of the image file's bytes; a dataset fills one new shard with the images no
shard has yet, and shards are read memory-mapped.

    python -m training.feature_cache build --config configs/starter-real.yaml   # fill before training
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder.compact import CompactBackbone, TrunkFeatures

KEYS_NAME = "keys.json"
PARTS = ("head", "extra", "descriptors")
FILL_BATCH = 32  # images per trunk call while filling


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (the cache key of an image)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """fp16 trunk features of images, by file sha256, for one trunk version; memory-mapped shards."""

    def __init__(self, root: str | Path, backbone: CompactBackbone) -> None:
        if not isinstance(backbone, CompactBackbone):
            raise ValueError("feature_cache needs a compact encoder: only its trunk is frozen and cacheable")
        self.backbone = backbone
        self.directory = Path(root) / backbone.trunk_version()
        self._shards: list[dict[str, np.ndarray | None]] = []
        self._rows: dict[str, tuple[int, int]] = {}  # sha256 -> (shard, row)
        self._keys: dict[str, str] = {}  # absolute image path -> sha256
        self.reload()

    def reload(self) -> None:
        """Re-read the shard list (another process may have filled the cache)."""
        self._shards, self._rows = [], {}
        if not self.directory.is_dir():
            return
        for shard_dir in sorted(self.directory.glob("shard-*")):
            if not (shard_dir / KEYS_NAME).is_file():
                continue  # an interrupted fill
            parts = {
                name: np.load(shard_dir / f"{name}.npy", mmap_mode="r")
                if (shard_dir / f"{name}.npy").is_file()
                else None
                for name in PARTS
            }
            index = len(self._shards)
            self._shards.append(parts)
            for row, key in enumerate(json.loads((shard_dir / KEYS_NAME).read_text())):
                self._rows.setdefault(key, (index, row))

    def __len__(self) -> int:
        return len(self._rows)

    def key(self, path: str | Path) -> str:
        """The sha256 of the image at `path` (hashed once per path per process)."""
        name = str(Path(path).resolve())
        if name not in self._keys:
            self._keys[name] = file_sha256(name)
        return self._keys[name]

    def fill(self, paths: Sequence[str | Path], *, progress: bool = False) -> int:
        """Compute and store the features of the images in `paths` not cached yet; returns how many were added."""
        missing: dict[str, Path] = {}
        for path in paths:
            key = self.key(path)
            if key not in self._rows:
                missing.setdefault(key, Path(path))
        if not missing:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"shard-{len(list(self.directory.glob('shard-*'))):04d}"
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        keys, items = list(missing), list(missing.values())
        arrays: dict[str, np.ndarray] = {}
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            for start in range(0, len(items), FILL_BATCH):
                images = []
                for path in items[start : start + FILL_BATCH]:
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                features = self.backbone.trunk_features(images)
                for name in PARTS:
                    value = getattr(features, name)
                    if value is None:
                        continue
                    if name not in arrays:
                        arrays[name] = np.lib.format.open_memmap(
                            partial / f"{name}.npy", mode="w+", dtype=np.float16, shape=(len(items), *value.shape[1:])
                        )
                    arrays[name][start : start + len(images)] = value.float().cpu().numpy().astype(np.float16)
                if progress:
                    print(f"feature cache: {min(start + FILL_BATCH, len(items))}/{len(items)}", file=sys.stderr)
        finally:
            self.backbone.train(was_training)
        for array in arrays.values():
            array.flush()
        del arrays
        (partial / KEYS_NAME).write_text(json.dumps(keys))
        partial.rename(final)
        self.reload()
        return len(keys)

    def trunk_features(self, paths: Sequence[str | Path]) -> TrunkFeatures:
        """The cached features (float32 tensors) of the images at `paths`; KeyError names an uncached one."""
        rows = []
        for path in paths:
            key = self.key(path)
            if key not in self._rows:
                raise KeyError(f"{path} (sha256 {key[:12]}) is not in the feature cache {self.directory}; fill it")
            rows.append(self._rows[key])
        gathered: dict[str, torch.Tensor | None] = {}
        for name in PARTS:
            if self._shards[rows[0][0]][name] is None:
                gathered[name] = None
                continue
            gathered[name] = torch.from_numpy(
                np.stack([np.asarray(self._shards[shard][name][row]) for shard, row in rows]).astype(np.float32)
            )
        return TrunkFeatures(gathered["head"], gathered["extra"], gathered["descriptors"])


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.feature_cache build --config TRAIN_CONFIG [--data DIR] [--cache DIR]`."""
    from training.config import load_train_config
    from training.data.pairs import load_pairs
    from training.trainer import build_encoder

    parser = argparse.ArgumentParser(prog="python -m training.feature_cache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="fill the cache with every image of a pair dataset")
    build.add_argument("--config", required=True, type=Path, help="training config (its encoder, data, cache)")
    build.add_argument("--data", type=Path, help="pair dataset directory (default: the config's data_dir)")
    build.add_argument("--cache", type=Path, help="cache directory (default: the config's feature_cache)")
    build.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    config = load_train_config(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.cache or config.feature_cache
    if not root:
        parser.error("no cache directory: pass --cache or set feature_cache in the config")
    data = args.data or Path(config.data_dir)
    encoder = build_encoder(config, None)
    cache = FeatureCache(root, encoder.backbone)
    records = load_pairs(data, verify_images=False).records
    paths = sorted({data / p for record in records for p in (record.image_x, record.image_y)})
    added = cache.fill(paths, progress=True)
    print(json.dumps({"cache": str(cache.directory), "images": len(paths), "added": added, "total": len(cache)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
