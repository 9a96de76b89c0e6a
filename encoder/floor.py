"""The floor: fixed per-image descriptors of the frozen trunk and the pixels, weighed by the attribute text.

The connector learns what an attribute reads from the image cells, and on images unlike its training data it
can lose what the frozen trunk already knows (bench/heldout_photos.py: the shipped starter ranks subjects
worse than the trunk's own pooled features). The floor keeps that knowledge in the search vector: per image
a few fixed descriptor groups, each through a fixed normalisation and a learned projection to d_ctx, mixed
by a gate that the attribute text sets:

    floor(x, a) = sum_g gate_g(a) * normalize(P_g f_g(x))          gate = softmax(W_gate text_pooled(a) + b)
    pooled(x, a) = normalize(w * normalize(mean(connector tokens)) + floor(x, a))   w = floor_connector_weight

Descriptor groups (DESCRIPTOR_VERSION 1), all computed without gradients once per image:

    head      (1280)  the head map's global average (the holistic trunk), L2-normalised
    style     (944)   per-channel mean and std over the cells of stage2 (40 ch), stage4 (112) and stage6 (320),
                      [mean, std] L2-normalised per level, the three levels concatenated / sqrt(3)
    color     (70)    CIE Lab mean and std (L, a, b each / 100) and the square root of a 4x4x4 joint RGB
                      histogram (64 bins summing to 1: unit norm, the Hellinger embedding)
    lighting  (26)    luminance Y = L/100 in [0, 1]: mean - 0.5, std, percentiles 5/25/50/75/95 - 0.5
                      (exposure and contrast); a 4x4 grid of mean Y - 0.5 (where the light is); warmth =
                      mean(R - B) in [-1, 1] (colour temperature); HSV saturation mean and std

Every normalisation is a fixed function of the image (no learned scale that training could shrink to
nothing); the learned parts are P_g (bias-free) and the gate. P_g starts as a random matrix with orthonormal
rows (or columns where D_g <= d_ctx), so normalize(P_head f_head) keeps the holistic trunk's cosines closely
(exactly where D_g <= d_ctx); the gate starts near uniform (small random weights, zero bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DESCRIPTOR_VERSION = 1
STYLE_LEVELS = ("stage2", "stage4", "stage6")
HISTOGRAM_BINS = 4  # per RGB channel: 4^3 = 64 joint bins
LIGHT_GRID = 4  # 4 x 4 luminance cells
PERCENTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Group name -> width. The order is the order of the concatenated descriptor vector.
GROUPS: dict[str, int] = {"head": 1280, "style": 2 * (40 + 112 + 320), "color": 6 + HISTOGRAM_BINS**3, "lighting": 26}
DESCRIPTOR_DIM = sum(GROUPS.values())


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> CIE Lab (D65), L in [0, 100], a and b roughly in [-110, 110]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = rgb.new_tensor(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear)
    xyz = xyz / rgb.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[:, 1] - 16.0
    a = 500.0 * (f[:, 0] - f[:, 1])
    b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack([lightness, a, b], dim=1)  # (N, 3, H, W)


def color_descriptor(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> (N, 70): Lab mean and std / 100, sqrt of the 64-bin joint RGB histogram."""
    lab = _srgb_to_lab(rgb).flatten(2) / 100.0  # (N, 3, HW)
    stats = torch.cat([lab.mean(-1), lab.std(-1)], dim=1)  # (N, 6)
    bins = (rgb.clamp(0, 1) * HISTOGRAM_BINS).long().clamp_max(HISTOGRAM_BINS - 1).flatten(2)  # (N, 3, HW)
    index = (bins[:, 0] * HISTOGRAM_BINS + bins[:, 1]) * HISTOGRAM_BINS + bins[:, 2]  # (N, HW)
    histogram = torch.zeros(len(rgb), HISTOGRAM_BINS**3, dtype=rgb.dtype, device=rgb.device)
    histogram.scatter_add_(1, index, torch.ones_like(index, dtype=rgb.dtype))
    histogram = histogram / index.shape[1]  # (N, 64), sums to 1
    return torch.cat([stats, histogram.sqrt()], dim=1)  # (N, 70)


def lighting_descriptor(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> (N, 26): exposure, contrast, a 4x4 luminance grid, warmth, saturation."""
    luminance = _srgb_to_lab(rgb)[:, 0] / 100.0  # (N, H, W) in [0, 1]
    flat = luminance.flatten(1)  # (N, HW)
    levels = torch.quantile(flat, flat.new_tensor(PERCENTILES), dim=1).t()  # (N, 5)
    grid = F.adaptive_avg_pool2d(luminance[:, None], LIGHT_GRID).flatten(1)  # (N, 16)
    warmth = (rgb[:, 0] - rgb[:, 2]).flatten(1).mean(1, keepdim=True)  # (N, 1)
    high, low = rgb.amax(1), rgb.amin(1)  # (N, H, W)
    saturation = ((high - low) / high.clamp_min(1e-3)).flatten(1)  # (N, HW), HSV saturation
    return torch.cat(
        [
            flat.mean(1, keepdim=True) - 0.5,
            flat.std(1, keepdim=True),
            levels - 0.5,
            grid - 0.5,
            warmth,
            saturation.mean(1, keepdim=True),
            saturation.std(1, keepdim=True),
        ],
        dim=1,
    )  # (N, 26)


def style_descriptor(levels: dict[str, torch.Tensor]) -> torch.Tensor:
    """stage2/4/6 maps (N, C, h, w) -> (N, 944): per-channel [mean, std], L2-normalised per level, / sqrt(3)."""
    parts = []
    for name in STYLE_LEVELS:
        cells = levels[name].float().flatten(2)  # (N, C, hw)
        parts.append(F.normalize(torch.cat([cells.mean(-1), cells.std(-1)], dim=1), dim=-1))  # (N, 2C)
    return torch.cat(parts, dim=1) / math.sqrt(len(STYLE_LEVELS))  # (N, 944)


def image_descriptors(head: torch.Tensor, levels: dict[str, torch.Tensor], rgb: torch.Tensor) -> torch.Tensor:
    """Head map (N, 1280, h, w), stage2/4/6 maps and sRGB pixels (N, 3, H, W) in [0, 1] -> (N, DESCRIPTOR_DIM).

    The groups of GROUPS, concatenated in that order, each already through its fixed normalisation.
    """
    rgb = rgb.float()
    return torch.cat(
        [
            F.normalize(head.float().mean(dim=(2, 3)), dim=-1),  # (N, 1280): the holistic trunk
            style_descriptor(levels),
            color_descriptor(rgb),
            lighting_descriptor(rgb),
        ],
        dim=1,
    )


def _orthogonal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, columns) matrix with orthonormal rows (rows <= columns) or orthonormal columns (otherwise)."""
    tall = torch.randn(max(rows, columns), min(rows, columns), generator=generator)
    q, r = torch.linalg.qr(tall)  # (max, min) orthonormal columns
    q = q * torch.sign(torch.diagonal(r))  # a unique, uniformly random orthogonal basis
    return q.t().contiguous() if rows <= columns else q.contiguous()


class FloorHead(nn.Module):
    """Per-group projections P_g (D_g -> d_ctx) and the text gate; `forward` gives the floor vector (P, d_ctx)."""

    def __init__(self, text_dim: int, context_dim: int, seed: int = 0, gate_connector: bool = False) -> None:
        """`gate_connector`: the gate has one more entry, the connector's weight (config floor_gate_connector)."""
        super().__init__()
        self.gate_connector = gate_connector
        generator = torch.Generator().manual_seed(seed)  # a fixed initialisation, whatever the global seed
        self.projections = nn.ModuleDict()
        for name, width in GROUPS.items():
            projection = nn.Linear(width, context_dim, bias=False)
            with torch.no_grad():
                projection.weight.copy_(_orthogonal(context_dim, width, generator))
            self.projections[name] = projection
        # A fixed centre subtracted from the descriptors before the projections: zero at initialisation;
        # training/floor_fit.py sets it to the mean descriptor of its training images (not learned by gradient).
        # Centred, the trunk's all-positive pooled features spread over the sphere: two unrelated images no longer
        # look alike under every attribute, and the ranking is kept (bench/RESULTS.md, "The floor fit").
        self.register_buffer("center", torch.zeros(DESCRIPTOR_DIM))
        entries = len(GROUPS) + int(gate_connector)
        self.gate = nn.Linear(text_dim, entries)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(entries, text_dim, generator=generator) * 0.02)
            self.gate.bias.zero_()

    def gates(self, text_pooled: torch.Tensor) -> torch.Tensor:
        """(A, d_text) pooled attribute text -> (A, G) group weights, summing to 1 (GROUPS order); with
        `gate_connector` (A, G + 1), the last column the connector's weight."""
        return torch.softmax(self.gate(text_pooled.to(self.gate.weight.dtype)), dim=-1)

    def group_vectors(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(N, DESCRIPTOR_DIM) -> (N, G, d_ctx): normalize(P_g (f_g - center_g)) per group."""
        centred = descriptors.to(self.gate.weight.dtype) - self.center.to(self.gate.weight.dtype)
        parts = centred.split(list(GROUPS.values()), dim=1)
        projected = [self.projections[name](part) for name, part in zip(GROUPS, parts, strict=True)]
        return F.normalize(torch.stack(projected, dim=1), dim=-1)

    def forward(self, group_vectors: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """group vectors (P, G, d_ctx), gates (P, G) -> floor (P, d_ctx) = sum_g gate_g * vector_g."""
        return torch.einsum("pg,pgd->pd", gates.to(group_vectors.dtype), group_vectors)

    def mix(
        self, group_vectors: torch.Tensor, gates: torch.Tensor, connector: torch.Tensor, connector_weight: float
    ) -> torch.Tensor:
        """The unnormalised search vector (P, d_ctx): connector_weight * [gate_connector] * connector + floor.

        group vectors (P, G, d_ctx), gates (P, G) or (P, G + 1) from `gates`, connector pooled (P, d_ctx).
        """
        weight = torch.full_like(connector[:, :1], connector_weight)  # (P, 1)
        if self.gate_connector:
            weight = weight * gates[:, -1:].to(connector.dtype)
            gates = gates[:, :-1]
        return weight * connector + self(group_vectors, gates).to(connector.dtype)
