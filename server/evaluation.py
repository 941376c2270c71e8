"""Global evaluation each round on the coordinator's own synthetic validation set.

The coordinator holds no patient data; it scores the aggregated heads on synthetic
cases (PASTA-Gen layout, `eval-data` in the run config), with features from the same
frozen backbone the sites use, computed once at the start of the run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from monai.transforms import EnsureChannelFirst, LoadImage

from pasta_model.finetune import (
    encode_region,
    encode_targets,
    evaluate_head,
    preprocess_region,
    usable_for,
)
from pasta_model.network import PastaNet
from pasta_model.protocol import arrays_to_heads
from pasta_model.targets import labels_from_report
from server.settings import RunSettings
from synth.dataset import read_dataset

log = logging.getLogger(__name__)


def synthetic_features(model: PastaNet, data_dir: Path, task: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    load = LoadImage(image_only=True)
    channel = EnsureChannelFirst()
    inputs: list[torch.Tensor] = []
    labels: list[dict] = []
    masks: list[torch.Tensor] = []
    for rec in read_dataset(Path(data_dir)):
        lab = labels_from_report(rec.report())
        if not usable_for(task, lab, has_mask=True):
            continue
        image = channel(load(str(rec.img)))
        label = channel(load(str(rec.label)))
        lesion = (label == 2).to(torch.uint8)
        if task == "detect":
            crop, mcrop = preprocess_region(model.preset, image, None)
        else:
            crop, mcrop = preprocess_region(model.preset, image, lesion)
        pooled, decoder = encode_region(model, crop, decode=task == "segment")
        if task == "segment":
            if decoder is None or mcrop is None:
                raise RuntimeError(f"{rec.img}: no decoder features or lesion crop for the segment task")
            inputs.append(decoder.float())
            masks.append(mcrop)
        else:
            inputs.append(pooled)
        labels.append(lab)
    if not inputs:
        raise ValueError(f"{data_dir}: no synthetic case usable for task {task!r}")
    return torch.stack(inputs), encode_targets(task, labels, masks if task == "segment" else None)


def build_global_evaluator(settings: RunSettings, model: PastaNet):
    inputs, targets = synthetic_features(model, Path(settings.eval_data), settings.task)
    log.info("global evaluation on %d synthetic cases from %s", len(inputs), settings.eval_data)

    def evaluate(rnd: int, arrays: ArrayRecord) -> dict[str, float]:
        arrays_to_heads(model, {k: v.numpy() for k, v in arrays.items()}, settings.task)
        return evaluate_head(settings.task, model.heads[settings.task], inputs, targets)

    return evaluate
