"""PASTA's claim on our data: a pretrained backbone makes few-shot head fine-tuning work.

Heads only (backbone frozen, as the federation fine-tunes) are trained on k = 5, 10, 20
cases of a domain-shifted synthetic "hospital" (another seed, a noisier scanner with an
HU offset), starting from (a) the pretrained tiny backbone and (b) a randomly
initialised one, and scored on held-out cases of that hospital. Features are computed
once per case and backbone with the same code the hospital agent uses
(pasta_model.finetune), so the heads train in seconds. Metrics: report accuracy (mean of
the five attributes), lesion-type accuracy and lesion Dice in the lesion crop, each the
mean over `--repeats` random draws of the k cases. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pasta_model import finetune as F
from pasta_model.checkpoint import load_checkpoint
from pasta_model.heads import build_head
from pasta_model.network import build_model
from pasta_model.targets import labels_from_report

log = logging.getLogger("data_efficiency")
TASKS = ("report", "segment")


def synth_generate(root: Path, n: int, size: int, seed: int) -> Path:
    from simulation.cli import main as cli_main
    if not (root / "manifest.jsonl").exists():
        rc = cli_main(["synth", "generate", "--out", str(root), "--n", str(n), "--size", str(size),
                       "--seed", str(seed), "--workers", "2"])
        if rc:
            raise SystemExit(f"synth generate failed ({rc})")
    return root


def shift_scanner(root: Path, noise_hu: float, hu_offset: float, blur_mm: float, seed: int) -> None:
    """The hospital's scanner: extra noise, a calibration offset and blur on every img.nii.gz."""
    import nibabel as nib
    from scipy import ndimage

    from synth.dataset import read_dataset
    rng = np.random.default_rng(seed)
    for r in read_dataset(root):
        src = nib.load(str(r.img))
        hu = np.asarray(src.dataobj, dtype=np.float32)
        sigma = [blur_mm / 2.355 / z for z in src.header.get_zooms()[:3]]
        hu = ndimage.gaussian_filter(hu, sigma) + rng.normal(0, noise_hu, hu.shape) + hu_offset
        out = nib.Nifti1Image(np.clip(np.rint(hu), -1024, 3071).astype(np.int16), src.affine, src.header)
        tmp = r.img.with_name(".shifted.nii.gz")
        nib.save(out, str(tmp))
        tmp.replace(r.img)


def hospital_set(root: Path, n: int, size: int, seed: int, noise: float, offset: float) -> Path:
    """Another seed plus a noisier, offset, blurrier scanner than the pretraining data."""
    if not (root / "manifest.jsonl").exists():
        synth_generate(root, n, size, seed)
        shift_scanner(root, noise, offset, blur_mm=2.0, seed=seed)
    return root


def pretrained_checkpoint(args, work: Path) -> Path:
    if args.checkpoint:
        return args.checkpoint
    from pasta_model.pretrain import PretrainConfig, pretrain
    data = synth_generate(work / "pretrain-data", args.pretrain_cases, 96, seed=1)
    return pretrain(PretrainConfig(data=data, out=work / "pretrain-run", preset="tiny", epochs=100,
                                   max_minutes=args.pretrain_minutes, progress=False))


def features(model, records, preset) -> tuple[list, list, list]:
    """Per case: pooled features, fp16 decoder features, crop lesion mask, labels."""
    from monai.transforms import EnsureChannelFirst, LoadImage
    load = LoadImage(image_only=True)
    pooled, decoder, masks, labels = [], [], [], []
    for r in records:
        img = EnsureChannelFirst()(load(str(r.img)))
        lab = EnsureChannelFirst()(load(str(r.label)))
        lesion = (lab == 2).to(torch.uint8)
        lesion.meta = lab.meta
        crop, mcrop = F.preprocess_region(preset, img, lesion)
        p, d = F.encode_region(model, crop, decode=True)
        pooled.append(p), decoder.append(d), masks.append(mcrop), labels.append(labels_from_report(r.report()))
    return torch.stack(pooled), torch.stack(decoder), masks, labels


def fit_head(task, preset, x, y, steps: int, seed: int, lr: float = 3e-3):
    torch.manual_seed(seed)
    head = build_head(task, preset)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    loss_fn = F.head_loss(task)
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(head(x.float()), y)
        loss.backward()
        opt.step()
    return head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="pretrained tiny checkpoint (default: pretrain one)")
    ap.add_argument("--pretrain-cases", type=int, default=100)
    ap.add_argument("--pretrain-minutes", type=float, default=8.0)
    ap.add_argument("--hospital", type=Path, default=None, help="hospital dataset (default: generate)")
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--ks", default="5,10,20")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--tasks", default="report,segment",
                    help="report and/or segment (segment fits a full-resolution head: ~40 min on 2 cores)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ks = [int(k) for k in args.ks.split(",")]
    tasks = {t.strip() for t in args.tasks.split(",")}
    if not tasks <= {"report", "segment"} or "report" not in tasks:
        ap.error(f"--tasks: {args.tasks!r}; valid: report or report,segment")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        ckpt = pretrained_checkpoint(args, work)
        pre_model, _ = load_checkpoint(ckpt)
        preset = pre_model.preset
        torch.manual_seed(12345)
        rand_model = build_model(preset)
        from synth.dataset import read_dataset
        hosp = args.hospital or hospital_set(work / "hospital", max(ks) + args.n_test, 96, seed=777,
                                             noise=25.0, offset=40.0)
        records = read_dataset(hosp)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(records))
        test_idx, pool_idx = order[: args.n_test], order[args.n_test:]
        feats = {name: features(m, records, preset) for name, m in (("pretrained", pre_model), ("random", rand_model))}

    table: dict = {}
    for k in ks:
        row: dict = {}
        for name, (pooled, decoder, masks, labels) in feats.items():
            scores: dict[str, list] = {"report_accuracy": [], "lesion_type_accuracy": []}
            if "segment" in tasks:
                scores["dice"] = []
            for rep in range(args.repeats):
                train_idx = np.random.default_rng(100 + rep).choice(pool_idx, size=min(k, len(pool_idx)), replace=False)
                lab_tr = [labels[i] for i in train_idx]
                lab_te = [labels[i] for i in test_idx]
                y = F.encode_targets("report", lab_tr)
                head = fit_head("report", preset, pooled[train_idx], y, args.steps, seed=rep)
                res = F.evaluate_head("report", head, pooled[test_idx], F.encode_targets("report", lab_te))
                scores["report_accuracy"].append(res["accuracy"])
                scores["lesion_type_accuracy"].append(res.get("accuracy-lesion_type", float("nan")))
                if "segment" not in tasks:
                    continue
                y = F.encode_targets("segment", lab_tr, [masks[i] for i in train_idx])
                head = fit_head("segment", preset, decoder[train_idx], y, args.steps, seed=rep)
                res = F.evaluate_head("segment", head, decoder[test_idx],
                                      F.encode_targets("segment", lab_te, [masks[i] for i in test_idx]))
                scores["dice"].append(res["dice"])
            row[name] = {m: round(float(np.mean(v)), 4) for m, v in scores.items()}
        row["pretrained_minus_random"] = {m: round(row["pretrained"][m] - row["random"][m], 4)
                                          for m in row["pretrained"]}
        row["pretrained_wins"] = all(v > 0 for v in row["pretrained_minus_random"].values())
        table[str(k)] = row
        print(f"k={k:>3}  " + "  ".join(f"{n}: " + ", ".join(f"{m} {v:.3f}" for m, v in row[n].items())
                                          for n in ("pretrained", "random")), flush=True)
    result = {"backbone_frozen": True, "tasks": sorted(tasks), "ks": ks, "n_test": args.n_test, "repeats": args.repeats,
              "checkpoint": str(args.checkpoint) if args.checkpoint else "pretrained in this run",
              "table": table, "pretrained_wins_every_k": all(r["pretrained_wins"] for r in table.values()),
              "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
