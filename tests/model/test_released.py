"""Importing released PASTA weights: containers, prefixes, variants, refusals, CLI."""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from pasta_model.checkpoint import load_checkpoint
from pasta_model.cli_model import register_model
from pasta_model.presets import get_preset
from pasta_model.released import ReleasedImportError, import_released, released_layout

# The released files' key lists (name, shape, dtype), copied from the PASTA release so the
# tests that check our layout against them always run.
REFERENCE = Path(__file__).resolve().parents[1] / "data"


def released_state(preset: str, variant: str = "segmentation", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights with exactly the released keys and shapes for `preset`.

    Built from `released_layout`, which `test_paper_layout_is_the_released_layout` holds to the
    release's own key lists at full size; the smaller presets scale the same layout.
    """
    gen = torch.Generator().manual_seed(seed)
    num_classes = 2 if variant == "segmentation" else 1
    return {k: torch.randn(shape, generator=gen) for k, shape in
            released_layout(preset, variant, num_classes).items()}


def wrap(state: dict, container: str, prefix: str = "") -> object:
    state = {prefix + k: v for k, v in state.items()}
    if container == "bare":
        return state
    return {container: state, "epoch": 1000, "note": "fields beside the weights are ignored"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pasta-fed")
    register_model(parser.add_subparsers(dest="command", required=True))
    return parser


def run_cli(*argv: str) -> int:
    args = make_parser().parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("container", ["network_weights", "state_dict", "bare"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_three_containers_and_prefixes_load_every_backbone_tensor(tmp_path, container, prefix):
    state = released_state("tiny")
    path = tmp_path / "PASTA_final.pth"
    torch.save(wrap(state, container, prefix), path)
    model, summary = import_released(path)
    assert summary.container == container and summary.preset == "tiny"
    assert summary.variant == "segmentation" and summary.ok
    assert not summary.missing and not summary.unexpected and not summary.shape_mismatched
    assert sorted(summary.skipped) == sorted(k for k in state if k.startswith("seg_outputs."))
    ours = model.state_dict()
    backbone = [k for k in ours if not k.startswith("heads.")]
    assert sorted(summary.matched) == sorted(backbone)
    for key in backbone:
        assert torch.equal(ours[key], state[key]), key


def test_preset_is_inferred_from_shapes(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(released_state("small"), path)
    model, summary = import_released(path)
    assert summary.preset == "small" and model.preset == get_preset("small")


def test_shape_mismatch_is_refused_naming_the_key(tmp_path):
    state = released_state("tiny")
    state["tu.1.weight"] = torch.randn(64, 16, 2, 2, 2)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ReleasedImportError, match=r"bad\.pth.*tu\.1\.weight"):
        import_released(path, preset="tiny")


def test_wrong_preset_is_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(released_state("tiny"), path)
    with pytest.raises(ReleasedImportError, match="wrong shape for preset 'small'"):
        import_released(path, preset="small")


def test_missing_decoder_key_of_a_segmentation_file_is_refused(tmp_path):
    state = released_state("tiny")
    del state["conv_blocks_localization.2.1.blocks.0.instnorm.bias"]
    path = tmp_path / "partial.pth"
    torch.save({"network_weights": state}, path)
    missing = r"missing.*conv_blocks_localization\.2\.1\.blocks\.0\.instnorm\.bias"
    with pytest.raises(ReleasedImportError, match=missing):
        import_released(path)


def test_unexpected_backbone_key_is_refused(tmp_path):
    state = released_state("tiny")
    state["conv_blocks_context.9.blocks.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ReleasedImportError, match=r"conv_blocks_context\.9"):
        import_released(path, preset="tiny")


def test_encoder_only_classification_file_imports_and_names_the_random_decoder(tmp_path):
    full = released_state("tiny", "classification")
    encoder = {k: v for k, v in full.items() if k.startswith(("head.",)) or
               any(k.startswith(f"conv_blocks_context.{i}.") for i in range(4))}
    path = tmp_path / "cls.pth"
    torch.save({"state_dict": encoder}, path)
    model, summary = import_released(path)
    assert summary.variant == "classification" and summary.encoder_only and summary.ok
    assert summary.missing and all(k.startswith(("tu.", "conv_blocks_localization.", "conv_blocks_context.4."))
                                   for k in summary.missing)
    assert sorted(summary.skipped) == sorted(k for k in encoder if k.startswith("head."))
    text = summary.render()
    assert "encoder-only" in text and "missing    tu.0.weight" in text
    assert torch.equal(model.state_dict()["conv_blocks_context.3.blocks.1.conv.weight"],
                       encoder["conv_blocks_context.3.blocks.1.conv.weight"])


def test_classification_file_missing_an_encoder_key_is_refused(tmp_path):
    state = released_state("tiny", "classification")
    del state["conv_blocks_context.2.blocks.0.conv.bias"]
    path = tmp_path / "cls_bad.pth"
    torch.save(state, path)
    with pytest.raises(ReleasedImportError, match=r"conv_blocks_context\.2\.blocks\.0\.conv\.bias"):
        import_released(path)


def test_file_that_needs_code_to_unpickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"network_weights": released_state("tiny"), "trap": Boom()}, path)
    with pytest.raises(ReleasedImportError, match=r"evil\.pth.*weights_only"):
        import_released(path)
    assert not marker.exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ReleasedImportError, match=r"junk\.pth"):
        import_released(junk)


def test_cli_import_then_info(tmp_path, capsys):
    src = tmp_path / "PASTA_final.pth"
    state = released_state("tiny")
    torch.save({"network_weights": {"module." + k: v for k, v in state.items()}}, src)
    out = tmp_path / "imported.safetensors"
    assert run_cli("model", "import", str(src), "--out", str(out), "--tasks", "segment,report") == 0
    printed = capsys.readouterr().out
    assert "matched:    76 backbone tensors" in printed and "missing:    0" in printed
    model, meta = load_checkpoint(out)
    assert meta.tasks == ["segment", "report"] and meta.extra["imported_from"] == "PASTA_final.pth"
    assert torch.equal(model.state_dict()["tu.0.weight"], state["tu.0.weight"])

    assert run_cli("model", "info", str(out), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"preset", "tasks", "parameters"}
    assert info["preset"] == "tiny" and info["tasks"] == ["segment", "report"]
    params = info["parameters"]
    assert params["backbone"] == sum(p.numel() for p in model.backbone_parameters())
    assert params["heads"] == {t: sum(p.numel() for p in model.heads[t].parameters()) for t in meta.tasks}
    assert params["total"] == sum(p.numel() for p in model.parameters())

    assert run_cli("model", "info", str(out)) == 0
    assert "preset:          tiny" in capsys.readouterr().out


def test_cli_import_of_a_bad_file_fails_with_one_clear_line(tmp_path, capsys):
    src = tmp_path / "broken.pth"
    src.write_bytes(b"not a checkpoint")
    assert run_cli("model", "import", str(src), "--out", str(tmp_path / "x.safetensors")) == 2
    err = capsys.readouterr().err
    assert err.startswith("pasta-fed model import: error: ") and "broken.pth" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant,container", [("seg", "network_weights"), ("cls", "state_dict")])
def test_full_size_released_layout_imports_into_paper(tmp_path, variant, container):
    """A ~1 GB float32 file with exactly the released keys (from the reference lists)."""
    entries = json.loads((REFERENCE / f"pasta_keys_{variant}.json").read_text())
    state = {"module." + k: torch.empty(shape, dtype=getattr(torch, dtype.split(".")[1])).normal_()
             for k, shape, dtype in entries}
    path = tmp_path / "PASTA_final.pth"
    torch.save(wrap(state, container), path)
    del state
    model, summary = import_released(path)
    assert summary.preset == "paper" and summary.container == container
    assert not summary.missing and not summary.unexpected and not summary.shape_mismatched
    assert len(summary.matched) == 93
    assert sum(p.numel() for p in model.backbone_parameters()) == 240_262_080


@pytest.mark.parametrize("variant,name,k", [("segmentation", "seg", 2), ("classification", "cls", 1)])
def test_paper_layout_is_the_released_layout(variant, name, k):
    """Our description of the released file (used to build test files) matches the reference lists."""
    reference = {key: tuple(shape) for key, shape, _ in
                 json.loads((REFERENCE / f"pasta_keys_{name}.json").read_text())}
    assert released_layout("paper", variant, k) == reference
