"""(image, attribute) encodings per second: `encode` (a full pass per pair) vs `encode_grid` (shared work).

CPU (default): the compact backend with its default config (pretrained trunk + MiniLM; trainable parts
random, which does not change the cost).

    python bench/encoder_throughput.py                     # compact, batch 1/8/32 x K 1/4/16
    python bench/encoder_throughput.py --device cuda       # mllm, random Qwen2.5-VL-7B-sized, bf16, 448 px
    python bench/encoder_throughput.py --mllm-config tiny  # the mllm code path on CPU, tiny model
    python bench/encoder_throughput.py --model models/starter/encoder --batches 8 32 --ks 4   # the shipped one

The mllm rows also report model FLOPs (torch's FlopCounterMode on one call: matmuls, convolutions and
attention of the vision tower, language model and connector) and MFU against the dense bf16 peak.
Goals (issue): compact >= 50 encodings/s at K = 4 on the 2-core CPU; mllm-7B on one H100 >= 40% MFU at
K = 1, K = 4 <= 1.25x and K = 16 <= 2x the time of K = 1 (same batch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from encoder import AttributeEncoder, EncoderConfig  # noqa: E402

ATTRIBUTES = [
    "image lighting", "art style", "dog pose", "background", "colour palette", "camera angle", "man identity",
    "hairstyle", "material", "texture", "facial expression", "season", "time of day", "composition",
    "clothing", "weather",
]  # fmt: skip
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat", "hubble_deep_field")
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def qwen2_5_vl_7b_config():
    """Qwen2.5-VL-7B-Instruct's architecture (from its published config.json), for random initialisation."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, hidden_act="silu",
    )  # fmt: skip
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        hidden_act="silu", in_channels=3,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip


def build_mllm_encoder(size: str, device: str, dtype: torch.dtype) -> AttributeEncoder:
    """Random-weight mllm encoder (throughput does not depend on the weights), built in memory on `device`."""
    from transformers import AutoModelForImageTextToText

    from encoder.mllm import MllmBackbone
    from encoder.testing import tiny_mllm_config, tiny_qwen_vl_config, word_tokenizer

    if size == "tiny":
        model_config, config = tiny_qwen_vl_config("qwen2_5_vl"), tiny_mllm_config("random-tiny-qwen2_5_vl")
    else:
        model_config, config = qwen2_5_vl_7b_config(), EncoderConfig.mllm("random-qwen2_5_vl-7b")
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(model_config, dtype=dtype, attn_implementation="sdpa")
    # A word-level tokenizer stands in for Qwen's BPE: the prompt has about as many tokens either way.
    backbone = MllmBackbone(config, model=model.eval(), tokenizer=word_tokenizer())
    return AttributeEncoder(config, backbone=backbone, device=device, dtype=dtype).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn, device: str, min_seconds: float, max_repeats: int) -> float:
    """Mean wall time of `fn` after one warm-up call, repeated until `min_seconds` or `max_repeats`."""
    fn()
    synchronize(device)
    start, repeats = time.perf_counter(), 0
    while repeats < max_repeats and (repeats == 0 or time.perf_counter() - start < min_seconds):
        fn()
        synchronize(device)
        repeats += 1
    return (time.perf_counter() - start) / repeats


def model_flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():  # "H100 PCIe" / "H100 NVL" are checked before "H100"
        if key in name:
            return tflops * 1e12
    print(f"unknown GPU {name!r}: pass --peak-tflops to get MFU", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (compact backend) or cuda (mllm backend)")
    parser.add_argument("--mllm-config", choices=["7b", "tiny"], help="run the mllm backend (default on cuda: 7b)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-pairs-encode", type=int, default=128, help="skip `encode` above this many pairs")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="repeat each timing at least this long")
    parser.add_argument("--max-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", help="a compact checkpoint (e.g. models/starter/encoder: with its floor)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mllm_size = args.mllm_config or ("7b" if args.device.startswith("cuda") else None)
    torch.manual_seed(0)
    if mllm_size:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        encoder = build_mllm_encoder(mllm_size, args.device, dtype)
        label = f"mllm ({'Qwen2.5-VL-7B-sized' if mllm_size == '7b' else 'tiny'} Qwen2.5-VL, random, {dtype})"
    else:
        if args.model:
            encoder = AttributeEncoder.from_pretrained(args.model, device=args.device).eval()
        else:
            encoder = AttributeEncoder(EncoderConfig.compact(), device=args.device).eval()
        label = f"compact (EfficientNet-Lite0 + MiniLM-L6, {args.model or 'default config'})"
    peak = peak_flops(args.device, args.peak_tflops) if mllm_size else None
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"backend: {label}; device: {device_name}; image {encoder.config.image_size} px; "
          f"l = {encoder.num_tokens}, d = {encoder.dimension}")  # fmt: skip
    # Decoding and resizing belong to the reader stage (STYLE 4); the encoder gets images at its input size.
    size = encoder.config.image_size
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size)) for name in PHOTOS]

    header = "| batch | K | encode enc/s | encode_grid enc/s | grid speed-up | grid time / K=1 time |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if mllm_size:
        header += " grid GFLOP/call | grid MFU |"
        rule += "---:|---:|"
    print(header)
    print(rule)
    for batch in args.batches:
        images = [photos[i % len(photos)] for i in range(batch)]
        grid_k1 = None
        for k in args.ks:
            attributes = ATTRIBUTES[:k]
            pairs = batch * k

            def run_grid(images=images, attributes=attributes):
                with torch.inference_mode():
                    encoder.encode_grid(images, attributes)

            def run_encode(images=images, attributes=attributes):
                with torch.inference_mode():
                    encoder.encode([im for im in images for _ in attributes], attributes * len(images))

            grid_s = seconds_per_call(run_grid, args.device, args.min_seconds, args.max_repeats)
            grid_k1 = grid_s if k == 1 else grid_k1
            encode = "-"
            if pairs <= args.max_pairs_encode:
                encode_s = seconds_per_call(run_encode, args.device, args.min_seconds, args.max_repeats)
                encode = f"{pairs / encode_s:.1f}"
                speedup = f"{encode_s / grid_s:.2f}x"
            else:
                speedup = "-"
            ratio = f"{grid_s / grid_k1:.2f}" if grid_k1 else "-"
            row = f"| {batch} | {k} | {encode} | {pairs / grid_s:.1f} | {speedup} | {ratio} |"
            if mllm_size:
                flops = model_flops(run_grid)
                mfu = f"{flops / grid_s / peak:.1%}" if peak else "n/a"
                row += f" {flops / 1e9:.1f} | {mfu} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
