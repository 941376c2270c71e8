"""DP-SGD head trainer: real Opacus, real heads; clipping bounds a patient's influence, Poisson steps are
counted, one row per patient is enforced, FedProx pulls towards the global head."""
from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F

from client.privacy.dp_trainer import first_row_per_patient, train_head_dp, train_head_plain
from client.privacy.ledger import epsilon_of, make_accountant
from pasta_model.device import select_device
from pasta_model.heads import REPORT_OUTPUTS, build_head, split_report_logits
from pasta_model.presets import get_preset

TINY = get_preset("tiny")
DELTA = 1e-5


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _separable(n=80, c=TINY.deep_features, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, c, generator=g) * 3
    return centres[y] + torch.randn(n, c, generator=g), y


def test_dp_training_learns_a_separable_stage_head():
    x, y = _separable()
    head = build_head("stage", TINY)
    with torch.no_grad():
        acc0 = (head(x).argmax(1) == y).float().mean().item()
    res = train_head_dp(head, x, y, F.cross_entropy, epochs=8, batch_size=16, lr=0.5, noise_multiplier=0.6,
                        max_grad_norm=1.0, device="cpu", seed=1, delta=DELTA)
    with torch.no_grad():
        acc = (head(x).argmax(1) == y).float().mean().item()
    assert res.head is head  # trained in place: the caller's head holds the result
    assert acc >= 0.8 > acc0 + 0.2
    assert res.steps == 8 * 5 and res.sample_rate == 0.2 and res.num_examples == 80
    assert res.epsilon == pytest.approx(epsilon_of("rdp", [(0.6, 0.2, 40)], DELTA))
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in head.parameters())


def test_per_sample_clipping_bounds_the_update():
    """With q=1 and negligible noise one step moves the weights by at most lr * C, however big the gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g) * 100
    y = torch.randn(16, 1, generator=g) * 1e4
    lr, clip = 0.1, 0.5
    dp_head, plain_head = nn.Linear(8, 1), nn.Linear(8, 1)
    plain_head.load_state_dict(dp_head.state_dict())
    w0 = _flat(dp_head).clone()
    train_head_dp(dp_head, x, y, F.mse_loss, epochs=1, batch_size=16, lr=lr, noise_multiplier=1e-6,
                  max_grad_norm=clip, device="cpu")
    train_head_plain(plain_head, x, y, F.mse_loss, epochs=1, batch_size=16, lr=lr, device="cpu")
    dp_move = (_flat(dp_head) - w0).norm().item()
    plain_move = (_flat(plain_head) - w0).norm().item()
    assert 0 < dp_move <= lr * clip * (1 + 1e-3)
    assert plain_move > 1000 * dp_move


def test_segment_head_on_decoder_features_with_small_physical_batches():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, TINY.base_features, 8, 8, 8, generator=g)
    masks = (feats[:, 0] > 0.5).long()
    head = build_head("segment", TINY)
    assert ModuleValidator.validate(head, strict=False) == []
    acc = make_accountant("rdp")
    res = train_head_dp(head, feats, masks, F.cross_entropy, epochs=2, batch_size=6, lr=0.2,
                        noise_multiplier=1.0, max_grad_norm=1.0, device="cpu", accountant=acc, delta=DELTA,
                        max_physical_batch_size=2)
    # BatchMemoryManager splits the logical batch; the accountant still sees one step per logical batch
    assert res.steps == 4 and acc.history == [(1.0, 0.5, 4)]
    assert torch.isfinite(_flat(head)).all()


def test_report_head_with_dict_targets():
    x, y = _separable(n=30, classes=4)
    targets = {name: torch.randint(0, n, (30,)) for name, n in REPORT_OUTPUTS.items()}

    def loss_fn(logits, t):
        parts = split_report_logits(logits)
        return sum(F.cross_entropy(parts[k], t[k]) for k in parts) / len(parts)

    head = build_head("report", TINY)
    res = train_head_dp(head, x, targets, loss_fn, epochs=1, batch_size=10, lr=0.1, noise_multiplier=1.0,
                        max_grad_norm=1.0, device="cpu")
    assert res.steps == 3 and res.loss > 0


def test_empty_poisson_batches_still_count_as_steps():
    """N=3, B=1: q=1/3, many batches are empty; every one is a noisy step the accountant must see."""
    x, y = torch.randn(3, 8), torch.randint(0, 2, (3,))
    head = nn.Linear(8, 2)
    res = train_head_dp(head, x, y, F.cross_entropy, epochs=10, batch_size=1, lr=0.1, noise_multiplier=1.0,
                        max_grad_norm=1.0, device="cpu", seed=3)
    assert res.steps == 30 and res.accountant.history == [(1.0, 1 / 3, 30)]
    assert torch.isfinite(_flat(head)).all()


def test_several_rows_of_one_patient_are_rejected():
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    head = nn.Linear(8, 2)
    before = _flat(head).clone()
    with pytest.raises(ValueError, match=r"1 patient\(s\) have several rows \(P2\)"):
        train_head_dp(head, x, y, F.cross_entropy, epochs=1, batch_size=2, lr=0.1, noise_multiplier=1.0,
                      max_grad_norm=1.0, device="cpu", patient_ids=["P1", "P2", "P2", "P3"])
    assert torch.equal(_flat(head), before)
    assert first_row_per_patient(["P1", "P2", "P2", "P3"]) == [0, 1, 3]


def test_batchnorm_head_is_fixed_before_make_private():
    x, y = _separable(n=20, c=8, classes=2)
    head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    # fixed seed: a Poisson batch of one row would trip the norm layer's batch-size check
    res = train_head_dp(head, x, y, F.cross_entropy, epochs=1, batch_size=5, lr=0.1, noise_multiplier=1.0,
                        max_grad_norm=1.0, device="cpu", seed=0)
    assert res.head is not head
    assert ModuleValidator.validate(res.head, strict=False) == []


@pytest.mark.parametrize("trainer", [train_head_dp, train_head_plain])
def test_fedprox_pulls_towards_the_global_head(trainer):
    x, y = _separable(n=40, c=16, classes=3)
    start = nn.Linear(16, 3)
    global_state = {k: v.clone() for k, v in start.named_parameters()}
    moves = {}
    for mu in (0.0, 5.0):
        head = nn.Linear(16, 3)
        head.load_state_dict(start.state_dict())
        trainer(head, x, y, F.cross_entropy, epochs=5, batch_size=8, lr=0.1, noise_multiplier=0.5,
                max_grad_norm=1.0, device="cpu", seed=0, global_params=global_state, prox_mu=mu)
        moves[mu] = (_flat(head) - _flat(start)).norm().item()
    assert moves[5.0] < 0.6 * moves[0.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_auto_device_on_a_machine_without_cuda_is_the_cpu_and_cuda_is_refused():
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_device_on_a_cuda_machine_is_the_gpu():
    assert select_device("auto").type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dp_training_on_gpu_matches_the_ledger_accounting():
    x, y = _separable()
    head = build_head("stage", TINY)
    res = train_head_dp(head, x, y, F.cross_entropy, epochs=2, batch_size=16, lr=0.5, noise_multiplier=1.0,
                        max_grad_norm=1.0, device="cuda", delta=DELTA)
    assert res.device.startswith("cuda") and next(head.parameters()).is_cuda
    assert res.steps == 10


def test_noise_is_fresh_each_call_unless_seeded():
    """Repeating the same noise every round would let differences of rounds cancel it."""
    x, y = _separable(n=20, c=8, classes=2)
    start = nn.Linear(8, 2)
    finals = []
    for seed in (None, None, 7, 7):
        head = nn.Linear(8, 2)
        head.load_state_dict(start.state_dict())
        train_head_dp(head, x, y, F.cross_entropy, epochs=1, batch_size=5, lr=0.1, noise_multiplier=1.0,
                      max_grad_norm=1.0, device="cpu", seed=seed)
        finals.append(_flat(head))
    assert not torch.equal(finals[0], finals[1])
    assert torch.equal(finals[2], finals[3])
