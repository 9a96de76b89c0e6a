"""Seconds per image: personalization and composition with N = 1..4 references, batched vs sequential.

Batched: the N + 2 condition rows [D(0,0), D(0,c), D(A_1,0) .. D(A_N,0)] in one transformer forward per step.
Sequential: the same rows as N + 2 separate transformer calls per step (condition_batch_size=1).
Attribute tokens and prompt embeddings are random (precomputed), so the encoder and text encoders are not
timed; seconds per image cover sampling and VAE decode.

    python bench/generation.py                       # CPU, tiny random generator, 64 x 64
    python bench/generation.py --device cuda         # FLUX.1-sized random transformer, bf16, 1024 x 1024
    python bench/generation.py --model flux --small  # the FLUX code path, shrunken config (runs on a CPU)
    python bench/generation.py --generator GEN --encoder ENC --strength 0.7 --repeats 5   # apply to my image

With `--generator`: a trained generator directory and its encoder, end to end as a user waits for it: the
references (N = 1..3 of the given or synthetic images) encoded by the encoder, the base image encoded by the VAE,
the last `strength` share of the steps run, decoded; the median of `--repeats` after one warm-up.

Goal (the issue; the batched condition rows are in docs/architecture.md, Generator plugin): on one H100 at
batch 1, N = 3 composition <= 1.5 x one personalization.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date

import torch

from generator_plugin.testing import (
    random_attribute_tokens,
    random_flux_generator,
    tiny_generator,
    tiny_prompt_embeds,
)

REFERENCE_COUNTS = (1, 2, 3, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", choices=("tiny", "flux"), help="default: tiny on cpu, flux on cuda")
    parser.add_argument("--small", action="store_true", help="flux path with 1+1 blocks, 2 heads, small VAE")
    parser.add_argument("--double-blocks", type=int, help="flux: double-stream blocks (default 19)")
    parser.add_argument("--single-blocks", type=int, help="flux: single-stream blocks (default 38)")
    parser.add_argument("--heads", type=int, help="flux: attention heads of width 128 (default 24)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (tiny 64, flux 1024, small 128)")
    parser.add_argument("--steps", type=int, help="sampling steps (tiny 28, flux 28, small 2)")
    parser.add_argument("--text-tokens", type=int, help="prompt length T (tiny 8, flux 512, small 32)")
    parser.add_argument("--attribute-tokens", type=int, default=16, help="encoder tokens l per reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (ignored on cuda)")
    parser.add_argument("--no-sequential", action="store_true", help="skip the N + 2 sequential-call column")
    parser.add_argument("--generator", help="time apply-to-my-image on this trained generator directory")
    parser.add_argument("--encoder", default="models/starter/encoder", help="with --generator: encodes the refs")
    parser.add_argument("--strength", type=float, default=0.7, help="with --generator: apply-to-my-image strength")
    parser.add_argument("--images", nargs="+", help="with --generator: base image, then up to 3 references")
    parser.add_argument("--prompt", default="", help="with --generator: the prompt")
    args = parser.parse_args(argv)
    if args.generator:
        args.steps, args.text_tokens = args.steps or 20, 48  # 48: the captions' length the generator trained on
        return args
    args.model = args.model or ("flux" if args.device.startswith("cuda") else "tiny")
    small = args.model == "flux" and args.small
    defaults = {
        "tiny": dict(resolution=64, steps=28, text_tokens=8),
        "flux": dict(resolution=128 if small else 1024, steps=2 if small else 28, text_tokens=32 if small else 512),
    }[args.model]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model == "flux":
        args.double_blocks = args.double_blocks or (1 if small else 19)
        args.single_blocks = args.single_blocks if args.single_blocks is not None else (1 if small else 38)
        args.heads = args.heads or (2 if small else 24)
    return args


def build(args: argparse.Namespace):
    """The pipeline, random prompt embeddings (1, T, J) + (1, P) and random attribute tokens (4, l, d_ctx)."""
    if args.model == "tiny":
        pipe = tiny_generator(seed=0, token_dim=32).to(args.device)
        token_dim = 32
    else:
        token_dim = 4096
        pipe = random_flux_generator(
            token_dim=token_dim,
            double_blocks=args.double_blocks,
            single_blocks=args.single_blocks,
            heads=args.heads,
            vae_channels=(32, 32, 32, 32) if args.small else (128, 256, 512, 512),
            device=args.device,
            dtype=torch.bfloat16,
        )
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, pooled = tiny_prompt_embeds(pipe, seed=1, sequence_length=args.text_tokens)
    prompt = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    tokens = random_attribute_tokens(max(REFERENCE_COUNTS), args.attribute_tokens, token_dim, seed=2)
    return pipe, prompt, tokens


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_image(pipe, call, args) -> float:
    """Median wall time of `call` over args.repeats runs, after one warm-up run."""
    call()
    times = []
    for _ in range(args.repeats):
        synchronize(args.device)
        start = time.perf_counter()
        call()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    pipe, prompt, tokens = build(args)
    common = dict(
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.steps,
        output_type="pil",
        **prompt,
    )

    def generate(num_refs: int, personalize: bool = False, sequential: bool = False):
        kwargs = dict(common, generator=torch.Generator().manual_seed(0))
        if sequential:
            kwargs["condition_batch_size"] = 1
        if personalize:
            return lambda: pipe.personalize(attribute_tokens=tokens[:num_refs], **kwargs)
        return lambda: pipe.compose(attribute_tokens=tokens[:num_refs], attribute_weights=[1.0] * num_refs, **kwargs)

    rows = []
    cases = [("personalize", 1, True)] + [(f"compose N={n}", n, False) for n in REFERENCE_COUNTS]
    for label, num_refs, personalize in cases:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        batched = seconds_per_image(pipe, generate(num_refs, personalize), args)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        sequential = None
        if not args.no_sequential:
            sequential = seconds_per_image(pipe, generate(num_refs, personalize, sequential=True), args)
        rows.append(
            dict(
                label=label,
                refs=num_refs,
                rows=num_refs + 2,
                batched=batched,
                sequential=sequential,
                peak=peak,
            )
        )
    return rows


def synthetic_photo(seed: int, size: int = 224):
    """A deterministic photo-like image (gradients and discs) for when no --images are given."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.3 + 0.4 * xs, 0.2 + 0.5 * ys, 0.6 - 0.3 * xs * ys], axis=-1) * rng.uniform(0.6, 1.0, 3)
    for _ in range(5):
        cy, cx, radius = rng.uniform(0.1, 0.9, 3) * (1, 1, 0.3)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < radius**2] = rng.uniform(0, 1, 3)
    return PIL.Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def run_apply(args: argparse.Namespace) -> list[dict]:
    """Apply-to-my-image on a trained generator: personalize (N = 1) and compose N = 1..3, batched rows."""
    import PIL.Image

    from encoder import AttributeEncoder
    from generator_plugin.plugins import load_generator

    pipe = load_generator("flux", args.generator)
    pipe.set_progress_bar_config(disable=True)
    encoder = AttributeEncoder.from_pretrained(args.encoder).eval()
    args.resolution = args.resolution or pipe.vae.config.sample_size
    images = [PIL.Image.open(path).convert("RGB") for path in args.images or []]
    images += [synthetic_photo(seed) for seed in range(len(images), 4)]
    base, references = images[0], images[1:4]
    with torch.no_grad():
        embeddings = encoder.encode([base], ["lighting"])
    # l, for the description: the adapter's input (with the pooled vector for a pooled_token adapter)
    args.attribute_tokens = pipe.attribute_adapter.condition_tokens(embeddings.tokens, embeddings.pooled).shape[1]
    attributes = ("lighting", "color palette", "art style")
    common = dict(
        prompt=args.prompt,
        image=base,
        strength=args.strength,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.steps,
        max_sequence_length=48,
        attribute_encoder=encoder,
        score_transfer=False,
    )

    def generate(num_refs: int, personalize: bool = False):
        if personalize:
            return lambda: pipe.personalize(
                refs=[(references[0], attributes[0])], generator=torch.Generator().manual_seed(0), **common
            )
        refs = [(references[i], attributes[i], 1.0) for i in range(num_refs)]
        return lambda: pipe.compose(refs=refs, generator=torch.Generator().manual_seed(0), **common)

    cases = [("apply: personalize", 1, True)] + [(f"apply: compose N={n}", n, False) for n in (1, 2, 3)]
    return [
        dict(
            label=label,
            refs=n,
            rows=n + 2,
            batched=seconds_per_image(pipe, generate(n, p), args),
            sequential=None,
            peak=None,
        )
        for label, n, p in cases
    ]


def describe(args: argparse.Namespace) -> str:
    if args.model == "tiny":
        model = "tiny random FLUX-style transformer (2 double + 1 single blocks, width 32) + tiny VAE, float32"
    else:
        model = (
            f"random FLUX.1-shaped transformer ({args.double_blocks} double + {args.single_blocks} single "
            f"blocks, {args.heads} heads x 128, joint_attention_dim 4096) + "
            f"{'small' if args.small else 'FLUX'} VAE, bf16"
        )
    if args.generator:
        model = (
            f"trained generator {args.generator} with encoder {args.encoder}, apply to my image at strength "
            f"{args.strength} ({args.steps} scheduled steps, the last {args.strength:.0%} run), refs encoded per call"
        )
    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    else:
        device += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
    return (
        f"{model}; {args.resolution}x{args.resolution}, {args.steps} steps, "
        f"T = {args.text_tokens} text tokens, "
        f"l = {args.attribute_tokens} attribute tokens; device {device}; torch {torch.__version__}; "
        f"median of {args.repeats} after 1 warm-up"
    )


def table(rows: list[dict]) -> str:
    personalization = rows[0]["batched"]
    has_peak = rows[0]["peak"] is not None
    header = (
        "| case | rows / step | s / image, batched | x personalization | s / image, N + 2 sequential "
        "| batched speed-up |"
    )
    rule = "|---|---|---|---|---|---|"
    if has_peak:
        header += " peak GiB |"
        rule += "---|"
    lines = [header, rule]
    for row in rows:
        sequential = "-" if row["sequential"] is None else f"{row['sequential']:.3f}"
        speedup = "-" if row["sequential"] is None else f"{row['sequential'] / row['batched']:.2f}x"
        line = (
            f"| {row['label']} | {row['rows']} | {row['batched']:.3f} "
            f"| {row['batched'] / personalization:.2f} | "
            f"{sequential} | {speedup} |"
        )
        if has_peak:
            line += f" {row['peak']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    rows = run_apply(args) if args.generator else run(args)
    composition_3 = next(row for row in rows if row["label"].endswith("compose N=3"))["batched"]
    ratio = composition_3 / rows[0]["batched"]
    print(f"# Generation benchmark, {date.today().isoformat()}")
    print(f"command: python {' '.join(['bench/generation.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(describe(args))
    if args.generator:
        print(f"p50 of one apply-to-my-image (personalize, N = 1): {rows[0]['batched']:.3f} s")
    print()
    print(table(rows))
    print()
    print(f"N = 3 composition / personalization = {ratio:.2f} (goal on one H100 at batch 1: <= 1.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
