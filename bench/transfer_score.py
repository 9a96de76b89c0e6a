"""Does the generated image carry the referenced attribute? True-reference wins over a random reference.

Each case: a reference image R (procedural, 224 px), one attribute a the starter encoder reads well (art style,
background, colour), a random other reference R' whose value of a differs from R's, and a prompt: the caption of
an unrelated random scene with a's phrase removed. The generator personalizes with (R, a) and the prompt; the
output O wins when its transfer score for a against R beats the one against R':

    cos(pooled E(O, a), pooled E(R, a))  >  cos(pooled E(O, a), pooled E(R', a))

The control runs the same cases, prompts and noise with the attribute off (prompt only: the null condition),
where R and R' should win about equally often. The bar (issue #9): >= 80 % of 50 cases.

    python bench/transfer_score.py --generator models/starter/generator --encoder models/starter/encoder
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from generator_plugin.pipeline import transfer_scores
from training.data.procedural import FACTORS, caption_for, render_image, sample_factors

ATTRIBUTE_FACTORS = ("style", "background", "color")  # the factors the starter encoder separates best


@dataclass
class TransferCase:
    """One trial: a reference, a random other reference (another value of the factor), the attribute, a prompt."""

    factor: str
    attribute: str  # the phrase the encoder reads, FACTORS[factor].paraphrases[0]
    reference: PIL.Image.Image
    other: PIL.Image.Image
    prompt: str
    seed: int


def prompt_without(factors: dict[str, str], factor: str) -> str:
    """The caption of `factors` with the phrase of `factor` removed (the attribute comes from the reference)."""
    caption = caption_for(factors, template=2)
    phrase = FACTORS[factor].describe(factors[factor])
    caption = caption.replace(phrase, "", 1)
    caption = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s{2,}", " ", caption)).strip()
    return caption[0].upper() + caption[1:]


def make_cases(count: int = 50, seed: int = 0, size: int = 224) -> list[TransferCase]:
    """`count` seeded cases, cycling through ATTRIBUTE_FACTORS."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        factor = ATTRIBUTE_FACTORS[index % len(ATTRIBUTE_FACTORS)]
        reference = sample_factors(rng)
        other = sample_factors(rng)
        while other[factor] == reference[factor]:
            other = sample_factors(rng)
        content = sample_factors(rng)
        jitters = rng.integers(0, 2**31 - 1, size=2)
        cases.append(
            TransferCase(
                factor=factor,
                attribute=FACTORS[factor].paraphrases[0],
                reference=render_image(reference, size=size, jitter_seed=int(jitters[0])),
                other=render_image(other, size=size, jitter_seed=int(jitters[1])),
                prompt=prompt_without(content, factor),
                seed=seed * 1000 + index,
            )
        )
    return cases


def score_against(
    encoder, output: PIL.Image.Image, attribute: str, reference: PIL.Image.Image, other: PIL.Image.Image
) -> tuple[float, float]:
    """Transfer scores of `output` for `attribute` against the true reference and against the other one."""
    with torch.no_grad():
        pooled = encoder.encode([reference, other], [attribute, attribute]).pooled  # (2, d)
    scores = transfer_scores(encoder, [output], [attribute, attribute], pooled)  # (1, 2)
    return float(scores[0, 0]), float(scores[0, 1])


def run_cases(
    pipeline,
    encoder,
    cases: Sequence[TransferCase],
    *,
    use_attribute: bool = True,
    attribute_scale: float = 1.0,
    guidance_scale: float = 1.0,
    size: int = 64,
    steps: int = 20,
    max_text_tokens: int = 48,
) -> dict:
    """Generate every case (with the attribute, or prompt only as the control) and summarise the wins."""
    rows = []
    for case in cases:
        kwargs = dict(
            prompt=case.prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            max_sequence_length=max_text_tokens,
            generator=torch.Generator().manual_seed(case.seed),
            score_transfer=False,
        )
        if use_attribute:
            output = pipeline.personalize(
                refs=[(case.reference, case.attribute)],
                attribute_scale=attribute_scale,
                attribute_encoder=encoder,
                **kwargs,
            ).images[0]
        else:
            output = pipeline(**kwargs).images[0]
        true_score, random_score = score_against(encoder, output, case.attribute, case.reference, case.other)
        rows.append({"factor": case.factor, "true": true_score, "random": random_score, "image": output})
    return summarise(rows)


def summarise(rows: Sequence[dict]) -> dict:
    """Win fraction and mean scores, overall and per factor."""

    def block(subset: Sequence[dict]) -> dict:
        return {
            "cases": len(subset),
            "true_wins": float(np.mean([r["true"] > r["random"] for r in subset])),
            "mean_true": float(np.mean([r["true"] for r in subset])),
            "mean_random": float(np.mean([r["random"] for r in subset])),
        }

    summary = block(rows)
    summary["per_factor"] = {
        factor: block([r for r in rows if r["factor"] == factor]) for factor in dict.fromkeys(r["factor"] for r in rows)
    }
    summary["rows"] = list(rows)
    return summary


def save_strip(cases: Sequence[TransferCase], rows: Sequence[dict], path: Path, size: int = 64) -> None:
    """Columns: reference, other reference, output with the attribute (one column per case)."""
    strip = PIL.Image.new("RGB", (len(cases) * size, 3 * size))
    for column, (case, row) in enumerate(zip(cases, rows, strict=True)):
        for line, image in enumerate((case.reference, case.other, row["image"])):
            strip.paste(image.convert("RGB").resize((size, size)), (column * size, line * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    from encoder import AttributeEncoder
    from generator_plugin.plugins import load_generator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", required=True, type=Path, help="generator directory (with attribute_adapter/)")
    parser.add_argument("--adapter", type=Path, help="an attribute adapter directory other than the generator's")
    parser.add_argument("--encoder", default=Path("models/starter/encoder"), type=Path)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attribute-scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--no-control", action="store_true", help="skip the prompt-only control")
    parser.add_argument("--strip", type=Path, help="save a PNG strip of references and outputs")
    parser.add_argument("--out", type=Path, help="write the summary JSON here")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipeline = load_generator("flux", args.generator, adapter_dir=args.adapter)
    pipeline.set_progress_bar_config(disable=True)
    encoder = AttributeEncoder.from_pretrained(args.encoder).eval()
    cases = make_cases(args.cases, args.seed)
    report: dict = {"cases": args.cases, "seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance_scale}
    for scale in args.attribute_scale:
        started = time.perf_counter()
        result = run_cases(
            pipeline, encoder, cases, attribute_scale=scale, guidance_scale=args.guidance_scale, steps=args.steps
        )
        rows = result.pop("rows")
        result["seconds"] = round(time.perf_counter() - started, 1)
        report[f"attribute_scale={scale}"] = result
        print(json.dumps({f"attribute_scale={scale}": result}), flush=True)
        if args.strip is not None:
            save_strip(cases, rows, args.strip.with_name(f"{args.strip.stem}-scale{scale}{args.strip.suffix}"))
    if not args.no_control:
        result = run_cases(
            pipeline, encoder, cases, use_attribute=False, guidance_scale=args.guidance_scale, steps=args.steps
        )
        result.pop("rows")
        report["control (no attribute)"] = result
        print(json.dumps({"control (no attribute)": result}), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
