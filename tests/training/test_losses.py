"""L_con and the flow-matching pieces against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    bridge_inputs,
    contrastive_loss,
    factor_contrastive_loss,
    flow_matching_inputs,
    flow_matching_loss,
    sample_sigmas,
)


def test_contrastive_loss_matches_hand_computed_values():
    # Pair 0: positives identical, negatives identical, pos orthogonal to neg.
    #   cos(+,+) = 1, cos(+,-) = 0, cos(-,+) = 0, cos(-,-) = 1.
    # Pair 1 (unnormalised inputs): pos_x = (3, 4), pos_y = (4, 3), neg_x = (1, 0), neg_y = (0, 2).
    #   cos(+,+) = 24/25, cos(+,-) = 8/10 = 4/5, cos(-,+) = 4/5, cos(-,-) = 0.
    pos_x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    neg_x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    pos_y = torch.tensor([[2.0, 0.0], [4.0, 3.0]])
    neg_y = torch.tensor([[0.0, 5.0], [0.0, 2.0]])
    tau = 0.5
    e = math.exp
    pair0 = -math.log(e(1 / tau) / (e(1 / tau) + e(0) + e(0) + e(1 / tau)))  # = log(2 + 2 e^-2)
    pair1 = -math.log(e(0.96 / tau) / (e(0.96 / tau) + e(0.8 / tau) + e(0.8 / tau) + e(0.0)))
    per_pair = contrastive_loss(pos_x, neg_x, pos_y, neg_y, tau=tau, reduction="none")
    assert per_pair.tolist() == pytest.approx([pair0, pair1], abs=1e-6)
    assert pair0 == pytest.approx(math.log(2 + 2 * math.exp(-2)))
    assert contrastive_loss(pos_x, neg_x, pos_y, neg_y, tau=tau).item() == pytest.approx((pair0 + pair1) / 2, abs=1e-6)


def test_contrastive_loss_uses_cross_image_terms_only_and_default_tau():
    # Same-image similarities (pos_x vs neg_x) never enter: changing neg_x along pos_x's direction does not matter
    # except through the cross terms. With all four embeddings equal, every psi is equal: L = log 4.
    v = torch.tensor([[0.3, -0.2, 0.9]])
    assert contrastive_loss(v, v, v, v).item() == pytest.approx(math.log(4), abs=1e-6)
    # tau = 0.1 by default: cos(+,+) = 1, others 0 -> L = log(1 + 3 e^-10).
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert contrastive_loss(a, b, a, torch.tensor([[0.0, -1.0]])).item() == pytest.approx(
        -math.log(math.exp(10) / (math.exp(10) + 1 + 1 + math.exp(-10))), abs=1e-6
    )
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(a, b, a, b, tau=0.0)


def test_contrastive_loss_gradient_pulls_positives_together():
    pos_x = torch.tensor([[1.0, 0.2]], requires_grad=True)
    pos_y, neg_x, neg_y = torch.tensor([[0.2, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    before = torch.nn.functional.cosine_similarity(pos_x, pos_y).item()
    contrastive_loss(pos_x, neg_x, pos_y, neg_y).backward()
    with torch.no_grad():
        stepped = pos_x - 0.1 * pos_x.grad
    assert torch.nn.functional.cosine_similarity(stepped, pos_y).item() > before


def test_flow_matching_inputs_follow_flux_convention():
    clean = torch.tensor([[[1.0, -2.0]], [[0.5, 0.5]]])  # (B=2, S=1, C=2)
    noise = torch.tensor([[[3.0, 1.0]], [[-1.0, 2.0]]])
    sigmas = torch.tensor([0.25, 1.0])
    noisy, velocity = flow_matching_inputs(clean, noise, sigmas)
    # x_t = (1 - t) x0 + t noise; v = noise - x0
    assert noisy[0].tolist() == [[0.75 * 1.0 + 0.25 * 3.0, 0.75 * -2.0 + 0.25 * 1.0]]
    assert noisy[1].tolist() == noise[1].tolist()
    assert velocity.tolist() == (noise - clean).tolist()
    # An Euler step of the scheduler from t to 0 with the true velocity lands on the clean latent.
    assert torch.allclose(noisy + (0.0 - sigmas.view(-1, 1, 1)) * velocity, clean)
    # MSE by hand: predicted zeros -> mean of squared velocities.
    expected = sum(v * v for v in (noise - clean).flatten().tolist()) / 4
    assert flow_matching_loss(torch.zeros_like(velocity), velocity).item() == pytest.approx(expected)


def test_bridge_inputs_run_from_the_noised_base_to_the_target():
    generator = torch.Generator().manual_seed(0)
    clean, base, noise = (torch.randn(3, 4, 2, generator=generator) for _ in range(3))  # (B=3, S=4, C=2)
    starts = torch.tensor([0.6, 0.8, 1.0])
    # At sigma = start the state is img2img's first latent: the base noised to the start.
    at_start, velocity = bridge_inputs(clean, base, noise, starts, starts)
    assert torch.allclose(at_start, (1 - starts.view(-1, 1, 1)) * base + starts.view(-1, 1, 1) * noise)
    # Euler steps with the target velocity from any sigma below the start land on the target, not on the base.
    sigmas = torch.tensor([0.3, 0.5, 0.9])
    noisy, velocity = bridge_inputs(clean, base, noise, starts, sigmas)
    assert torch.allclose(noisy - sigmas.view(-1, 1, 1) * velocity, clean, atol=1e-6)
    # Start 1 (or a base equal to the target) is plain flow matching.
    plain = flow_matching_inputs(clean, noise, sigmas)
    assert torch.allclose(bridge_inputs(clean, base, noise, torch.ones(3), sigmas)[0], plain[0], atol=1e-6)
    assert torch.allclose(bridge_inputs(clean, clean, noise, starts, sigmas)[1], plain[1], atol=1e-6)


def test_sample_sigmas_in_unit_interval():
    generator = torch.Generator().manual_seed(0)
    for scheme in ("logit_normal", "uniform"):
        sigmas = sample_sigmas(64, scheme, generator)
        assert sigmas.shape == (64,) and (sigmas > 0).all() and (sigmas < 1).all()
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas(2, "cosine")


def test_factor_contrastive_loss_matches_hand_computed_values():
    # One factor, three images on the unit circle: 0 and 1 share a value, 2 differs; tau = 0.5.
    angles = torch.tensor([0.0, 0.5, 2.0])
    pooled = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)[:, None, :]  # (3, 1, 2)
    labels = torch.tensor([[0], [0], [1]])
    tau = 0.5

    def term(anchor: int, positive: int) -> float:
        others = [m for m in range(3) if m != anchor]
        cos = {m: math.cos(float(angles[anchor] - angles[m])) for m in others}
        return -(cos[positive] / tau - math.log(sum(math.exp(cos[m] / tau) for m in others)))

    expected = (term(0, 1) + term(1, 0)) / 2  # image 2 has no positive: not an anchor
    assert factor_contrastive_loss(pooled, labels, tau=tau).item() == pytest.approx(expected, rel=1e-5)


def test_factor_contrastive_loss_ignores_unknown_labels_and_averages_factors():
    torch.manual_seed(0)
    pooled = torch.randn(4, 2, 8)
    labels = torch.tensor([[0, 5], [0, -1], [1, 5], [1, 6]])
    # Factor 1: image 1 is unknown, so it is neither an anchor nor a candidate; only images 0 and 2 pair up.
    only_factor_0 = factor_contrastive_loss(pooled[:, :1], labels[:, :1])
    only_factor_1 = factor_contrastive_loss(pooled[[0, 2, 3], 1:], labels[[0, 2, 3], 1:])
    anchors_0, anchors_1 = 4, 2
    combined = (only_factor_0 * anchors_0 + only_factor_1 * anchors_1) / (anchors_0 + anchors_1)
    assert factor_contrastive_loss(pooled, labels).item() == pytest.approx(combined.item(), rel=1e-5)


def test_factor_contrastive_loss_is_lower_when_same_values_cluster():
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])[:, None, :]
    mixed = clustered[[0, 2, 1, 3]]
    labels = torch.tensor([[0], [0], [1], [1]])
    assert factor_contrastive_loss(clustered, labels) < factor_contrastive_loss(mixed, labels)
    # No anchor with a positive: zero, and still differentiable.
    pooled = torch.randn(3, 1, 4, requires_grad=True)
    loss = factor_contrastive_loss(pooled, torch.tensor([[0], [1], [2]]))
    loss.backward()
    assert loss.item() == 0.0
