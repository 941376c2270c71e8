"""Frozen-backbone features: computed once per case, reused for every round of fine-tuning.

With the backbone frozen, a site's cases give the same backbone features every round,
so the hospital agent computes them once (`case_features`) and trains the heads on
the cache (`FeatureCache`), which is what makes DP-SGD over the heads affordable.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from synth.atomic import atomic_path

from .network import BackboneFeatures, PastaNet
from .transforms import centred_crop, plain


@torch.no_grad()
def extract_features(model: PastaNet, batch_images: torch.Tensor, decode: bool = True) -> BackboneFeatures:
    """Backbone features of [B, 1, D, H, W] images in eval mode without gradients (detached)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        feats = model.encode(plain(batch_images).float().to(device), decode=decode)
    finally:
        model.train(was_training)
    return BackboneFeatures(pooled=feats.pooled.detach().cpu(),
                            decoder=None if feats.decoder is None else feats.decoder.detach().cpu())


def case_features(model: PastaNet, image: torch.Tensor, center, decode: bool = True,
                  size: int | None = None) -> dict[str, torch.Tensor]:
    """Features of one preprocessed volume [1, *S] from a crop centred on `center`.

    Returns {"pooled": [C_deep], "decoder": [C0, s, s, s]} (decoder only when `decode`),
    the inputs of the classification heads and of the segment head respectively.
    """
    size = size or model.preset.crop_size
    crop = plain(centred_crop(image, center, size, 0.0)).float()[None]
    f = extract_features(model, crop, decode=decode)
    out = {"pooled": f.pooled[0]}
    if f.decoder is not None:
        out["decoder"] = f.decoder[0].to(torch.float16)      # halves the cache; heads upcast
    return out


class FeatureCache:
    """One safetensors file per case under a folder; keyed by case id and backbone hash."""

    def __init__(self, folder: str | os.PathLike, backbone_sha256: str):
        self.folder = Path(folder) / backbone_sha256[:16]
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.safetensors"

    def get(self, case_id: str) -> dict[str, torch.Tensor] | None:
        p = self.path(case_id)
        return load_file(str(p)) if p.exists() else None

    def put(self, case_id: str, feats: dict[str, torch.Tensor]) -> None:
        p = self.path(case_id)
        with atomic_path(p) as tmp:
            save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
