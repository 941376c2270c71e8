"""`pasta-fed synth ...`: a thin argparse shell over synth's functions."""
from __future__ import annotations

import argparse
import sys

from synth.cli_errors import fail
from synth.errors import SynthInputError


def _generate(args) -> int:
    from synth.generate import GenConfig
    from synth.run import check_phase, generate_dataset, parse_size, parse_types

    size = parse_size(args.size)
    if args.spacing is not None and args.spacing <= 0:
        raise SynthInputError(f"--spacing {args.spacing}: must be positive")
    if args.spacing is None and min(size) < 64:
        raise SynthInputError(f"--size {args.size}: at least 64 voxels a side with the default 320 mm "
                              "field of view (or give --spacing)")
    cfg = GenConfig(size=size, spacing=args.spacing, types=parse_types(args.types),
                    phase=check_phase(args.phase), seed=args.seed)
    rows = generate_dataset(args.out, args.n, cfg, workers=args.workers, progress=not args.no_progress)
    print(f"{len(rows)} cases in {args.out} (manifest.jsonl)")
    return 0


def _from_ct(args) -> int:
    from synth.from_ct import insert_into_ct
    from synth.run import parse_types

    types = parse_types(args.types) if args.types else None
    rows = insert_into_ct(args.ct, args.organs, args.out, n=args.n, types=types, label_map=args.label_map,
                          phase=args.phase, seed=args.seed)
    print(f"{len(rows)} cases in {args.out} (manifest.jsonl)")
    return 0


def _show(args) -> int:
    from synth.show import show_case

    print(show_case(args.case_dir, args.png, lesion=args.lesion))
    return 0


def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except SynthInputError as exc:
            return fail(f"synth {args.synth_command}", exc)
    return run


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="synthetic tumor CT (PASTA-Gen style)",
                              description="Synthetic tumor CT: phantom anatomy, 15 lesion types, structured reports.")
    sub = p.add_subparsers(dest="synth_command", required=True)

    g = sub.add_parser("generate", help="generate a dataset from the phantom")
    g.add_argument("--out", required=True, help="output folder (PASTA-Gen-30K layout)")
    g.add_argument("--n", type=int, required=True, help="number of cases")
    g.add_argument("--size", default="128", help="voxels per side, or X,Y,Z (default 128)")
    g.add_argument("--spacing", type=float, default=None,
                   help="mm per voxel (default: a 320 mm field of view, i.e. 320/size)")
    g.add_argument("--types", default=None, help="comma-separated lesion types (default: all 15, round-robin)")
    g.add_argument("--phase", default=None, help="plain, arterial or portal_venous (default: drawn per case)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=1, help="worker processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_guarded(_generate))

    c = sub.add_parser("from-ct", help="insert lesions into your own CT, given an organ mask")
    c.add_argument("--ct", required=True, help="CT volume (NIfTI, HU)")
    c.add_argument("--organs", required=True, help="organ label map (NIfTI) on the CT's grid")
    c.add_argument("--out", required=True)
    c.add_argument("--n", type=int, default=None, help="cases (default: one per lesion type the mask can host)")
    c.add_argument("--types", default=None, help="comma-separated lesion types")
    c.add_argument("--label-map", default=None,
                   help="'totalseg' (TotalSegmentator v2 ids, default) or a JSON file {value: organ name}")
    c.add_argument("--phase", default=None, help="contrast phase (default: told from the aorta's HU)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_guarded(_from_ct))

    s = sub.add_parser("show", help="montage of a case: three planes through a lesion and its report")
    s.add_argument("case_dir")
    s.add_argument("--png", required=True)
    s.add_argument("--lesion", type=int, default=None, help="which lesion, largest first (default 1)")
    s.set_defaults(func=_guarded(_show))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pasta-fed")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
