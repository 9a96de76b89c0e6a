"""The two training objectives: the attribute contrastive loss and the flow-matching loss (architecture.md, "Training").

    L = lambda_gen * L_gen + lambda_con * L_con        (defaults lambda_gen = 1, lambda_con = 0.01, tau = 0.1)

L_con (per pair, from the pooled embeddings of x and y, each under the sampled a+ and a-):

    psi(a_x, a_y) = exp(cos(pooled E(x, a_x), pooled E(y, a_y)) / tau)          (cross-image terms only)
    L_con = -log psi(a+, a+) / (psi(a+, a+) + psi(a+, a-) + psi(a-, a+) + psi(a-, a-))

L_gen: the flow-matching velocity MSE of the target image's latent under its caption, the generator conditioned
on the reference's attribute tokens. With x_t = (1 - t) x_0 + t noise (t = sigma in [0, 1], t = 1 pure noise,
FLUX's convention) the velocity the frozen FLUX transformer predicts is d x_t / d t = noise - x_0, which is what
`FlowMatchEulerDiscreteScheduler.step` integrates (x_{t'} = x_t + (t' - t) v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    pos_x: torch.Tensor,
    neg_x: torch.Tensor,
    pos_y: torch.Tensor,
    neg_y: torch.Tensor,
    tau: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """L_con over P pairs from pooled embeddings (P, d) each: E(x, a+), E(x, a-), E(y, a+), E(y, a-).

    The inputs need not be normalised (cosine is taken here). reduction "mean" -> scalar, "none" -> (P,).
    """
    if tau <= 0:
        raise ValueError(f"the contrastive temperature tau must be positive, got {tau}")
    # Cross-image cosines, (P,) each: first argument from x, second from y.
    pos_pos = F.cosine_similarity(pos_x.float(), pos_y.float(), dim=-1)
    pos_neg = F.cosine_similarity(pos_x.float(), neg_y.float(), dim=-1)
    neg_pos = F.cosine_similarity(neg_x.float(), pos_y.float(), dim=-1)
    neg_neg = F.cosine_similarity(neg_x.float(), neg_y.float(), dim=-1)
    logits = torch.stack([pos_pos, pos_neg, neg_pos, neg_neg], dim=-1) / tau  # (P, 4): log psi
    # -log(psi_0 / sum psi) = logsumexp(log psi) - log psi_0, computed stably.
    per_pair = torch.logsumexp(logits, dim=-1) - logits[:, 0]  # (P,)
    if reduction == "none":
        return per_pair
    if reduction == "mean":
        return per_pair.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def flow_matching_inputs(
    clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """clean latents x_0 and noise (B, S, C), sigmas (B,) in [0, 1] -> noisy x_t and the target velocity."""
    sigma = sigmas.to(clean.dtype).view(-1, *([1] * (clean.ndim - 1)))  # (B, 1, 1)
    noisy = (1.0 - sigma) * clean + sigma * noise  # (B, S, C)
    return noisy, noise - clean


def bridge_inputs(
    clean: torch.Tensor, base: torch.Tensor, noise: torch.Tensor, starts: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow matching from a noised base latent to the clean target: img2img's path, for apply-to-my-image.

    Sampling at strength s starts from x_s = (1 - s) base + s noise and integrates to sigma 0; the straight path
    from x_s to the target x_0 has the constant velocity v = (x_s - x_0) / s, and at sigma t <= s it is at
    x_t = x_0 + t v. clean, base and noise (B, S, C); starts (B,) in (0, 1]; sigmas (B,) in [0, starts].
    With base = clean, or s = 1, this is flow_matching_inputs.
    """
    shape = (-1, *([1] * (clean.ndim - 1)))
    start, sigma = starts.to(clean.dtype).view(shape), sigmas.to(clean.dtype).view(shape)  # (B, 1, 1)
    velocity = ((1.0 - start) * base + start * noise - clean) / start  # (B, S, C)
    return clean + sigma * velocity, velocity


def flow_matching_loss(predicted_velocity: torch.Tensor, target_velocity: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target velocities, in float32 whatever the autocast dtype."""
    return F.mse_loss(predicted_velocity.float(), target_velocity.float())


def sample_sigmas(
    batch_size: int, scheme: str, generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Training noise levels (B,) in (0, 1): "logit_normal" (SD3 / FLUX fine-tuning default) or "uniform"."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator)).to(device)
    if scheme == "uniform":
        return torch.rand(batch_size, generator=generator).to(device)
    raise ValueError(f"unknown timestep_sampling {scheme!r}; use 'logit_normal' or 'uniform'")


def factor_contrastive_loss(pooled: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss per factor over a batch of images with known factor values.

    pooled (N, F, d): image n under factor f's attribute text; labels (N, F) integer value ids (-1: unknown).
    For each factor and each anchor image, every other image with the same value is a positive, every image
    with another value a negative (Khosla et al. 2020, "SupCon", the mean over positives outside the log):

        L = mean over (f, anchor n with >= 1 positive) of
            -1/|P(n)| * sum_{p in P(n)} log [ exp(s_np / tau) / sum_{m != n, label known} exp(s_nm / tau) ]

    with s the cosine. Not in the paper: an extra term for data whose factors are known (procedural pairs).
    """
    if tau <= 0:
        raise ValueError(f"the contrastive temperature tau must be positive, got {tau}")
    num_images = pooled.shape[0]
    z = F.normalize(pooled.float(), dim=-1).transpose(0, 1)  # (F, N, d)
    logits = z @ z.transpose(1, 2) / tau  # (F, N, N)
    labels = labels.t().to(logits.device)  # (F, N)
    known = labels >= 0  # (F, N)
    self_mask = torch.eye(num_images, dtype=torch.bool, device=logits.device)  # (N, N)
    candidate = known[:, None, :] & known[:, :, None] & ~self_mask  # (F, N, N): anchor row, candidate column
    logits = logits.masked_fill(~candidate, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # (F, N, N)
    positive = candidate & (labels[:, :, None] == labels[:, None, :])  # (F, N, N)
    count = positive.sum(dim=-1)  # (F, N)
    has_positive = count > 0
    if not bool(has_positive.any()):
        return pooled.sum() * 0.0  # no anchor has a positive in this batch: a zero that keeps the graph
    summed = log_prob.masked_fill(~positive, 0.0).sum(dim=-1)  # (F, N)
    per_anchor = -summed[has_positive] / count[has_positive]
    return per_anchor.mean()
