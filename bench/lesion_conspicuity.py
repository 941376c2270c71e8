"""The data first: per lesion type, how visible lesions are, how large at each preset's spacing,
and whether the report's density agrees with the image.

For each generated case (`synth generate` layout): conspicuity (`synth.conspicuity`), lesion
voxels at each preset's spacing, and the report's `density` against the sign of the measured
ring contrast (hypodense below -10 HU, hyperdense above +10, else isodense, the thresholds the
generator's own measurement uses). Prints a table per lesion type and, last, one JSON line.

    python bench/lesion_conspicuity.py --data DIR            # an existing dataset
    python bench/lesion_conspicuity.py --n 30 --seed 7       # generate 30 cases at 96^3 first
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pasta_model.presets import load_presets
from synth.conspicuity import measure
from synth.dataset import read_dataset
from synth.measure import DENSITY_HU
from synth.run import generate_dataset


def image_density(contrast: float) -> str:
    return "hypodense" if contrast < -DENSITY_HU else "hyperdense" if contrast > DENSITY_HU else "isodense"


def measure_dataset(root: Path) -> list[dict]:
    presets = load_presets()
    rows = []
    for rec in read_dataset(root):
        img, label, _, affine = rec.load()
        c = measure(img, label)
        if c is None:
            continue
        rep = rec.report()
        spacing = float(np.prod(rep["spacing_mm"]))
        said = rep["lesions"][0].get("density") if rep.get("lesions") else None
        rows.append({"case": rep["id"], "type": rep["lesion_type"], "phase": rep["phase"],
                     "conspicuity": round(c.conspicuity, 3), "contrast_hu": round(c.contrast_hu, 1),
                     "noise_sd": round(c.noise_sd, 1),
                     "voxels": {name: round(c.voxels * spacing / p.spacing_mm ** 3, 1) for name, p in presets.items()},
                     "density_report": said, "density_image": image_density(c.contrast_hu)})
    return rows


def summarise(rows: list[dict]) -> dict:
    by_type = defaultdict(list)
    for r in rows:
        by_type[r["type"]].append(r)
    out = {}
    for t, rs in sorted(by_type.items()):
        cs = np.array([r["conspicuity"] for r in rs])
        out[t] = {"n": len(rs), "median_conspicuity": round(float(np.median(cs)), 2),
                  "below_2": int((cs < 2).sum()), "below_0_3": int((cs < 0.3).sum()),
                  "median_voxels_tiny": round(float(np.median([r["voxels"]["tiny"] for r in rs])), 1),
                  "contradictions": sum(r["density_report"] not in (None, r["density_image"]) for r in rs)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an existing dataset (default: generate one)")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "data"
            generate_dataset(root, args.n, size=args.size, seed=args.seed, workers=2, progress=False)
        rows = measure_dataset(root)
    summary = summarise(rows)
    print(f"{'type':<20} {'n':>3} {'median consp.':>13} {'<2':>4} {'<0.3':>5} {'vox@tiny':>9} {'report!=image':>13}")
    for t, s in summary.items():
        print(f"{t:<20} {s['n']:>3} {s['median_conspicuity']:>13.2f} {s['below_2']:>4} {s['below_0_3']:>5} "
              f"{s['median_voxels_tiny']:>9.1f} {s['contradictions']:>13}")
    cs = np.array([r["conspicuity"] for r in rows])
    total = {"cases": len(rows), "median_conspicuity": round(float(np.median(cs)), 2),
             "fraction_below_2": round(float((cs < 2).mean()), 3),
             "fraction_below_0_3": round(float((cs < 0.3).mean()), 3),
             "contradictions": sum(s["contradictions"] for s in summary.values())}
    print(json.dumps({"total": total, "by_type": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
