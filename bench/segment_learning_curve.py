"""How fast does the tiny net learn lesion segmentation, and what does it learn?

Trains the backbone + segment head alone (Dice+CE, as pretraining does) on crops cut
from the cached lesion regions with the lesion centred (`--jitter 0`) or anywhere
within +-J voxels of the crop centre, and scores held-out cases' crops of both kinds
every `--every` steps. A net that learned lesion appearance scores on both; one that
learned "the lesion is in the middle of the window" scores on centred crops only (and
draws a blob at every sliding-window centre of a whole volume). `--boost H` adds H HU
(after the PASTA map, in the soft-tissue band) to every lesion voxel: how much contrast
the net needs to learn within the step budget.

Last line: one JSON object {"runs": [{"jitter", "boost_hu", "curve": [{step,
dice_centred, dice_shifted}]}]}. Figures: docs/model.md, "Segmentation".
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pasta_model.data import prepare_cases, region_plan, split_cases
from pasta_model.device import autocast, channels_last, resolve_precision, select_device
from pasta_model.losses import segmentation_loss
from pasta_model.metrics import dice
from pasta_model.network import build_model
from pasta_model.presets import get_preset
from pasta_model.transforms import centred_crop, plain
from synth.dataset import read_dataset

HU_PER_UNIT = 400 / 0.7      # the PASTA map's soft-tissue band: -200..200 HU -> 0.2..0.9


def crop(image: torch.Tensor, mask: torch.Tensor, size: int, shift: np.ndarray):
    """The `size` crop whose centre is `shift` voxels off the region's (lesion-centred) centre."""
    center = [n // 2 + int(s) for n, s in zip(image.shape[1:], shift)]
    return plain(centred_crop(image, center, size)), plain(centred_crop(mask, center, size))


def score(model, cases, size: int, jitter: int, device, precision: str) -> float:
    rng = np.random.default_rng(1)
    model.eval()
    out = []
    with torch.no_grad(), autocast(device, precision):
        for image, mask in cases:
            x, m = crop(image, mask, size, rng.integers(-jitter, jitter + 1, 3))
            logits = model(channels_last(x[None]), tasks=("segment",))["segment"].float()
            out.append(dice(logits.argmax(1)[0].cpu().numpy() > 0, m[0].cpu().numpy() > 0.5))
    model.train()
    return float(np.mean(out))


def run(cases_train, cases_val, preset, jitter: int, eval_jitter: int, steps: int, every: int, batch: int,
        lr: float, device, precision: str) -> list[dict]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(preset, tasks=("segment",)).to(device).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    size, curve, t0 = preset.crop_size, [], time.monotonic()
    for step in range(1, steps + 1):
        pick = rng.choice(len(cases_train), batch, replace=False)
        xs, ms = zip(*[crop(*cases_train[i], size, rng.integers(-jitter, jitter + 1, 3)) for i in pick])
        with autocast(device, precision):
            logits = model(channels_last(torch.stack(xs)), tasks=("segment",))["segment"]
        loss = segmentation_loss(logits, torch.stack(ms))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append({"step": step, "seconds": round(time.monotonic() - t0, 1),
                          "dice_centred": round(score(model, cases_val, size, 0, device, precision), 3),
                          "dice_shifted": round(score(model, cases_val, size, eval_jitter, device, precision), 3)})
            logging.warning("jitter %d: %s", jitter, curve[-1])
    return curve


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="PASTA-Gen-layout dataset (>= 40 cases)")
    ap.add_argument("--cache", type=Path, default=None, help="region cache folder (default: in memory)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--jitters", default="0,20", help="training crop shifts to compare (voxels)")
    ap.add_argument("--eval-jitter", type=int, default=20)
    ap.add_argument("--boost-hu", default="0", help="comma list: HU added to lesion voxels (0 = the data as is)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    preset, device = get_preset(args.preset), select_device(args.device)
    precision = resolve_precision("auto", device)
    jitters = [int(j) for j in args.jitters.split(",")]
    margin = max(jitters + [args.eval_jitter])
    records = read_dataset(args.data)
    prepared = prepare_cases(records, preset, region_plan(preset, margin, 0, 0), cache_dir=args.cache, workers=2)
    prepared = [c for c in prepared if c["lesion_mask"].any()]
    train_ids, val_ids = split_cases([c["case_id"] for c in prepared], args.val_fraction, 0)
    runs = []
    for boost in [float(b) for b in args.boost_hu.split(",")]:
        # called within this iteration only; boost is bound so the closure and the reader agree
        def tensors(c, boost=boost):
            m = c["lesion_mask"].float()
            return ((c["lesion_image"].float() + m * (boost / HU_PER_UNIT)).to(device), m.to(device))
        train = [tensors(c) for c in prepared if c["case_id"] in set(train_ids)]
        val = [tensors(c) for c in prepared if c["case_id"] in set(val_ids)]
        for jitter in jitters:
            curve = run(train, val, preset, jitter, args.eval_jitter, args.steps, args.every, args.batch_size,
                        args.lr, device, precision)
            runs.append({"jitter": jitter, "boost_hu": boost, "curve": curve})
    print(json.dumps({"preset": preset.name, "device": str(device), "train_cases": len(train_ids),
                      "val_cases": len(val_ids), "eval_jitter": args.eval_jitter, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
