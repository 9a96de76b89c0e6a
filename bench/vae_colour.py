"""Does a generator's VAE keep colour? Reconstruction error and the chroma left, on held-out real photos.

A generator can only move an image's palette or colour temperature if its VAE carries colour. This reads the
held-out photos of a realdata manifest (bench/heldout_real.py's HELDOUT_SOURCES, never a training source),
encodes each to the VAE's posterior mean, decodes it, and reports:

- `mse`: per-pixel squared error in [-1, 1];
- `chroma_left`: the squared error of the chroma (each pixel minus its grey level, `training.generator_pretrain.
  chroma`) over the chroma's variance. 0: every colour kept; 1: no colour at all (a grey or sepia image).

    python bench/vae_colour.py --generator runs/gen-real/generator --manifest /work/realdata/manifest.jsonl \
        --grid bench/out/vae-colour.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import heldout_real  # noqa: E402
from training.generator_pretrain import chroma, to_unit_range  # noqa: E402


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the decoded posterior means, in [-1, 1]."""
    return vae.decode(vae.encode(to_unit_range(images)).latent_dist.mean).sample.clamp(-1, 1)


def colour_scores(images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    """`mse` and `chroma_left` (see the module docstring) of uint8 images and their [-1, 1] reconstructions."""
    x = to_unit_range(images)
    chroma_error = float(((chroma(x) - chroma(reconstructions)) ** 2).mean())
    return {
        "mse": round(float(((x - reconstructions) ** 2).mean()), 4),
        "chroma_left": round(chroma_error / float((chroma(x) ** 2).mean()), 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", required=True, type=Path, help="a generator directory (its vae/)")
    parser.add_argument("--manifest", required=True, type=Path, help="a realdata manifest.jsonl")
    parser.add_argument("--count", type=int, default=48, help="held-out photos to reconstruct")
    parser.add_argument("--grid", type=Path, help="PNG: photos above their reconstructions (first 8)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    vae = AutoencoderKL.from_pretrained(args.generator / "vae").eval()
    size = vae.config.sample_size
    rows = heldout_real.heldout_photos(heldout_real.load_heldout_rows(args.manifest))[: args.count]
    heldout_real.check_heldout(rows)
    photos = [heldout_real.load_image(args.manifest.parent, row).convert("RGB").resize((size, size)) for row in rows]
    images = torch.from_numpy(np.stack([np.asarray(photo) for photo in photos])).permute(0, 3, 1, 2)  # (N, 3, H, W)
    reconstructions = reconstruct(vae, images)
    report = {"generator": str(args.generator), "photos": len(photos), "size": size}
    report.update(colour_scores(images, reconstructions))
    print(json.dumps(report))
    if args.grid is not None:
        shown = torch.cat([to_unit_range(images[:8]), reconstructions[:8]])
        tiles = shown.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
        columns = len(tiles) // 2
        grid = PIL.Image.new("RGB", (columns * size, 2 * size))
        for index, tile in enumerate(tiles):
            grid.paste(PIL.Image.fromarray(tile), ((index % columns) * size, (index // columns) * size))
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
