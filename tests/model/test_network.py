"""PastaNet: released key layout, shapes, heads under DP, and the tiny training step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from pasta_model.heads import (
    DETECT_OUTPUTS,
    REPORT_OUTPUTS,
    TASKS,
    ClassHead,
    SegmentHead,
    build_head,
    split_report_logits,
)
from pasta_model.network import PastaNet, build_model, centre_pool, head_input, head_keys
from pasta_model.presets import get_preset, load_presets
from synth.vocabulary import HOST_ORGANS, LESION_TYPE_NAMES, T_STAGES

REFERENCE = Path(__file__).resolve().parents[1] / "data"   # the release's key lists, copied (see test_released.py)
SEG_KEYS = REFERENCE / "pasta_keys_seg.json"
PAPER_BACKBONE_PARAMS = 240_262_080


@pytest.fixture(scope="module")
def tiny() -> PastaNet:
    torch.manual_seed(0)
    return build_model("tiny")


def test_presets_have_the_agreed_values():
    expect = {"tiny": (8, 64, 4, 3.0, 48, 48), "small": (16, 256, 4, 2.0, 64, 64),
              "base": (32, 512, 5, 1.5, 96, 128), "paper": (64, 1024, 5, 1.0, 96, 128)}
    for name, values in expect.items():
        p = get_preset(name)
        assert (p.base_features, p.max_features, p.num_pools, p.spacing_mm, p.crop_size,
                p.detect_crop_size) == values
    assert get_preset("tiny").head_hidden == (64, 32)
    assert get_preset("paper").head_hidden == (512, 256)


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ValueError, match=r"'huge'.*tiny, small, base, paper"):
        get_preset("huge")


def test_bad_preset_file_names_the_key(tmp_path):
    bad = tmp_path / "presets.yaml"
    bad.write_text("tiny:\n  base_features: 8\n  max_features: 64\n  num_pools: 4\n  spacing_mm: 3.0\n"
                   "  crop_size: 48\n  detect_crop_size: 48\n  head_hidden: [64]\n  dropout: 0.1\n")
    with pytest.raises(ValueError, match="dropout"):
        load_presets(bad)


def test_paper_backbone_has_exactly_the_released_keys_and_shapes():
    with torch.device("meta"):  # shapes only: no 1 GB allocation
        net = PastaNet(get_preset("paper"), ())
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    released = {k: shape for k, shape, dtype in json.loads(SEG_KEYS.read_text())
                if not k.startswith("seg_outputs.")}
    assert ours == released
    assert sum(p.numel() for p in net.parameters()) == PAPER_BACKBONE_PARAMS
    assert not list(net.buffers())


def test_outputs_have_the_shapes_of_the_vocabularies(tiny):
    x = torch.randn(2, 1, 32, 48, 64)
    with torch.no_grad():
        out = tiny(x)
    assert list(out) == list(TASKS)
    assert out["segment"].shape == (2, 2, 32, 48, 64)
    assert out["detect"].shape == (2, 1 + len(HOST_ORGANS)) and DETECT_OUTPUTS[0] == "any"
    assert out["stage"].shape == (2, len(T_STAGES))
    assert out["survival"].shape == (2, 1)
    parts = split_report_logits(out["report"])
    assert list(parts) == ["shape", "density", "heterogeneity", "surface", "invasion", "lesion_type"]
    assert [p.shape[1] for p in parts.values()] == [4, 3, 2, 2, 2, len(LESION_TYPE_NAMES)]
    assert torch.equal(torch.cat(list(parts.values()), 1), out["report"])


def test_encoder_only_pools_the_deepest_encoder_stage(tiny):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        enc = tiny.encode(x, decode=False)
        full = tiny.encode(x)
        deepest = x
        for stage in tiny.conv_blocks_context[:-1]:
            deepest = stage(deepest)
    assert enc.decoder is None
    assert enc.pooled.shape == (1, get_preset("tiny").deep_features)
    assert deepest.shape[2:] == (4, 4, 4)                 # 32 / 2**3: pooled over the central 2^3
    assert torch.allclose(enc.pooled, deepest[:, :, 1:3, 1:3, 1:3].mean(dim=(2, 3, 4)))
    assert torch.allclose(enc.pooled, full.pooled)
    assert full.decoder.shape == (1, 8, 32, 32, 32)
    with pytest.raises(ValueError, match="decode=True"):
        head_input("segment", enc)
    assert head_input("stage", enc) is enc.pooled


@pytest.mark.parametrize("n,window", [(2, (0, 2)), (3, (1, 2)), (4, (1, 3)), (6, (2, 4)), (8, (2, 6))])
def test_centre_pool_averages_the_central_third(n, window):
    x = torch.zeros(1, 1, n, n, n)
    a, b = window
    x[:, :, a:b, a:b, a:b] = 1.0
    assert float(centre_pool(x)) == 1.0                  # exactly the window, nothing outside it
    x[:, :, a:b, a:b, a:b] = 0.0
    assert float(centre_pool(x)) == 0.0


def test_pooled_features_of_lesion_crops_differ_between_cases(tiny):
    """Why the pool is central: after InstanceNorm a global average is almost the same
    vector for every crop (heads then learn nothing); the centre follows the input."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 32, 32, 32) * 0.2
    x[:4, :, 12:20, 12:20, 12:20] += 0.8                  # a bright "lesion" in the centre of half the crops
    with torch.no_grad():
        deepest = x
        for stage in tiny.conv_blocks_context[:-1]:
            deepest = stage(deepest)
        central = tiny.encode(x, decode=False).pooled
    global_mean = deepest.mean(dim=(2, 3, 4))
    spread = lambda f: float((f.std(0) / (f.mean(0).abs() + 1e-8)).median())  # noqa: E731
    assert spread(central) > 5 * spread(global_mean)


def test_indivisible_input_is_refused_with_the_divisor(tiny):
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny.encode(torch.randn(1, 1, 40, 32, 32))


def test_forward_subset_and_unknown_task(tiny):
    with torch.no_grad():
        out = tiny(torch.randn(1, 1, 16, 16, 16), tasks=["stage"])
    assert list(out) == ["stage"]
    net = build_model("tiny", ["stage"])
    with pytest.raises(ValueError, match="no head for task"):
        net(torch.randn(1, 1, 16, 16, 16), tasks=["segment"])
    with pytest.raises(ValueError, match="unknown task"):
        build_model("tiny", ["staging"])


def test_heads_are_exactly_the_keys_under_heads(tiny):
    sd = tiny.state_dict()
    all_heads = head_keys(tiny)
    assert all_heads and all(k.startswith("heads.") for k in all_heads)
    assert set(all_heads) == {k for k in sd if k.startswith("heads.")}
    per_task = [head_keys(sd, t) for t in TASKS]
    assert sorted(sum(per_task, [])) == sorted(all_heads)
    backbone = {n for n, _ in tiny.backbone_named_parameters()}
    assert backbone.isdisjoint(all_heads) and backbone | set(all_heads) == set(sd)


def test_freeze_backbone_leaves_only_heads_trainable():
    net = build_model("tiny")
    net.freeze_backbone()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == set(head_keys(net))


@pytest.mark.parametrize("task", TASKS)
def test_heads_pass_opacus_validation_and_give_per_sample_grads(task):
    preset = get_preset("tiny")
    head = build_head(task, preset)
    assert ModuleValidator.validate(head, strict=False) == []
    gsm = GradSampleModule(head, loss_reduction="sum")
    batch = 3
    if task == "segment":
        x = torch.randn(batch, preset.base_features, 8, 8, 8)
    else:
        x = torch.randn(batch, preset.deep_features)
    gsm(x.requires_grad_(False)).sum().backward()
    for p in head.parameters():
        assert p.grad_sample.shape == (batch, *p.shape)
    # per-sample grads sum to the batch grad, and the first equals a batch of one
    grad_sample = {n: p.grad_sample.clone() for n, p in head.named_parameters()}
    for p in head.parameters():
        assert torch.allclose(p.grad_sample.sum(0), p.grad, atol=1e-5)
    head.zero_grad()
    head(x[:1]).sum().backward()
    for n, p in head.named_parameters():
        assert torch.allclose(grad_sample[n][0], p.grad, atol=1e-5)


def test_head_types_and_sizes():
    paper = get_preset("paper")
    report = build_head("report", paper)
    assert isinstance(report, ClassHead)
    assert [m.out_features for m in report.mlp if isinstance(m, torch.nn.Linear)] == [
        512, 256, sum(REPORT_OUTPUTS.values())]
    assert isinstance(build_head("segment", paper), SegmentHead)
