"""Whole-volume lesion segmentation: a standard MONAI recipe against PASTA's backbone, side by side.

Both recipes see the same cases at the `tiny` preset's spacing, the same nnU-Net-style patch
sampler (MONAI `RandCropByPosNegLabeld`: lesion-positive:negative 2:1, 4 crops per volume, so
the lesion lands anywhere in the window, not in its middle) and the same wall-clock budget,
and are scored the same way: sliding-window inference over each held-out volume, lesion Dice
per case, by lesion type and by conspicuity band (`synth.conspicuity`), and organ Dice.

- `monai`: `monai.networks.nets.UNet` (channels 16-128, 2 residual units), 3 classes from
  label.nii.gz (background / host organ / lesion), `ScaleIntensityRanged` -200..300 HU,
  `DiceCELoss`, AdamW 1e-3: the recipe issue 14 reports at Dice 0.000 after 10 CPU minutes.
- `pasta`: the PastaNet backbone of a preset with its lesion head (background / lesion) and a
  dense auxiliary organ target from total.nii.gz (every host organ, `synth.totalseg`), the
  PASTA HU map, Dice+CE on both, AdamW 1e-3 (`pasta_model.segmentation`).

    python bench/segment_reference.py --train 200 --heldout 20 --minutes 8

The last line printed is one JSON object with each recipe's figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pasta_model.presets import get_preset
from pasta_model.segmentation import SegmentationRecipe, evaluate_volumes, load_volumes, train_for
from synth.run import generate_dataset


def _dataset(root: Path, n: int, seed: int, size: int) -> Path:
    generate_dataset(root, n, size=size, seed=seed, workers=2, progress=False)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=20)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget per recipe")
    ap.add_argument("--recipes", default="monai,pasta")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", type=Path, help="reuse a folder (train/ and heldout/ are generated there)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    preset = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.data or Path(tmp)
        train_dir = _dataset(base / "train", args.train, 11, args.size)
        held_dir = _dataset(base / "heldout", args.heldout, 999, args.size)
        results = {}
        for name in args.recipes.split(","):
            recipe = SegmentationRecipe.named(name, preset)
            t0 = time.monotonic()
            train = load_volumes(train_dir, recipe)
            held = load_volumes(held_dir, recipe)
            prep = time.monotonic() - t0
            model, steps = train_for(recipe, train, minutes=args.minutes, seed=args.seed, log_every=100)
            scores = evaluate_volumes(model, recipe, held)
            results[name] = {"steps": steps, "prepare_s": round(prep, 1), **scores}
            lesion, organs = scores["lesion_dice"], scores["organ_dice"] or {}
            print(f"{name}: {steps} steps; lesion Dice {lesion['dice']:.3f} (visible {lesion['visible']['dice']:.3f}), "
                  f"organ Dice {organs.get('dice', float('nan')):.3f}", flush=True)
            for t, v in lesion["by_type"].items():
                print(f"    {t:<20} {v['dice']:.3f} ({v['cases']})")
    print(json.dumps({"minutes": args.minutes, "train": args.train, "heldout": args.heldout, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
