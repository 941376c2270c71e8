"""Losses and metrics against hand-computed values and brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pasta_model import losses, metrics


def test_cox_loss_matches_hand_computed_breslow_value():
    risk = torch.tensor([1.0, 0.0, 2.0])
    time = torch.tensor([1.0, 2.0, 2.0])
    event = torch.tensor([1, 0, 1])
    e = math.e
    expected = -((1 - math.log(e + 1 + e**2)) + (2 - math.log(1 + e**2))) / 2
    assert losses.cox_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)


def test_cox_loss_tied_event_times_share_one_risk_set():
    # Breslow: both events at t=1 see the whole set {0,1,2}
    risk = torch.tensor([0.5, -0.5, 1.0])
    time = torch.tensor([1.0, 1.0, 3.0])
    event = torch.tensor([1, 1, 0])
    den = math.log(math.exp(0.5) + math.exp(-0.5) + math.exp(1.0))
    expected = -((0.5 - den) + (-0.5 - den)) / 2
    assert losses.cox_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)


def test_cox_loss_without_events_is_zero_and_differentiable():
    risk = torch.tensor([0.3, 0.1], requires_grad=True)
    out = losses.cox_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    out.backward()
    assert out.item() == 0.0 and risk.grad is not None


def test_cox_loss_prefers_correctly_ordered_risks():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.ones(4)
    good = losses.cox_loss(torch.tensor([3.0, 2.0, 1.0, 0.0]), time, event)
    bad = losses.cox_loss(torch.tensor([0.0, 1.0, 2.0, 3.0]), time, event)
    assert good < bad


def test_classification_loss_ignores_missing_labels():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    full = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0]))
    got = losses.classification_loss(logits, torch.tensor([0, losses.IGNORE_INDEX]))
    assert got.item() == pytest.approx(full.item())
    none = losses.classification_loss(logits, torch.tensor([losses.IGNORE_INDEX] * 2))
    assert none.item() == 0.0 and not torch.isnan(none)


def test_detection_loss_is_bce_with_logits_by_hand():
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert losses.detection_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_segmentation_loss_low_for_right_and_high_for_wrong_mask():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:5, 2:5, 2:5] = 1
    right = torch.cat([(1 - target) * 10 - 5, target * 10 - 5], dim=1)
    wrong = torch.cat([target * 10 - 5, (1 - target) * 10 - 5], dim=1)
    assert losses.segmentation_loss(right, target) < 0.05
    assert losses.segmentation_loss(wrong, target) > 1.0


def test_c_index_matches_brute_force_pairs():
    rng = np.random.default_rng(0)
    risk = rng.normal(size=40).round(1)          # rounding forces ties in risk
    time = rng.integers(1, 20, size=40).astype(float)   # and in time
    event = rng.random(40) < 0.6
    num = den = 0.0
    for i in range(40):
        for j in range(40):
            if time[i] < time[j] and event[i]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    assert metrics.c_index(risk, time, event) == pytest.approx(num / den)
    assert metrics.c_index(-time, time, np.ones(40)) == 1.0


def test_dice_and_hd95_on_shifted_cube():
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 1, axis=0)
    assert metrics.dice(a, a) == pytest.approx(1.0)
    assert metrics.dice(a, b) == pytest.approx(2 * 100 / 250)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert metrics.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert math.isnan(metrics.hd95(np.zeros_like(a), a))


def test_auc_accuracy_f1_and_majority_baseline():
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert math.isnan(metrics.auc([0.1, 0.2], [1, 1]))
    pred, target = [0, 0, 1, 2], [0, 1, 1, 2]
    assert metrics.accuracy(pred, target) == 0.75
    # per class F1: c0 2/3, c1 2/3, c2 1
    assert metrics.macro_f1(pred, target) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert metrics.majority_baseline([1, 1, 0, 2]) == 0.5
