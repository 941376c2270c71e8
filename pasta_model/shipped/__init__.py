"""The pretrained checkpoint shipped inside the package, its model card, and `ship` (how one is made).

`pasta_model/shipped/` holds `pasta-tiny.safetensors` (a pasta-fed checkpoint stored in
float16: loaded, it is a float32 model like any other), `model_card.json` (data, command,
device, minutes, held-out figures, the file's SHA-256) and `MODEL_CARD.md`, the card's
text rendered from the JSON. `predict`, `evaluate` and `simulate` use it when no
checkpoint is given.

`ship_checkpoint(source, card)` writes all three from any checkpoint: it converts to
float16, reloads the converted file into the same preset and tasks, checks that its
outputs stay within fp16 tolerance of the source's, and only then renames the files into
place (each through `synth.atomic.atomic_path`; all three are fsynced before the first
rename, and the card records the checkpoint's SHA-256, so a card that no longer matches
its checkpoint is detectable: `model info` says so).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(__file__).resolve().parent
SHIPPED_NAME = "pasta-tiny"
SHIPPED_FILE = f"{SHIPPED_NAME}.safetensors"
SHIPPED_PRESET = "tiny"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
MAX_BYTES = 8 * 1024 * 1024
# |shipped - source| <= ATOL + RTOL * max|source| for every output of the check input
RTOL, ATOL = 1e-2, 1e-3
CARD_REQUIRED = ("status", "data", "command", "device", "minutes")
# the held-out figures `model info` shows first (then the rest, in the card's order)
HEADLINE = ("cases", "dice", "crop_dice", "detect_auc", "acc_lesion_type", "majority_lesion_type",
            "stage_acc", "c_index")


class ShippedModelMissing(FileNotFoundError):
    """This installation has no shipped checkpoint (a FileNotFoundError: the CLIs report it as one line)."""


class ShipError(ValueError):
    """A checkpoint or card that cannot be shipped."""


def shipped_dir() -> Path:
    return SHIPPED_DIR


def shipped_checkpoint() -> Path:
    """The shipped checkpoint's path; `ShippedModelMissing` names it when the file is absent."""
    path = shipped_dir() / SHIPPED_FILE
    if not path.is_file():
        raise ShippedModelMissing(
            f"the shipped model {path} is missing from this installation of pasta-fed "
            f"(reinstall the package, or pass --checkpoint CKPT)")
    return path


def shipped_card() -> dict | None:
    """The shipped model card (model_card.json), or None when there is none."""
    path = shipped_dir() / CARD_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the card's text -------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _data_line(data: dict) -> str:
    rest = {k: v for k, v in data.items() if k not in ("count", "seed")}
    extra = "".join(f", {k} {_fmt(v)}" for k, v in rest.items())
    return f"{data.get('count')} cases, seed {data.get('seed')}{extra}"


def card_summary(card: dict) -> list[str]:
    """The card in a few lines (for `model info`)."""
    lines = [f"status:   {card.get('status')}",
             f"data:     {_data_line(card.get('data') or {})}",
             f"trained:  {card.get('minutes')} min on {card.get('device')}: {card.get('command')}"]
    figures = (card.get("heldout") or {}).get("figures") or {}
    if figures:
        order = [k for k in HEADLINE if k in figures] + [k for k in figures if k not in HEADLINE]
        shown = ", ".join(f"{k} {_fmt(figures[k])}" for k in order[:8])
        more = f" (+{len(figures) - 8} more in the card)" if len(figures) > 8 else ""
        lines.append(f"held-out: {shown}{more}")
    return lines


def render_card(card: dict) -> str:
    """MODEL_CARD.md from model_card.json."""
    f, m, src = card.get("file", {}), card.get("model", {}), card.get("source", {})
    heldout = card.get("heldout") or {}
    out = [f"# {card.get('name', SHIPPED_NAME)}: the pretrained PASTA shipped with pasta-fed", "",
           "Generated from `model_card.json` by `pasta-fed model ship`; edit the JSON, not this file.", "",
           f"**Status: {card.get('status')}**", "",
           "| | |", "|---|---|",
           f"| file | `{f.get('name')}` ({f.get('bytes', 0) / 1e6:.2f} MB, {f.get('dtype')}) |",
           f"| file SHA-256 | `{f.get('sha256')}` |",
           f"| preset | {m.get('preset')} |",
           f"| tasks | {', '.join(m.get('tasks', []))} |",
           f"| parameters | {m.get('parameters', 0):,} |",
           f"| backbone SHA-256 | `{m.get('backbone_sha256')}` |",
           f"| package version | {card.get('package_version')} |",
           f"| shipped | {card.get('shipped')} |",
           "", "## Training", "",
           f"- data: {_data_line(card.get('data') or {})}",
           f"- command: `{card.get('command')}`",
           f"- device: {card.get('device')}",
           f"- minutes: {card.get('minutes')}",
           f"- source checkpoint: `{src.get('checkpoint')}` (SHA-256 `{src.get('sha256')}`)",
           "", "## Held-out figures", ""]
    if heldout.get("data") is not None:
        out += [f"Data: {_fmt(heldout['data'])}", ""]
    figures = heldout.get("figures") or {}
    if figures:
        out += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in figures.items()]
    else:
        out.append("None recorded.")
    if heldout.get("table"):
        out += ["", "```", *heldout["table"], "```"]
    rt = card.get("round_trip") or {}
    out += ["", "## fp16 round trip", "",
            f"The float16 file, loaded back as float32, gives outputs within {rt.get('max_abs_diff')} "
            f"(allowed {rt.get('allowed')}) of the source checkpoint's on the check input."]
    if card.get("notes"):
        out += ["", "## Notes", "", str(card["notes"])]
    return "\n".join(out) + "\n"


# -- shipping ----------------------------------------------------------------------------------
def _check_card(card: Any, where: str, need_heldout: bool) -> dict:
    if not isinstance(card, dict):
        raise ShipError(f"{where}: the card must be a JSON object")
    missing = [k for k in CARD_REQUIRED + (("heldout",) if need_heldout else ()) if k not in card]
    if missing:
        raise ShipError(f"{where}: card lacks key(s) {missing} (required: {list(CARD_REQUIRED)} and heldout, "
                        "unless --evaluate computes it)")
    data = card["data"]
    if not isinstance(data, dict) or not {"seed", "count"} <= set(data):
        raise ShipError(f"{where}: data must be an object with at least 'seed' and 'count'")
    if not isinstance(card["minutes"], (int, float)) or isinstance(card["minutes"], bool):
        raise ShipError(f"{where}: minutes must be a number, got {card['minutes']!r}")
    if need_heldout and not isinstance(card["heldout"], dict):
        raise ShipError(f"{where}: heldout must be an object (e.g. {{\"data\": ..., \"figures\": {{...}}}})")
    return card


def check_input(preset, seed: int = 0):
    """A fixed smooth test volume [1, 1, crop, crop, crop] in [0, 1] for the round-trip check."""
    import torch
    g = torch.Generator().manual_seed(seed)
    n = preset.crop_size
    m = max(n // 4, 2)
    x = torch.rand((1, 1, m, m, m), generator=g)
    return torch.nn.functional.interpolate(x, size=(n, n, n), mode="trilinear", align_corners=False)


def output_difference(reference, candidate, seed: int = 0) -> tuple[float, float]:
    """(max |candidate - reference| over every output, allowed difference) on `check_input`."""
    import torch
    x = check_input(reference.preset, seed)
    reference.eval()
    candidate.eval()
    with torch.no_grad():
        a = reference(x, tasks=list(reference.tasks))
        b = candidate(x, tasks=list(reference.tasks))
    diff = max(float((b[t].float() - a[t].float()).abs().max()) for t in a)
    scale = max(float(a[t].float().abs().max()) for t in a)
    return diff, ATOL + RTOL * scale


def _heldout_from_evaluate(ckpt: Path, data_dir: Path, cases: int | None, device: str) -> dict:
    from pasta_model.evaluate import evaluate, format_table
    result = evaluate(ckpt, data_dir, device=device, max_cases=cases)
    figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    data: dict[str, Any] = {"path": str(data_dir)}
    try:   # the generator's own record of the held-out set (seed, size), when it is synthetic
        synth = json.loads((data_dir / "synth.json").read_text(encoding="utf-8"))
        data.update({k: synth[k] for k in ("generator", "seed", "size", "spacing") if k in synth})
    except (OSError, ValueError):
        pass
    data["cases"] = result.get("cases")
    return {"data": data, "figures": figures, "table": format_table(result).splitlines()}


def ship_checkpoint(source: str | os.PathLike, card: dict, out_dir: str | os.PathLike | None = None, *,
                    evaluate_data: str | os.PathLike | None = None, evaluate_cases: int | None = None,
                    device: str = "cpu", card_source: str = "card") -> dict:
    """Write `pasta-tiny.safetensors` (fp16), `model_card.json` and `MODEL_CARD.md` into `out_dir`
    (default: this package's folder) from the checkpoint `source` and the card's own keys
    (status, data {seed, count, ...}, command, device, minutes, heldout unless `evaluate_data`
    is given: then held-out figures are those of the fp16 file on that dataset). Returns the card."""
    import torch

    from synth.atomic import atomic_path

    from ..checkpoint import load_checkpoint, package_version, read_meta, save_checkpoint

    source = Path(source)
    out_dir = Path(out_dir) if out_dir is not None else shipped_dir()
    card = dict(_check_card(card, card_source, need_heldout=evaluate_data is None))
    model, meta = load_checkpoint(source)
    if meta.preset != SHIPPED_PRESET:
        raise ShipError(f"{source}: preset {meta.preset!r}; the shipped model {SHIPPED_FILE} is preset "
                        f"{SHIPPED_PRESET!r}")
    extra = {**meta.extra, "shipped_from": source.name, "storage_dtype": "float16"}
    target = out_dir / SHIPPED_FILE
    with atomic_path(target) as tmp:
        save_checkpoint(tmp, model, extra=extra, storage_dtype=torch.float16)
        shipped, shipped_meta = load_checkpoint(tmp)
        if (shipped_meta.preset, shipped_meta.tasks) != (meta.preset, meta.tasks):
            raise ShipError(f"{source}: the fp16 file reloads as preset {shipped_meta.preset} tasks "
                            f"{shipped_meta.tasks}, not {meta.preset} {meta.tasks}")
        if set(shipped.state_dict()) != set(model.state_dict()):
            raise ShipError(f"{source}: the fp16 file reloads with other tensors than the source")
        if any(p.dtype != torch.float32 for p in shipped.parameters()):
            raise ShipError(f"{source}: the fp16 file does not reload as a float32 model")
        diff, allowed = output_difference(model, shipped)
        if not diff <= allowed:
            raise ShipError(f"{source}: fp16 outputs differ by {diff:.3g} from the source's (allowed {allowed:.3g})")
        size = tmp.stat().st_size
        if size > MAX_BYTES:
            raise ShipError(f"{source}: the fp16 file is {size / 1e6:.1f} MB, over the {MAX_BYTES / 2**20:.0f} MiB "
                            "a shipped model may take")
        if evaluate_data is not None:
            card["heldout"] = _heldout_from_evaluate(tmp, Path(evaluate_data), evaluate_cases, device)
        n_params = sum(p.numel() for p in shipped.parameters())
        card.update({
            "name": SHIPPED_NAME,
            "file": {"name": SHIPPED_FILE, "sha256": file_sha256(tmp), "bytes": size, "dtype": "float16"},
            "model": {"preset": shipped_meta.preset, "tasks": shipped_meta.tasks, "parameters": n_params,
                      "backbone_sha256": read_meta(tmp).backbone_sha256},
            "source": {"checkpoint": str(source), "sha256": file_sha256(source)},
            "round_trip": {"max_abs_diff": float(f"{diff:.3g}"), "allowed": float(f"{allowed:.3g}")},
            "package_version": package_version(),
            "shipped": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        })
        with atomic_path(out_dir / CARD_JSON) as tmp_json, atomic_path(out_dir / CARD_MD) as tmp_md:
            tmp_json.write_text(json.dumps(card, indent=2, sort_keys=False, allow_nan=True) + "\n",
                                encoding="utf-8")
            tmp_md.write_text(render_card(card), encoding="utf-8")
    return card


__all__ = ["SHIPPED_FILE", "SHIPPED_PRESET", "MAX_BYTES", "ShippedModelMissing", "ShipError", "shipped_dir",
           "shipped_checkpoint", "shipped_card", "card_summary", "render_card", "ship_checkpoint", "file_sha256"]
