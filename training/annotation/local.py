"""Stage 2 of the annotator on a local Qwen2-VL / Qwen2.5-VL: the LoRA fine-tuning recipe and the annotator.

Both build the model's input the same way (`QwenChatInputs`): the conversation is rendered with the
tokenizer's chat template (Qwen's ChatML by hand when the tokenizer has none), each `<|image_pad|>` is
expanded to the image's token count, and the images go through Qwen's own image processor (the PIL variant:
torchvision is not needed). Training sequences are that prompt followed by the target answer and the
end-of-turn token; the loss is taken on the answer tokens only.

A fine-tuned annotator is a directory: `annotator_config.json` (base model, instruction and its version,
image resolution, the training run) beside `lora/` in peft's format; `LocalVLMAnnotator.from_finetuned`
needs nothing else. The base weights are never copied.
"""

from __future__ import annotations

import io
import json
import math
import random
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.annotation.prompts import SHORT_PROMPT_VERSION, AnnotationRequest, Reply

ANNOTATOR_CONFIG = "annotator_config.json"
LORA_DIR = "lora"
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100
# Qwen's default image budget is up to 1280 tokens per image; 256 (448 x 448 pixels) is plenty for attributes
# and keeps a two-image sample short.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 256 * 28 * 28


def load_image_bytes(data: bytes) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class QwenChatInputs:
    """Renders an annotation conversation into Qwen-VL inputs (ids, pixels, grid, mm_token_type_ids)."""

    def __init__(self, model_config: Any, tokenizer: Any, *, min_pixels: int, max_pixels: int) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if model_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"the local annotator supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not "
                f"{model_config.model_type!r}; serve other models behind an OpenAI-compatible endpoint"
            )
        self.tokenizer = tokenizer
        self.image_token_id = model_config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = model_config.vision_config.spatial_merge_size
        self.processor = Qwen2VLImageProcessorPil(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=model_config.vision_config.patch_size,
            merge_size=self.merge_size,
        )
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_token = "<|im_end|>" if end not in (None, tokenizer.unk_token_id) else tokenizer.eos_token
        self.stop_ids = sorted(
            {token for token in (end, tokenizer.eos_token_id) if token is not None and token != tokenizer.unk_token_id}
        )

    def render(self, instruction: str, num_images: int = 2, repairs: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt text up to the assistant's turn, with one image placeholder per image."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": instruction})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        for answer, correction in repairs:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            messages.append({"role": "user", "content": [{"type": "text", "text": correction}]})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Qwen2-VL's own template, written out for tokenizers that carry none (the tiny test tokenizer).
        text = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        for message in messages:
            body = "".join(
                f"<|vision_start|>{self.image_token}<|vision_end|>" if part["type"] == "image" else part["text"]
                for part in message["content"]
            )
            text += f"<|im_start|>{message['role']}\n{body}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    def encode(self, images: Sequence[Image.Image], prompt: str, target: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for one sample (batch 1); with `target`, also `labels` (-100 outside the answer)."""
        pixels = self.processor(images=list(images), return_tensors="pt")
        grid = pixels["image_grid_thw"]  # (n_images, 3): t, h, w in patches
        counts = (grid.prod(dim=-1) // self.merge_size**2).tolist()
        pieces = prompt.split(self.image_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders for {len(counts)} images")
        expanded = (self.image_token * count + piece for count, piece in zip(counts, pieces[1:], strict=True))
        text = pieces[0] + "".join(expanded)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        if target is not None:
            answer = self.tokenizer(target + self.end_token, add_special_tokens=False)["input_ids"]
            ids, labels = ids + answer, labels + answer
        input_ids = torch.tensor([ids])  # (1, L)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixels["pixel_values"],  # (sum of patches, 3 * t * p * p)
            image_grid_thw=grid,
            mm_token_type_ids=(input_ids == self.image_token_id).int(),
        )
        if target is not None:
            inputs["labels"] = torch.tensor([labels])
        return inputs


class LocalVLMAnnotator:
    """A Qwen-VL (optionally with a fine-tuned LoRA) answering annotation requests in this process.

    Generation is greedy and serialised by a lock (one model, one forward at a time), so the runner's
    concurrency gives no speed-up here.
    """

    def __init__(
        self,
        base_model: str | Path,
        *,
        lora_path: str | Path | None = None,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_new_tokens: int = 1024,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        model = AutoModelForImageTextToText.from_pretrained(str(base_model), dtype=dtype).to(device)
        if lora_path is not None:
            from peft import PeftModel

            with warnings.catch_warnings():  # peft calls a deprecated transformers 5 property
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                model = PeftModel.from_pretrained(model, str(lora_path))
        self.model = model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        config = self.model.config
        self.inputs = QwenChatInputs(config, self.tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.model_name = name or (f"{base_model}+{lora_path}" if lora_path else str(base_model))
        self.max_concurrency = 1
        self._lock = threading.Lock()

    @classmethod
    def from_finetuned(cls, directory: str | Path, **overrides: Any) -> LocalVLMAnnotator:
        """The annotator saved by `finetune_annotator` (base model + LoRA + image resolution from its config)."""
        directory = Path(directory)
        config = json.loads((directory / ANNOTATOR_CONFIG).read_text())
        values: dict[str, Any] = dict(
            lora_path=directory / config["lora"],
            min_pixels=config["min_pixels"],
            max_pixels=config["max_pixels"],
            name=f"{config['base_model']}+lora:{directory.name}",
        )
        values.update(overrides)
        return cls(config["base_model"], **values)

    def complete(self, request: AnnotationRequest) -> Reply:
        """Greedy generation for one request; the reply text excludes the prompt and special tokens."""
        images = [load_image_bytes(image.data) for image in request.images]
        prompt = self.inputs.render(request.instruction, len(images), request.repairs)
        inputs = self.inputs.encode(images, prompt)
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        prompt_length = inputs["input_ids"].shape[1]
        with self._lock, torch.no_grad():
            generated = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.inputs.stop_ids or None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = generated[0, prompt_length:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        usage = {"prompt_tokens": prompt_length, "completion_tokens": int(new_tokens.shape[0])}
        return Reply(text=text, model=self.model_name, usage=usage)


# ---------------------------------------------------------------------------------------------------------
# The stage-2 fine-tuning recipe


@dataclass
class FinetuneConfig:
    """A LoRA fine-tuning run of a small Qwen-VL on an exported SFT set (see `export_sft`)."""

    sft_path: str
    base_model: str
    output_dir: str
    steps: int | None = None  # optimizer steps; default: `epochs` passes over the set
    epochs: float = 1.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_length: int | None = None  # skip longer samples (a warning names them); None keeps all
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10


@dataclass
class FinetuneResult:
    """The run's per-step mean losses and where the adapter and its config were written."""

    losses: list[float]
    output_dir: Path
    skipped: list[str]


def read_sft(path: str | Path) -> list[dict[str, Any]]:
    """The examples of an SFT JSONL file written by `export_sft` (image paths relative to the file)."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            example = json.loads(line)
            try:
                user, assistant = example["messages"]
                parts = user["content"]
                example["_images"] = [path.parent / part["image"] for part in parts if part["type"] == "image"]
                example["_instruction"] = next(part["text"] for part in parts if part["type"] == "text")
                example["_target"] = next(part["text"] for part in assistant["content"] if part["type"] == "text")
            except (KeyError, TypeError, ValueError, StopIteration) as error:
                raise ValueError(
                    f"{path}:{line_number} is not an SFT example written by export-sft ({error!r})"
                ) from None
            examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no examples; run `omniattr annotate export-sft` on a labelled dataset first")
    return examples


def finetune_annotator(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune LoRA adapters on the language model's attention of a Qwen-VL to answer the short instruction.

    Plain PyTorch: batch size 1 (samples differ in length and image size) with gradient accumulation,
    AdamW with linear warm-up and decay, loss on the answer tokens only. Writes OUTPUT/lora and
    OUTPUT/annotator_config.json.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from encoder.mllm import lora_target_pattern

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    examples = read_sft(config.sft_path)
    model = AutoModelForImageTextToText.from_pretrained(config.base_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    chat = QwenChatInputs(model.config, tokenizer, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_pattern(config.lora_targets),
        bias="none",
    )
    with warnings.catch_warnings():  # peft calls a deprecated transformers 5 property
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        model = get_peft_model(model, lora).to(config.device)  # freezes every base weight
    model.train()

    samples, skipped = [], []
    for example in examples:
        images = [Image.open(path).convert("RGB") for path in example["_images"]]
        prompt = chat.render(example["_instruction"], len(images))
        inputs = chat.encode(images, prompt, example["_target"])
        if config.max_length is not None and inputs["input_ids"].shape[1] > config.max_length:
            skipped.append(str(example.get("id")))
            continue
        samples.append(inputs)
    if not samples:
        raise ValueError(f"every sample is longer than max_length={config.max_length}; raise it")

    steps = config.steps or max(1, math.ceil(config.epochs * len(samples) / config.grad_accum))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.0, 1.0 - (step - config.warmup_steps) / max(1, steps - config.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        step_loss = 0.0
        for _ in range(config.grad_accum):
            if not order:
                order = random.sample(range(len(samples)), len(samples))
            batch = {name: value.to(config.device) for name, value in samples[order.pop()].items()}
            loss = model(**batch).loss / config.grad_accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if config.log_every and (step + 1) % config.log_every == 0:
            print(f"step {step + 1}/{steps}  loss {step_loss:.4f}  ({time.perf_counter() - started:.1f} s)", flush=True)

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output / LORA_DIR)
    instruction = examples[0]["_instruction"]
    annotator_config = dict(
        base_model=str(config.base_model),
        lora=LORA_DIR,
        instruction=instruction,
        prompt_version=examples[0].get("prompt_version", SHORT_PROMPT_VERSION),
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        training={
            **asdict(config),
            "lora_targets": list(config.lora_targets),
            "steps_run": steps,
            "samples": len(samples),
            "skipped": skipped,
            "final_loss": losses[-1],
        },
    )
    (output / ANNOTATOR_CONFIG).write_text(json.dumps(annotator_config, indent=2) + "\n")
    return FinetuneResult(losses=losses, output_dir=output, skipped=skipped)
