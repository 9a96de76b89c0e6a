"""Does the generated image carry the referenced attribute? True-reference wins over a random reference.

Two kinds of cases. Procedural (the default, issue #9), and `--real MANIFEST`: held-out real photos (issue 18).

Held-out real cases (bench/heldout_real.py's held-out photos and transforms, never a training source): for
lighting, color palette and art style in turn, the reference R is one held-out photo under one held-out
transform class of that attribute (a lighting, a palette of another photo or its hue rotation, a style filter),
and the random reference R' is another held-out photo under another class of the same attribute. Text-to-image
generates from the prompt alone; apply-to-my-image (`--base`) starts from a third held-out photo, untransformed
(the user's photo), at `--strength`. Besides the wins, apply-to-my-image reports the "subject" cosine of the
output to the base, cos(pooled E(O, subject), pooled E(base, subject)): the output should keep the base's
subject at least as well as the control does. With `--base` the report starts with the scorer's ceiling: the
"ideal output", the base under the reference's own transform class, scored as is and after the generator's VAE.
`--keep-detail SIGMA` keeps the base's detail finer than SIGMA px on every apply-to-my-image output, the control's
and the ideal's through the VAE included (the pipeline's keep_detail; the product's requests default to it).

Procedural cases: a reference image R (procedural, 224 px), one attribute a the starter encoder reads well (art style,
background, colour), a random other reference R' whose value of a differs from R's, and a prompt: the caption of
an unrelated random scene with a's phrase removed. The generator personalizes with (R, a) and the prompt; the
output O wins when its transfer score for a against R beats the one against R':

    cos(pooled E(O, a), pooled E(R, a))  >  cos(pooled E(O, a), pooled E(R', a))

The control runs the same cases, prompts and noise with the attribute off (prompt only: the null condition),
where R and R' should win about equally often. The bar (issues #9 and 18): >= 80 % of the cases. Each win
fraction comes with its binomial standard error (`true_wins_se`): 16 cases per attribute give about 11 points.
`--encoder` conditions the generator (its tokens); `--score-encoder` (default: the same) scores the outputs.

    python bench/transfer_score.py --generator models/starter/generator --encoder models/starter/encoder
    python bench/transfer_score.py --generator GEN --real /work/realdata/manifest.jsonl --base --strength 0.7 \
        --cases 48 --grid bench/out/transfer-grid.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import heldout_real  # noqa: E402
from generator_plugin.pipeline import transfer_scores  # noqa: E402
from training.data.procedural import FACTORS, caption_for, render_image, sample_factors  # noqa: E402

ATTRIBUTE_FACTORS = ("style", "background", "color")  # the factors the starter encoder separates best
REAL_FACTORS = ("lighting", "color palette", "art style")  # held-out real cases, in this order
SUBJECT = heldout_real.ATTRIBUTES["subject"][0]


@dataclass
class TransferCase:
    """One trial: a reference, a random other reference (another value of the factor), the attribute, a prompt."""

    factor: str
    attribute: str  # the phrase the encoder reads, FACTORS[factor].paraphrases[0]
    reference: PIL.Image.Image
    other: PIL.Image.Image
    prompt: str
    seed: int
    base: PIL.Image.Image | None = None  # apply-to-my-image: the photo the attribute is applied to
    ideal: PIL.Image.Image | None = None  # the base under the reference's own transform: a perfect output


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


def real_transform_classes(arrays: Sequence[np.ndarray], photos: Sequence[dict], seed: int, references: int = 4):
    """Each attribute's held-out transform classes {name: function}, and the photo indices left for cases.

    The palette classes are heldout_real's: the k-means palettes of the `references` most saturated photos
    and their hue rotations; those photos serve only as palette sources.
    """
    saturation = [float(np.asarray(heldout_real.to_image(a).convert("HSV"))[..., 1].mean()) for a in arrays]
    sources = [int(i) for i in np.argsort(saturation)[::-1][:references]]
    palettes = {}
    for number, source in enumerate(sources):
        palette = heldout_real.kmeans_palette(arrays[source], 6, np.random.default_rng([seed, 2, number]))
        name = Path(photos[source]["path"]).stem
        turn = 150 + 60 * (number % 2)
        palettes[f"palette of {name}"] = heldout_real.posterise_to(palette)
        palettes[f"palette of {name}, hue +{turn}"] = heldout_real.posterise_to(heldout_real.rotate_hue(palette, turn))
    classes = {
        "lighting": dict(heldout_real.LIGHTINGS),
        "color palette": palettes,
        "art style": dict(heldout_real.STYLES),
    }
    return classes, [i for i in range(len(arrays)) if i not in set(sources)]


def make_real_cases(
    manifest: str | Path, count: int = 48, seed: int = 0, prompt: str = "", with_base: bool = True
) -> list[TransferCase]:
    """`count` seeded held-out real cases, cycling through REAL_FACTORS (see the module docstring).

    Reference, random reference and base are three different held-out photos; the two references are under two
    different classes of the attribute. Only rows of HELDOUT_SOURCES are read (heldout_real checks it).
    """
    root = Path(manifest).parent
    photos = heldout_real.heldout_photos(heldout_real.load_heldout_rows(manifest))
    heldout_real.check_heldout(photos)
    arrays = [heldout_real.to_array(heldout_real.load_image(root, row)) for row in photos]
    classes, usable = real_transform_classes(arrays, photos, seed)
    if len(usable) < 3:
        raise ValueError(f"{len(usable)} usable held-out photos in {manifest}; the cases need at least 3")
    rng = np.random.default_rng([seed, 18])
    cases = []
    for index in range(count):
        factor = REAL_FACTORS[index % len(REAL_FACTORS)]
        names = list(classes[factor])
        true_class, other_class = (names[i] for i in rng.choice(len(names), 2, replace=False))
        reference, other, base = (usable[i] for i in rng.choice(len(usable), 3, replace=False))

        def render(photo: int, name: str, part: int) -> PIL.Image.Image:
            return _transformed(classes[factor][name], arrays[photo], [seed, index, part])  # noqa: B023

        cases.append(
            TransferCase(
                factor=factor,
                attribute=heldout_real.ATTRIBUTES[factor][0],
                reference=render(reference, true_class, 1),
                other=render(other, other_class, 2),
                prompt=prompt,
                seed=seed * 1000 + index,
                base=heldout_real.to_image(arrays[base]) if with_base else None,
                ideal=render(base, true_class, 3) if with_base else None,
            )
        )
    return cases


def _transformed(function, photo: np.ndarray, seed: Sequence[int]) -> PIL.Image.Image:
    return heldout_real.to_image(function(photo, np.random.default_rng(list(seed))))


def subject_cosine(encoder, output: PIL.Image.Image, base: PIL.Image.Image) -> float:
    """cos(pooled E(output, subject), pooled E(base, subject)): how much of the base's subject the output keeps."""
    with torch.no_grad():
        pooled = encoder.encode([base], [SUBJECT]).pooled  # (1, d)
    return float(transfer_scores(encoder, [output], [SUBJECT], pooled)[0, 0])


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
    strength: float | None = None,
    keep_detail: float | None = None,
    score_encoder=None,
    prompt_inputs: dict | None = None,
) -> dict:
    """Generate every case (with the attribute, or prompt only as the control) and summarise the wins.

    strength: apply to the case's base image at that strength (apply to my image); None: text-to-image.
    keep_detail: with a strength, keep the base's detail finer than this sigma (the pipeline's keep_detail).
    score_encoder: the encoder that scores the outputs (default `encoder`, which conditions the generator).
    prompt_inputs: precomputed prompt_embeds / pooled_prompt_embeds instead of the case's prompt text.
    """
    score_encoder = score_encoder or encoder
    rows = []
    for case in cases:
        base = {} if strength is None else {"image": case.base, "strength": strength, "keep_detail": keep_detail}
        kwargs = dict(
            **(prompt_inputs if prompt_inputs is not None else {"prompt": case.prompt}),
            **base,
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
        true_score, random_score = score_against(score_encoder, output, case.attribute, case.reference, case.other)
        row = {"factor": case.factor, "true": true_score, "random": random_score, "image": output}
        if strength is not None:
            row["subject"] = subject_cosine(score_encoder, output, case.base)
        rows.append(row)
    return summarise(rows)


def score_ideal(
    cases: Sequence[TransferCase], score_encoder, pipeline=None, size: int = 128, keep_detail: float | None = None
) -> dict:
    """The scorer's ceiling: each case's ideal output (the base under the reference's own transform class), as
    is, or through the generator's VAE at `size` when a pipeline is given (what a perfect transformer and adapter
    could at best decode), then with the base's detail kept when `keep_detail` is given. Summarised like
    run_cases."""
    rows = []
    for case in cases:
        output = case.ideal
        if pipeline is not None:
            with torch.no_grad():
                latent = pipeline.encode_image(case.ideal, size, size)  # (1, S, 4 C)
                detail = (pipeline.preprocess_base(case.base, size, size), keep_detail) if keep_detail else None
                output = pipeline.decode_latents(latent, size, size, "pil", detail)[0][0]
        true_score, random_score = score_against(score_encoder, output, case.attribute, case.reference, case.other)
        subject = subject_cosine(score_encoder, output, case.base)
        rows.append({"factor": case.factor, "true": true_score, "random": random_score, "subject": subject})
    return {key: value for key, value in summarise(rows).items() if key != "rows"}


def summarise(rows: Sequence[dict]) -> dict:
    """Win fraction (with its binomial standard error) and mean scores, overall and per factor."""

    def block(subset: Sequence[dict]) -> dict:
        wins = float(np.mean([r["true"] > r["random"] for r in subset]))
        return {
            "cases": len(subset),
            "true_wins": wins,
            "true_wins_se": math.sqrt(wins * (1.0 - wins) / len(subset)),  # 16 cases at 75 %: 0.11
            "mean_true": float(np.mean([r["true"] for r in subset])),
            "mean_random": float(np.mean([r["random"] for r in subset])),
            **({"mean_subject": float(np.mean([r["subject"] for r in subset]))} if "subject" in subset[0] else {}),
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


def save_grid(
    cases: Sequence[TransferCase], rows: Sequence[dict], control: Sequence[dict], path: Path, size: int = 128
) -> None:
    """One case per row: base (blank in text-to-image), reference, output with the attribute, control."""
    from PIL import ImageDraw

    header = 14
    grid = PIL.Image.new("RGB", (4 * size, header + len(cases) * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(("base", "reference", "output", "control (no attribute)")):
        draw.text((column * size + 3, 1), title, fill="black")
    for line, (case, row, plain) in enumerate(zip(cases, rows, control, strict=True)):
        for column, image in enumerate((case.base, case.reference, row["image"], plain["image"])):
            if image is not None:
                grid.paste(image.convert("RGB").resize((size, size)), (column * size, header + line * size))
        draw.text((size + 3, header + line * size + 2), case.attribute, fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    from encoder import AttributeEncoder
    from generator_plugin.plugins import load_generator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generator", required=True, type=Path, help="generator directory (with attribute_adapter/)")
    parser.add_argument("--adapter", type=Path, help="an attribute adapter directory other than the generator's")
    parser.add_argument("--encoder", default=Path("models/starter/encoder"), type=Path, help="conditions the generator")
    parser.add_argument("--score-encoder", type=Path, help="scores the outputs (default: --encoder)")
    parser.add_argument("--real", type=Path, metavar="MANIFEST", help="held-out real cases from this manifest")
    parser.add_argument("--base", action="store_true", help="also apply to a held-out base photo (with --real)")
    parser.add_argument("--strength", type=float, default=0.7, help="apply-to-my-image strength")
    parser.add_argument(
        "--keep-detail",
        type=float,
        metavar="SIGMA",
        help="apply-to-my-image (control, outputs and the ideal through the VAE): keep the base's detail finer than "
        "SIGMA output pixels (the product's default is omniattr.domain.DEFAULT_KEEP_DETAIL; default here: off)",
    )
    parser.add_argument("--no-text", action="store_true", help="skip the text-to-image mode")
    parser.add_argument("--prompt", default="", help="the real cases' prompt (default: the null text, zeros)")
    parser.add_argument("--size", type=int, help="output side (default: the VAE's sample_size, else 64)")
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attribute-scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--no-control", action="store_true", help="skip the prompt-only control")
    parser.add_argument("--strip", type=Path, help="save a PNG strip of references and outputs")
    parser.add_argument(
        "--grid",
        type=Path,
        help="PNG grids (base, reference, output, control; 12 cases), one per mode and scale: PATH-MODE-scaleS.png",
    )
    parser.add_argument("--out", type=Path, help="write the summary JSON here")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base and args.real is None:
        parser.error("--base needs --real MANIFEST (the base photos are held-out real photos)")

    pipeline = load_generator("flux", args.generator, adapter_dir=args.adapter)
    pipeline.set_progress_bar_config(disable=True)
    encoder = AttributeEncoder.from_pretrained(args.encoder).eval()
    score_encoder = AttributeEncoder.from_pretrained(args.score_encoder).eval() if args.score_encoder else encoder
    size = args.size or getattr(pipeline.vae.config, "sample_size", 64)
    if args.real is not None:
        cases = make_real_cases(args.real, args.cases, args.seed, prompt=args.prompt, with_base=args.base)
    else:
        cases = make_cases(args.cases, args.seed)
    modes = {} if args.no_text else {"text-to-image": None}
    if args.base:
        modes["apply-to-my-image"] = args.strength
    report: dict = {
        "cases": args.cases,
        "real": str(args.real) if args.real else None,
        "seed": args.seed,
        "steps": args.steps,
        "size": size,
        "guidance_scale": args.guidance_scale,
        "encoder": str(args.encoder),
        "score_encoder": str(args.score_encoder or args.encoder),
        "prompt": args.prompt if args.prompt or args.real is None else "(null text)",
        "keep_detail": args.keep_detail,
    }
    prompt_inputs = None
    if args.real is not None and not args.prompt:  # the null text: what the training's text dropout shows
        embeds, pooled = pipeline.encode_prompt("", max_sequence_length=48)
        prompt_inputs = {"prompt_embeds": torch.zeros_like(embeds), "pooled_prompt_embeds": torch.zeros_like(pooled)}
    common = dict(
        guidance_scale=args.guidance_scale,
        steps=args.steps,
        size=size,
        score_encoder=score_encoder,
        prompt_inputs=prompt_inputs,
    )
    if args.base:  # the ceiling a perfect generator would reach under this scorer
        report["ideal output (base under the reference's transform)"] = {
            "as is": score_ideal(cases, score_encoder),
            "through the VAE": score_ideal(cases, score_encoder, pipeline, size, args.keep_detail),
        }
        print(json.dumps({"ideal": report["ideal output (base under the reference's transform)"]}), flush=True)
    for mode, strength in modes.items():
        label = mode if strength is None else f"{mode} (strength {strength})"
        detail = args.keep_detail if strength is not None else None
        if detail:
            label += f", detail kept under {detail} px"
        results: dict = {}
        control = None
        if not args.no_control:
            control = run_cases(
                pipeline, encoder, cases, use_attribute=False, strength=strength, keep_detail=detail, **common
            )
            results["control (no attribute)"] = {k: v for k, v in control.items() if k != "rows"}
            print(json.dumps({label: {"control (no attribute)": results["control (no attribute)"]}}), flush=True)
        for scale in args.attribute_scale:
            started = time.perf_counter()
            result = run_cases(
                pipeline, encoder, cases, attribute_scale=scale, strength=strength, keep_detail=detail, **common
            )
            rows = result.pop("rows")
            result["seconds"] = round(time.perf_counter() - started, 1)
            results[f"attribute_scale={scale}"] = result
            print(json.dumps({label: {f"attribute_scale={scale}": result}}), flush=True)
            suffix = f"-{mode}-scale{scale}"
            if args.strip is not None:
                save_strip(cases, rows, args.strip.with_name(f"{args.strip.stem}{suffix}{args.strip.suffix}"))
            if args.grid is not None and control is not None:
                shown = slice(0, 12)
                save_grid(
                    cases[shown],
                    rows[shown],
                    control["rows"][shown],
                    args.grid.with_name(f"{args.grid.stem}{suffix}{args.grid.suffix}"),
                    size=max(size, 64),
                )
        report[label] = results
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
