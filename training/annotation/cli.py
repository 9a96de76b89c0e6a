"""The pair-annotation command line: `omniattr annotate label | export-sft | finetune | mine`.

    omniattr annotate label PAIRS --out DATASET --endpoint URL --model NAME        (stage 1)
    omniattr annotate export-sft DATASET                                           (stage 1 -> SFT set)
    omniattr annotate finetune --sft DATASET/sft.jsonl --base-model PATH --out DIR  (stage 2)
    omniattr annotate label PAIRS --out DATASET --finetuned DIR                    (stage 2 annotator)
    omniattr annotate mine IMAGES --out pairs.jsonl                                (input for stage 1)

The heavy parts (the local VLM, the SFT export, mining) are imported inside their subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.annotation.label import (
    FAILURES_FILENAME,
    Annotator,
    EndpointAnnotator,
    LabelConfig,
    label_pairs,
    read_pair_tasks,
)
from training.annotation.prompts import PROMPTS


def _build_annotator(args: argparse.Namespace) -> Annotator:
    chosen = [name for name in ("endpoint", "local_model", "finetuned") if getattr(args, name)]
    if len(chosen) != 1:
        raise SystemExit("annotate label: give exactly one of --endpoint, --local-model or --finetuned")
    if args.endpoint:
        if not args.model:
            raise SystemExit("annotate label: --endpoint needs --model (the name the server serves)")
        return EndpointAnnotator(
            args.endpoint,
            args.model,
            api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
            timeout_s=args.timeout,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            json_mode=args.json_mode,
            max_connections=args.concurrency,
        )
    from training.annotation.local import LocalVLMAnnotator

    overrides: dict[str, Any] = dict(max_new_tokens=args.max_tokens, device=args.device)
    if args.max_pixels:
        overrides["max_pixels"] = args.max_pixels
    if args.finetuned:
        return LocalVLMAnnotator.from_finetuned(args.finetuned, **overrides)
    return LocalVLMAnnotator(args.local_model, lora_path=args.lora, **overrides)


def cmd_label(args: argparse.Namespace) -> int:
    """`annotate label`: label the pairs with one annotator; exit 1 when any pair failed."""
    tasks, bad = read_pair_tasks(args.pairs)
    if not tasks and not bad:
        print(f"annotate label: no pairs in {args.pairs}", file=sys.stderr)
        return 2
    prompt = args.prompt or ("short" if args.finetuned else "detailed")
    instruction = version = None
    if args.finetuned:
        saved = json.loads((Path(args.finetuned) / "annotator_config.json").read_text())
        if prompt == "short":
            instruction, version = saved["instruction"], saved.get("prompt_version")
    annotator = _build_annotator(args)
    config = LabelConfig(
        out_dir=Path(args.out),
        prompt=prompt,
        instruction=instruction,
        prompt_version=version,
        max_attempts=args.max_attempts,
        concurrency=args.concurrency,
        retry_backoff_s=args.retry_backoff,
        stop_after_unreachable=args.stop_after_unreachable,
        limit=args.limit,
        progress=not args.no_progress,
    )
    try:
        summary = label_pairs(tasks, annotator, config, bad_inputs=bad)
    finally:
        if isinstance(annotator, EndpointAnnotator):
            annotator.close()
    print(summary.text())
    if summary.failed:
        print(f"failures (with raw answers): {config.out_dir / FAILURES_FILENAME}; rerun to retry them")
    return 0 if summary.failed == 0 and summary.stopped is None else 1


def cmd_export_sft(args: argparse.Namespace) -> int:
    """`annotate export-sft`: write the SFT set from stage-1 labels and report its prompt tokens."""
    from training.annotation.sft import export_sft, measure_prompt_tokens

    report = export_sft(
        args.dataset,
        args.out,
        sources=None if args.all_sources else tuple(args.source or ["annotator-stage1"]),
        keep_evidence=args.keep_evidence,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    print(report.text())
    if report.count and not args.no_token_report:
        print(measure_prompt_tokens(report.path, tokenizer=args.tokenizer).text())
    return 0 if report.count else 1


def cmd_finetune(args: argparse.Namespace) -> int:
    """`annotate finetune`: LoRA-fine-tune the stage-2 annotator on an SFT set."""
    from training.annotation.local import FinetuneConfig, finetune_annotator

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = FinetuneConfig(
        sft_path=args.sft,
        base_model=args.base_model,
        output_dir=args.out,
        steps=args.steps,
        epochs=args.epochs,
        learning_rate=args.lr,
        grad_accum=args.grad_accum,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        max_pixels=args.max_pixels,
        max_length=args.max_length,
        seed=args.seed,
        device=args.device,
    )
    result = finetune_annotator(config)
    print(
        f"{len(result.losses)} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
        f"annotator written to {result.output_dir} (use: annotate label --finetuned {result.output_dir})"
    )
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    """`annotate mine`: propose pairs from a folder of images and write them as `label`'s input."""
    from training.annotation.mining import collect_image_paths, mine_pairs, write_mined_pairs

    paths = collect_image_paths(args.images, list_file=args.paths)
    if len(paths) < 2:
        print("annotate mine: need at least two images", file=sys.stderr)
        return 2
    result = mine_pairs(
        paths,
        low=args.low,
        high=args.high,
        neighbours=args.neighbours,
        max_pairs=args.max_pairs,
        image_size=args.image_size,
        progress=not args.no_progress,
    )
    write_mined_pairs(args.out, result.pairs)
    print(result.text())
    print(f"pairs written to {args.out} (next: annotate label {args.out} --out DATASET ...)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `omniattr annotate` parser: one subcommand per stage, each with its `run` function."""
    parser = argparse.ArgumentParser(
        prog="omniattr annotate",
        description="Two-stage MLLM pair annotation: label (stage 1 or 2), export-sft, finetune, mine.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    label = commands.add_parser(
        "label",
        help="label image pairs with captions and positive/negative attributes (stage 1, or stage 2 when fine-tuned)",
        description="Label image pairs; finished labels are appended to OUT/pairs.jsonl at once, failures to "
        "OUT/failures.jsonl; a rerun skips labelled pairs and retries failed ones.",
    )
    label.add_argument("pairs", help="pairs JSONL ({image_x, image_y[, id]} per line, e.g. from `mine`) or a directory")
    label.add_argument("--out", required=True, help="pair dataset directory to write (resumes if it exists)")
    backend = label.add_argument_group("annotator (exactly one)")
    backend.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    backend.add_argument("--model", help="model name on the endpoint, e.g. Qwen/Qwen2.5-VL-72B-Instruct")
    backend.add_argument("--local-model", help="local Qwen2-VL / Qwen2.5-VL directory (transformers)")
    backend.add_argument("--lora", help="LoRA adapter directory for --local-model")
    backend.add_argument("--finetuned", help="a directory written by `finetune` (base model + LoRA + instruction)")
    label.add_argument("--prompt", choices=sorted(PROMPTS), help="default: detailed; short with --finetuned")
    label.add_argument("--max-attempts", type=int, default=3, help="tries per pair, bad answers and errors together")
    label.add_argument("--concurrency", type=int, default=4, help="requests in flight (a local model uses 1)")
    label.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    label.add_argument("--retry-backoff", type=float, default=1.0, help="seconds before the first transport retry")
    label.add_argument("--stop-after-unreachable", type=int, default=5, help="pairs in a row; 0 never stops")
    label.add_argument("--temperature", type=float, default=0.0)
    label.add_argument("--max-tokens", type=int, default=2048, help="answer length limit")
    label.add_argument("--json-mode", action="store_true", help="send response_format json_object (vLLM supports it)")
    label.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    label.add_argument("--max-pixels", type=int, help="local model: image budget in pixels (default 448 x 448)")
    label.add_argument("--device", default="cpu", help="local model device")
    label.add_argument("--limit", type=int, help="label at most this many new pairs")
    label.add_argument("--no-progress", action="store_true")
    label.set_defaults(run=cmd_label)

    export = commands.add_parser("export-sft", help="stage-1 labels -> SFT set (short instruction -> JSON answer)")
    export.add_argument("dataset", help="pair dataset directory written by `label`")
    export.add_argument("--out", help="SFT JSONL (default DATASET/sft.jsonl; DATASET/sft-val.jsonl for --val-fraction)")
    export.add_argument("--source", action="append", help="record source to export, repeatable (annotator-stage1)")
    export.add_argument("--all-sources", action="store_true", help="export every valid record")
    export.add_argument("--keep-evidence", action="store_true", help="targets keep the evidence of each phrase")
    export.add_argument("--val-fraction", type=float, default=0.0)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--tokenizer", help="tokenizer for the token report (default: the packaged MiniLM one)")
    export.add_argument("--no-token-report", action="store_true")
    export.set_defaults(run=cmd_export_sft)

    finetune = commands.add_parser("finetune", help="LoRA-fine-tune a small Qwen-VL on an SFT set (stage 2)")
    finetune.add_argument("--sft", required=True, help="SFT JSONL from export-sft")
    finetune.add_argument("--base-model", required=True, help="local Qwen2-VL / Qwen2.5-VL directory or hub id")
    finetune.add_argument("--out", required=True, help="directory for lora/ and annotator_config.json")
    finetune.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes)")
    finetune.add_argument("--epochs", type=float, default=1.0)
    finetune.add_argument("--lr", type=float, default=1e-4)
    finetune.add_argument("--grad-accum", type=int, default=8)
    finetune.add_argument("--lora-rank", type=int, default=16)
    finetune.add_argument("--lora-alpha", type=int, default=32)
    finetune.add_argument("--max-pixels", type=int, default=256 * 28 * 28, help="image budget in pixels")
    finetune.add_argument("--max-length", type=int, help="skip longer samples")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--device", default="cpu")
    finetune.add_argument("--threads", type=int)
    finetune.set_defaults(run=cmd_finetune)

    mine = commands.add_parser("mine", help="propose pairs: holistic-embedding neighbours within a similarity band")
    mine.add_argument("images", nargs="?", help="directory of images (recursive)")
    mine.add_argument("--paths", help="file listing image paths, one a line (alternative to a directory)")
    mine.add_argument("--out", required=True, help="pairs JSONL to write (input of `label`)")
    mine.add_argument("--low", type=float, default=0.55, help="lowest cosine similarity of a pair")
    mine.add_argument("--high", type=float, default=0.95, help="highest cosine (drops near-duplicates)")
    mine.add_argument("--neighbours", type=int, default=3, help="pairs proposed per image at most")
    mine.add_argument("--max-pairs", type=int)
    mine.add_argument("--image-size", type=int, default=224)
    mine.add_argument("--no-progress", action="store_true")
    mine.set_defaults(run=cmd_mine)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`omniattr annotate COMMAND ...` (also `python -m training.annotation COMMAND ...`)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"annotate {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
