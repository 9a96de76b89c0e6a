"""Stage 2 on tiny random Qwen2-VL / Qwen2.5-VL models (encoder.testing): the LoRA recipe and the local annotator.

A random model answers garbage, which must end as a recorded bad answer, never as a crash.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from encoder.testing import save_tiny_qwen_vl
from training.annotation.label import FAILURES_FILENAME, LabelConfig, PairTask, label_pairs
from training.annotation.local import (
    ANNOTATOR_CONFIG,
    LORA_DIR,
    FinetuneConfig,
    LocalVLMAnnotator,
    QwenChatInputs,
    finetune_annotator,
    read_sft,
)
from training.annotation.prompts import SHORT_INSTRUCTION, SHORT_PROMPT_VERSION, AnnotationRequest, ImageBlob
from training.annotation.sft import export_sft
from training.data.pairs import PairRecord, write_pairs

TINY_PIXELS = 56 * 56  # 4 image tokens per image


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_base(request, tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_qwen_vl(tmp_path_factory.mktemp(request.param), kind=request.param)


@pytest.fixture(scope="module")
def stage1_dataset(tmp_path_factory):
    """A labelled stage-1 dataset of three pairs (written directly, as `label` would)."""
    directory = tmp_path_factory.mktemp("stage1")
    (directory / "images").mkdir()
    records = []
    for i in range(3):
        for side, blue in (("x", 0), ("y", 200)):
            Image.new("RGB", (60, 50), (i * 60, 90, blue)).save(directory / "images" / f"{i}{side}.png")
        records.append(
            PairRecord(
                f"images/{i}x.png",
                f"images/{i}y.png",
                "a dog on grass",
                "a dog on sand",
                ("dog identity", "image lighting"),
                ("background",),
                id=f"p{i}",
                source="annotator-stage1",
                meta={"model": "big-vlm", "prompt_version": "stage1-cot-v1"},
            )
        )
    write_pairs(directory, records)
    return directory


def _request(path) -> AnnotationRequest:
    blob = ImageBlob(path.read_bytes(), "image/png")
    return AnnotationRequest((blob, blob), SHORT_INSTRUCTION)


@pytest.mark.slow
def test_chat_inputs_expand_image_tokens_and_mask_the_prompt(tiny_base, stage1_dataset):
    annotator = LocalVLMAnnotator(tiny_base, min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, max_new_tokens=4)
    chat: QwenChatInputs = annotator.inputs
    prompt = chat.render(SHORT_INSTRUCTION, 2, [("bad answer", "try again")])
    assert prompt.count("<|image_pad|>") == 2 and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.index("bad answer") < prompt.index("try again")
    image = Image.open(stage1_dataset / "images" / "0x.png").convert("RGB")
    inputs = chat.encode([image, image], prompt, target='{"caption_x": "a dog"}')
    image_positions = inputs["input_ids"][0] == chat.image_token_id
    assert int(image_positions.sum()) == 8  # 2 images x (56/14)^2 patches / 2^2 merge
    assert torch.equal(inputs["mm_token_type_ids"][0].bool(), image_positions)
    labels = inputs["labels"][0]
    answer = labels != -100
    assert answer.any() and not answer[: int(image_positions.nonzero().max()) + 1].any()  # prompt masked
    assert torch.equal(labels[answer], inputs["input_ids"][0][answer])


@pytest.mark.slow
def test_local_annotator_garbage_is_recorded_as_a_bad_answer(tiny_base, stage1_dataset, tmp_path):
    annotator = LocalVLMAnnotator(tiny_base, min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, max_new_tokens=12)
    reply = annotator.complete(_request(stage1_dataset / "images" / "0x.png"))
    assert reply.usage["completion_tokens"] <= 12 and reply.usage["prompt_tokens"] > 8

    images = stage1_dataset / "images"
    tasks = [PairTask("a", images / "0x.png", images / "0y.png"), PairTask("b", images / "1x.png", images / "1y.png")]
    out = tmp_path / "labels"
    config = LabelConfig(out_dir=out, prompt="short", max_attempts=2, concurrency=4, progress=False)
    summary = label_pairs(tasks, annotator, config)
    assert (summary.labelled, summary.failed) == (0, 2)
    rows = [json.loads(line) for line in (out / FAILURES_FILENAME).read_text().splitlines()]
    assert {row["kind"] for row in rows} <= {"not_json", "schema"}
    assert all(len(row["attempts"]) == 2 and row["attempts"][0]["raw_answer"] is not None for row in rows)
    assert rows[0]["model"] == str(tiny_base) and rows[0]["prompt_version"] == SHORT_PROMPT_VERSION


@pytest.mark.slow
def test_lora_recipe_trains_saves_and_reloads(tiny_base, stage1_dataset, tmp_path):
    sft = export_sft(stage1_dataset, tmp_path / "sft" / "train.jsonl").path
    assert len(read_sft(sft)) == 3
    output = tmp_path / "annotator"
    config = FinetuneConfig(
        sft_path=str(sft),
        base_model=str(tiny_base),
        output_dir=str(output),
        steps=6,
        learning_rate=5e-3,
        lora_rank=4,
        lora_alpha=8,
        min_pixels=TINY_PIXELS,
        max_pixels=TINY_PIXELS,
        log_every=0,
    )
    result = finetune_annotator(config)
    assert len(result.losses) == 6 and all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] < result.losses[0]  # it learns the answers of three samples

    saved = json.loads((output / ANNOTATOR_CONFIG).read_text())
    assert saved["base_model"] == str(tiny_base) and saved["instruction"] == SHORT_INSTRUCTION
    assert saved["prompt_version"] == SHORT_PROMPT_VERSION and saved["training"]["steps_run"] == 6
    adapter = load_file(output / LORA_DIR / "adapter_model.safetensors")
    assert adapter and all("lora_" in name and "language_model" in name for name in adapter)
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # trained

    annotator = LocalVLMAnnotator.from_finetuned(output, max_new_tokens=6)
    reloaded = {name: value for name, value in annotator.model.state_dict().items() if "lora_" in name}
    assert len(reloaded) == len(adapter)
    for name, tensor in adapter.items():
        match = [value for key, value in reloaded.items() if key.replace(".default", "") == name]
        assert len(match) == 1 and torch.allclose(match[0], tensor)
    reply = annotator.complete(_request(stage1_dataset / "images" / "2x.png"))  # the same code path as stage 1
    assert isinstance(reply.text, str) and "lora" in reply.model
