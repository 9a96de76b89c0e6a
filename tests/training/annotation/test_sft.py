"""Exporting stage-1 labels as an SFT set, and counting the input tokens the short instruction saves."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from encoder.testing import word_tokenizer
from training.annotation.prompts import SHORT_INSTRUCTION, SHORT_PROMPT_VERSION, parse_answer
from training.annotation.sft import (
    CHAT_OVERHEAD_TOKENS,
    export_sft,
    measure_prompt_tokens,
    qwen_image_tokens,
    text_tokens,
)
from training.data.pairs import PairRecord, write_pairs


@pytest.fixture
def dataset(tmp_path):
    directory = tmp_path / "labels"
    (directory / "images").mkdir(parents=True)
    records = []
    for i in range(5):
        for side in "xy":
            Image.new("RGB", (640, 480), (i * 40, 10, 10)).save(directory / "images" / f"{i}{side}.png")
        records.append(
            PairRecord(
                f"images/{i}x.png",
                f"images/{i}y.png",
                f"caption x {i}",
                f"caption y {i}",
                ("dog identity",),
                ("dog pose", "image lighting"),
                id=f"p{i}",
                source="annotator-stage1" if i < 4 else "procedural",
                meta={"model": "big-vlm", "prompt_version": "stage1-cot-v1", "evidence": {"dog pose": "up vs down"}},
            )
        )
    write_pairs(directory, records)
    with (directory / "pairs.jsonl").open("a") as handle:
        handle.write('{"broken": true}\n')
    return directory


def test_export_writes_chat_examples_of_stage1_labels(dataset, tmp_path):
    report = export_sft(dataset, tmp_path / "elsewhere" / "sft.jsonl", val_fraction=0.25, seed=1)
    assert (report.count, report.val_count) == (3, 1)
    assert report.skipped == {"invalid lines": 1, "source procedural": 1}
    rows = [json.loads(line) for line in report.path.read_text().splitlines()]
    rows += [json.loads(line) for line in report.val_path.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["p0", "p1", "p2", "p3"]
    row = rows[0]
    assert row["prompt_version"] == SHORT_PROMPT_VERSION
    assert row["teacher"] == {"model": "big-vlm", "prompt_version": "stage1-cot-v1"}
    user, assistant = row["messages"]
    assert [part["type"] for part in user["content"]] == ["image", "image", "text"]
    assert user["content"][2]["text"] == SHORT_INSTRUCTION
    image = report.path.parent / user["content"][0]["image"]  # relative to the SFT file
    assert image.resolve() == (dataset / f"images/{row['id'][1]}x.png").resolve()
    answer = parse_answer(assistant["content"][0]["text"])
    assert answer.positive == ("dog identity",) and answer.negative == ("dog pose", "image lighting")
    assert answer.evidence == {}

    kept = export_sft(dataset, keep_evidence=True, sources=None)
    assert kept.path == dataset / "sft.jsonl" and kept.count == 5
    first = json.loads(kept.path.read_text().splitlines()[0])
    assert parse_answer(first["messages"][1]["content"][0]["text"]).evidence == {"dog pose": "up vs down"}


def test_image_tokens_follow_qwen_resizing():
    assert qwen_image_tokens(448, 448) == 256
    assert qwen_image_tokens(640, 480) == 23 * 17  # 644 x 476 px in 28 px cells
    assert qwen_image_tokens(4000, 3000) <= 1280 and qwen_image_tokens(10, 10) == 4  # the max / min budgets


def test_token_report_on_an_exported_set(dataset):
    sft = export_sft(dataset).path
    report = measure_prompt_tokens(sft)  # the packaged MiniLM WordPiece tokenizer, offline
    assert report.examples == 4
    assert report.detailed_text > 20 * report.short_text > 0
    assert report.image_tokens_mean == 2 * qwen_image_tokens(640, 480)
    assert report.text_ratio > report.total_ratio > 1.0
    assert "| total |" in report.text()
    capped = measure_prompt_tokens(sft, max_pixels=256 * 28 * 28)
    assert capped.image_tokens_mean == 2 * qwen_image_tokens(640, 480, max_pixels=256 * 28 * 28) <= 2 * 256
    assert capped.total_ratio > report.total_ratio

    words = word_tokenizer()  # one token per word: a second, independent count
    assert text_tokens(words, SHORT_INSTRUCTION) == CHAT_OVERHEAD_TOKENS + len(SHORT_INSTRUCTION.split()) + 4
