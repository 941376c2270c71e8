"""Synthetic CT throughput: generation against the floor of only writing the same files.

Generates N cases of 128^3 with 2 worker processes (as `pasta-fed synth generate
--workers 2` does), then writes the very same outputs again with 2 worker processes that
only write (the arrays already in memory, same writer, same compression). Both are timed
in this run, on this machine, so the ratio does not depend on how fast the machine is.
The write-only pass writes the arrays as the generator hands them to the writer
(C-ordered int16/uint8), with the same writer (`synth.dataset.write_case`).

The last line printed is one JSON object:
  volumes_per_min     cases generated (and written) per minute
  ratio_vs_io_floor   generation wall time / write-only wall time (target <= 3)
  cpu_ratio_vs_io_floor  the same with CPU seconds of the workers, which a busy shared
                      machine disturbs less than wall time
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth.dataset import read_dataset, write_case
from synth.generate import Case, GenConfig
from synth.run import generate_dataset


def _write_only(args) -> tuple[float, float]:
    """Load a share of the cases (not timed), then time writing them: (wall s, CPU s)."""
    src, dst, paths = args
    cases = []
    for p in paths:
        rec = next(r for r in read_dataset(src) if r.path == Path(p))
        import nibabel as nib
        import numpy as np

        img = nib.load(str(rec.img))
        # the arrays exactly as the generator hands them to the writer: C-ordered (a
        # NIfTI loads Fortran-ordered, which nibabel writes faster than the generator's)
        arrays = [np.ascontiguousarray(np.asarray(nib.load(str(p)).dataobj), dtype=dt)
                  for p, dt in ((rec.img, np.int16), (rec.label, np.uint8), (rec.total, np.uint8))]
        cases.append(Case(0, *arrays, img.affine, rec.report()))
    t0, c0 = time.perf_counter(), time.process_time()
    for c in cases:
        write_case(Path(dst), c)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="cases (default 30: two of each type)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = GenConfig(size=(args.size,) * 3, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        gen_dir, io_dir = Path(tmp) / "gen", Path(tmp) / "io"
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        generate_dataset(gen_dir, args.n, cfg, workers=args.workers, progress=False)
        t_gen = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_gen = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        paths = [str(r.path) for r in read_dataset(gen_dir)]
        shares = [(str(gen_dir), str(io_dir), paths[k::args.workers]) for k in range(args.workers)]
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(args.workers) as pool:
            res = pool.map(_write_only, shares)
        t_io = max(w for w, _ in res)
        cpu_io = sum(c for _, c in res)
        mb = sum(f.stat().st_size for f in gen_dir.rglob("*.nii.gz")) / 1e6
    out = {
        "volumes_per_min": round(args.n / t_gen * 60.0, 1),
        "ratio_vs_io_floor": round(t_gen / t_io, 2),
        "cpu_ratio_vs_io_floor": round(cpu_gen / cpu_io, 2) if cpu_gen > 0 else None,
        "n": args.n, "size": args.size, "workers": args.workers,
        "generate_s": round(t_gen, 2), "write_only_s": round(t_io, 2), "written_mb": round(mb, 1),
    }
    print(f"generate: {args.n} cases of {args.size}^3 with {args.workers} workers in {t_gen:.1f} s")
    print(f"write only (same files, {args.workers} workers): {t_io:.1f} s for {mb:.0f} MB")
    print(f"worker CPU: generate {cpu_gen:.1f} s, write only {cpu_io:.1f} s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
