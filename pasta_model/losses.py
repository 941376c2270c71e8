"""Training losses for the PASTA tasks: pure functions over logits and targets.

Missing labels are the norm in multi-task data (benign lesions have no T stage, a
negative crop has no report), so every loss takes an ignore value or mask and
returns an exact zero (still attached to the graph) when nothing in the batch counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor

IGNORE_INDEX = -100

# batch=True: one Dice over the whole batch, so lesion-free crops (empty targets) do not
# each contribute a 0-or-1 Dice term. include_background=False: the background Dice is
# ~1 from the start and would halve the lesion's gradient (nnU-Net's do_bg=False).
_dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False,
                      smooth_nr=1e-5, smooth_dr=1e-5)


def _zero(x: Tensor) -> Tensor:
    return x.sum() * 0.0


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Dice + cross-entropy (MONAI DiceCELoss) of logits [B, 2, *S] against a lesion mask [B, 1, *S]."""
    return _dice_ce(logits.float(), target.long())


def classification_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the samples whose target is not `ignore_index`."""
    target = target.long()
    if not bool((target != ignore_index).any()):
        return _zero(logits)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def report_loss(logits: dict[str, Tensor], targets: dict[str, Tensor], ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean over report attributes (and lesion type) of their cross-entropies."""
    terms = [classification_loss(lg, targets[name], ignore_index) for name, lg in logits.items()]
    return torch.stack(terms).mean()


def detection_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Multi-label BCE-with-logits: index 0 = any tumor, then one per host organ."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def cox_loss(risk: Tensor, time: Tensor, event: Tensor, mask: Tensor | None = None) -> Tensor:
    """Negative Cox log partial likelihood with Breslow ties, averaged over events.

    loss = -(1/E) * sum_{i: event} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]
    Tied times share one risk set (all j with t_j >= t_i), which is Breslow's rule.
    """
    risk = risk.reshape(-1).float()
    time = time.reshape(-1).float()
    event = event.reshape(-1).bool()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        risk, time, event = risk[keep], time[keep], event[keep]
    if risk.numel() == 0 or not bool(event.any()):
        return _zero(risk) if risk.numel() else risk.sum() * 0.0
    # risk set of i = {j : t_j >= t_i}; a dense [N, N] mask is exact and cheap for batch sizes
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)            # row i, column j
    scores = risk.unsqueeze(0).expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(scores, dim=1)
    return -(risk - log_denominator)[event].mean()
