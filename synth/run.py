"""Generating a dataset: cases in parallel worker processes, resumable, with a progress bar."""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from synth.dataset import (
    case_dir,
    check_run_settings,
    is_complete,
    manifest_row,
    remove_partials,
    write_case,
    write_manifest,
)
from synth.errors import SynthInputError
from synth.generate import GENERATOR_VERSION, GenConfig, generate_case
from synth.noise import warm_up
from synth.scanner import ScannerProfile
from synth.vocabulary import LESION_TYPE_NAMES, PHASES


def parse_types(spec: str | None) -> tuple[str, ...]:
    if spec in (None, "", "all"):
        return LESION_TYPE_NAMES
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    for t in names:
        if t not in LESION_TYPE_NAMES:
            raise SynthInputError(f"--types: unknown lesion type '{t}' (known: {', '.join(LESION_TYPE_NAMES)})")
    if not names:
        raise SynthInputError("--types: no lesion type given")
    return names


def parse_size(spec) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in str(spec).split(",")]
    except ValueError:
        raise SynthInputError(f"--size {spec}: expected VOXELS or X,Y,Z") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p < 32 or p > 1024 for p in parts):
        raise SynthInputError(f"--size {spec}: each side must be 32..1024 voxels")
    return tuple(parts)


def check_phase(phase: str | None) -> str | None:
    if phase in (None, "", "random"):
        return None
    if phase not in PHASES:
        raise SynthInputError(f"--phase: unknown phase '{phase}' (known: {', '.join(PHASES)}, random)")
    return phase


def _work(args) -> dict:
    out, seed, index, cfg = args
    return write_case(Path(out), generate_case(seed, index, cfg))


def _context():
    """fork is the quickest start; it is safe while no threaded library (torch) is loaded."""
    methods = mp.get_all_start_methods()
    if "fork" in methods and "torch" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def make_config(*, seed: int = 0, size=128, spacing: float | None = None, types=None,
                phase: str | None = None, scanner: ScannerProfile | None = None) -> GenConfig:
    """A GenConfig from plain values: `types` is None (all 15), a comma list, a sequence of
    names (round-robin) or a {name: weight} mapping (cases drawn with those weights)."""
    weights = None
    if isinstance(types, Mapping):
        weights = tuple((str(t), float(w)) for t, w in types.items())
        for t, _ in weights:
            if t not in LESION_TYPE_NAMES:
                raise SynthInputError(f"types: unknown lesion type '{t}'")
        if not any(w > 0 for _, w in weights):
            raise SynthInputError("types: no lesion type has a positive weight")
        names = tuple(t for t, w in weights if w > 0)
    elif types is None or isinstance(types, str):
        names = parse_types(types)
    else:
        names = parse_types(",".join(types))
    return GenConfig(size=parse_size(size), spacing=spacing, types=names, phase=check_phase(phase),
                     seed=int(seed), type_weights=weights, scanner=scanner)


def generate_dataset(out: str | Path, n: int, cfg: GenConfig | None = None, *, workers: int = 1,
                     progress: bool = True, **settings) -> list[dict]:
    """Generate cases 0..n-1 into `out`; complete cases already there are kept.

    Give a `GenConfig`, or its settings as keywords (see `make_config`): seed, size,
    spacing, types, phase, scanner.
    """
    if cfg is None:
        cfg = make_config(**settings)
    elif settings:
        raise TypeError("give a GenConfig or settings, not both")
    out = Path(out)
    if n < 1:
        raise SynthInputError(f"--n {n}: must be at least 1")
    if workers < 1:
        raise SynthInputError(f"--workers {workers}: must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"generator": GENERATOR_VERSION, "source": "phantom", **cfg.to_json()}
    check_run_settings(out, settings)
    remove_partials(out)
    rows: dict[int, dict] = {}
    todo = []
    for i in range(n):
        d = case_dir(out, cfg.lesion_type(i), f"{i:06d}")
        if is_complete(d):
            meta = json.loads((d / "type.json").read_text(encoding="utf-8"))
            rows[i] = manifest_row(meta, d.relative_to(out).as_posix())
        else:
            todo.append(i)
    # nothing to generate (a resumed run): no bar that only says "100%"
    bar = tqdm(total=n, initial=n - len(todo), desc="synth", unit="case", disable=not progress or not todo,
               file=sys.stderr, dynamic_ncols=True)
    try:
        jobs = [(str(out), cfg.seed, i, cfg) for i in todo]
        if workers == 1 or len(todo) <= 1:
            warm_up()
            for job in jobs:
                row = _work(job)
                rows[row["index"]] = row
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_context(),
                                     initializer=warm_up) as ex:
                futures = [ex.submit(_work, job) for job in jobs]
                for fut in as_completed(futures):
                    row = fut.result()
                    rows[row["index"]] = row
                    bar.update()
    finally:
        bar.close()
        if rows:
            write_manifest(out, list(rows.values()))
    return [rows[i] for i in sorted(rows)]
