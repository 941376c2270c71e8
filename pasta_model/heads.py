"""Task heads: the only parameters that are fine-tuned and leave a site.

They are deliberately small and free of BatchNorm so Opacus can compute per-sample
gradients for them (ModuleValidator.validate(...) == []).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from synth.vocabulary import ATTRIBUTES, HOST_ORGANS, LESION_TYPE_NAMES, T_STAGES

from .presets import Preset

TASKS: tuple[str, ...] = ("segment", "detect", "report", "stage", "survival")

# Report logits are the concatenation of these groups, in this order.
REPORT_OUTPUTS: dict[str, int] = {**{name: len(classes) for name, classes in ATTRIBUTES.items()},
                                  "lesion_type": len(LESION_TYPE_NAMES)}
# Detect logits: index 0 = any tumor in the crop, then one per host organ (multi-label).
DETECT_OUTPUTS: tuple[str, ...] = ("any",) + HOST_ORGANS
SEGMENT_CLASSES: tuple[str, ...] = ("background", "lesion")
SEGMENT_HIDDEN = 16
LEAKY_SLOPE = 0.01
# Lesions fill ~0.2-1 % of a lesion-centred crop; a fresh segment head starts at this lesion probability.
LESION_PRIOR = 0.01

HEAD_OUTPUTS: dict[str, int] = {
    "segment": len(SEGMENT_CLASSES),
    "detect": len(DETECT_OUTPUTS),
    "report": sum(REPORT_OUTPUTS.values()),
    "stage": len(T_STAGES),
    "survival": 1,  # Cox risk score
}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def split_report_logits(logits: Tensor) -> dict[str, Tensor]:
    """Split concatenated report logits [B, sum] into {attribute: [B, n_classes]}."""
    total = sum(REPORT_OUTPUTS.values())
    if logits.ndim != 2 or logits.shape[1] != total:
        raise ValueError(f"report logits must have shape [B, {total}], got {list(logits.shape)}")
    parts = torch.split(logits, list(REPORT_OUTPUTS.values()), dim=1)
    return dict(zip(REPORT_OUTPUTS, parts))


class SegmentHead(nn.Module):
    """1x1x1 convs on full-resolution decoder features -> (background, lesion) logits.

    Pointwise convs keep per-sample gradients cheap under DP-SGD. The output starts at
    p(lesion) = `prior` everywhere (RetinaNet's prior init): from a 50/50 start,
    cross-entropy over crops that are >99 % background first drives every voxel to
    background and the argmax Dice stays exactly 0 for hundreds of steps; from the prior
    an overfitted batch passes Dice 0.8 in ~20 steps instead of ~100.
    """

    def __init__(self, in_channels: int, hidden: int = SEGMENT_HIDDEN, out_channels: int = 2,
                 prior: float = LESION_PRIOR):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, hidden, kernel_size=1)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv2 = nn.Conv3d(hidden, out_channels, kernel_size=1)
        if out_channels == 2 and 0 < prior < 1:
            with torch.no_grad():
                self.conv2.bias.zero_()
                self.conv2.bias[0] = math.log((1 - prior) / prior)   # background logit; lesion logit 0

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x)))


class ClassHead(nn.Module):
    """PASTA's classifier: MLP (Linear + LeakyReLU per hidden size) on pooled features."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(LEAKY_SLOPE)]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def build_head(task: str, preset: Preset) -> nn.Module:
    """A freshly initialised head for `task` sized for `preset`'s backbone."""
    check_task(task)
    if task == "segment":
        return SegmentHead(preset.base_features, out_channels=HEAD_OUTPUTS["segment"])
    return ClassHead(preset.deep_features, preset.head_hidden, HEAD_OUTPUTS[task])
