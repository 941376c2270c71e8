"""The empirical privacy audit (issue 13): its bound against the paper, its power, its validity.

Power: with the noise switched off, or with one noise vector reused across replays (the
bug of issue 12), the audit must find a leak. Validity: with DP on, at epsilon 1, 4 and 8,
its lower bound must stay under the ledger's epsilon. Everything runs the site's own
SiteAgent.train with real Opacus on a real hospital folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from hospital_factory import write_hospital, write_pretrained
from scipy import stats

from client.privacy.empirical_audit import CONSISTENT, LEAKS, audit_head, canary_inputs, combined_updates, run_audit
from client.privacy.one_run_bound import epsilon_lower_bound, one_run_p_value
from client.site_config import SiteConfigError, load_site_config
from client.task import SiteAgent
from pasta_model.checkpoint import read_meta
from simulation.cli import build_parser, main


# ----------------------------------------------------------------------------- the bound
def test_bound_reproduces_the_papers_printed_examples():
    """arXiv:2305.08846 Appendix D (m=1000, r=100, v=75, delta=1e-4: 0.673) and section 7
    (m=100000, r=1510, v=1439, delta=1e-5: 2.675, printed truncated), both at 95 %."""
    assert epsilon_lower_bound(1000, 100, 75, 1e-4, 0.95) == pytest.approx(0.673, abs=5e-4)
    assert 2.675 <= epsilon_lower_bound(100000, 1510, 1439, 1e-5, 0.95) < 2.676


def test_bound_without_delta_is_the_exact_binomial_tail():
    """delta = 0 and every guess right: q^r = 1 - confidence in closed form, q = e^eps / (1 + e^eps)."""
    for r in (20, 100, 700):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    # with errors: the bound's p-value is the binomial tail, at the 5 % level exactly
    eps = epsilon_lower_bound(500, 200, 170, 0.0, 0.95)
    assert stats.binom.sf(169, 200, 1 / (1 + math.exp(-eps))) == pytest.approx(0.05, rel=1e-5)


def test_delta_term_weakens_the_bound_as_the_theorem_says():
    eps = 2.0
    plain, with_delta = one_run_p_value(1000, 300, 250, eps, 0.0), one_run_p_value(1000, 300, 250, eps, 1e-5)
    q = 1 / (1 + math.exp(-eps))
    alpha = max(sum(stats.binom.pmf(250 - j, 300, q) for j in range(1, i + 1)) / i for i in range(1, 251))
    assert with_delta == pytest.approx(plain + 2 * 1000 * 1e-5 * alpha, rel=1e-9)
    assert epsilon_lower_bound(1000, 300, 250, 1e-3) < epsilon_lower_bound(1000, 300, 250, 0.0)
    assert epsilon_lower_bound(1000, 300, 150, 1e-5) == 0.0            # chance accuracy proves nothing
    with pytest.raises(ValueError, match="v <= r <= m"):
        one_run_p_value(10, 5, 6, 1.0, 1e-5)


# ----------------------------------------------------------------------------- a real site
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    pre = write_pretrained(root / "pretrained.ckpt")
    yaml_path = write_hospital(root, "audited", 16, seed=5, epsilon=1.0, backbone=pre)
    return load_site_config(yaml_path)


def _with_epsilon(config, epsilon: float):
    return dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, max_epsilon=epsilon))


def _site_ledger_untouched(config) -> bool:
    state = config.state_dir
    return not (state / "privacy").exists() and not (state / "audit").exists()


def test_canaries_are_near_dirac_gradients_of_the_audit_head(site):
    """Inverting the audit head's frozen layers gives the asked-for hidden activation; the site's
    real patients map to (almost) zero there, so their gradients stay in the bias."""
    agent = SiteAgent(site)
    sha = read_meta(site.backbone).backbone_sha256
    head = audit_head(agent.model(sha).heads["report"])
    frozen = head.mlp[:-1]
    target = torch.zeros(3, 32)
    target[0, 0], target[1, 31], target[2, 5] = 30.0, -30.0, 7.5
    with torch.no_grad():
        assert torch.allclose(frozen(canary_inputs(head, target)), target, atol=1e-3)
        natural = frozen(agent.task_data(sha, "report").train.inputs.float())
    assert natural.abs().max() < 1e-3


def test_dp_off_is_caught_far_above_the_claim(site):
    """Noise forced to zero (test switch) while the ledger charges epsilon 1: the bound is above 4."""
    result = run_audit(site, canaries=700, seed=0, _noise_scale=0.0)
    assert result.claimed_epsilon <= 1.0
    assert result.epsilon_lower_bound > 4.0
    assert result.verdict == LEAKS and result.correct == result.guesses
    assert _site_ledger_untouched(site)


def test_reused_noise_across_replays_is_detected(site):
    """The bug of issue 12 (one noise vector for every attempt, under a re-planned sigma) comes back
    through SiteAgent(noise_seed=...): two replies cancel the noise and the audit sees it."""
    buggy = run_audit(site, canaries=700, releases=2, seed=1, _noise_seed=1234)
    assert buggy.noise_multipliers[0] < buggy.noise_multipliers[1]      # the second attempt is re-planned
    assert buggy.statistic == "shared-noise regression"
    assert buggy.epsilon_lower_bound > 2 * buggy.claimed_epsilon and buggy.leaks
    fresh = run_audit(site, canaries=700, releases=2, seed=1)           # the site as deployed: fresh noise
    assert fresh.epsilon_lower_bound <= fresh.claimed_epsilon and fresh.verdict == CONSISTENT
    assert _site_ledger_untouched(site)


@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_dp_on_never_exceeds_the_ledgers_epsilon(site, epsilon):
    """Repeated seeds (membership and noise both fixed per seed, so the test repeats exactly)."""
    config = _with_epsilon(site, epsilon)
    bounds = []
    for seed in range(3):
        result = run_audit(config, canaries=1000, seed=seed, _noise_seed=seed)
        assert epsilon - 0.1 <= result.claimed_epsilon <= epsilon
        assert result.epsilon_lower_bound <= result.claimed_epsilon, result.summary()
        assert result.verdict == CONSISTENT
        bounds.append(result.epsilon_lower_bound)
    if epsilon == 8.0:
        assert min(bounds) > 0.5     # the attack still sees the canaries through the noise


def test_combinations_cancel_a_shared_noise_vector():
    rng = np.random.default_rng(0)
    signal, noise = rng.standard_normal(50), rng.standard_normal(50)
    stats_ = combined_updates([signal + 2.0 * noise, signal + 5.0 * noise], [2.0, 5.0])
    assert np.allclose(stats_["shared-noise regression"], signal)
    assert not np.allclose(stats_["independent-noise mean"], signal)
    assert set(combined_updates([signal, signal], [3.0, 3.0])) == {"independent-noise mean"}


# ----------------------------------------------------------------------------- the command
def test_cli_writes_result_json_and_score_plot(site, tmp_path, capsys):
    out = tmp_path / "audit.json"
    rc = main(["privacy", "audit", "--config", str(site.source), "--canaries", "300", "--seed", "3",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verdict: consistent with the claim" in printed
    result = json.loads(out.read_text())
    assert result["canaries"] == 300 and result["verdict"] == CONSISTENT
    assert result["epsilon_lower_bound"] <= result["claimed_epsilon"] <= 1.0
    assert 0 < result["correct"] <= result["guesses"] <= 300
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert _site_ledger_untouched(site)


def test_cli_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "hospital.yaml"
    bad.write_text("site: x\n")
    assert main(["privacy", "audit", "--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_test_switches_are_not_reachable_from_cli_or_yaml(site, tmp_path):
    parser = build_parser()
    for flag in (["--noise-scale", "0"], ["--noise-seed", "1"], ["--_noise_scale", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["privacy", "audit", "--config", str(site.source), *flag])
    raw = yaml.safe_load(site.source.read_text())
    raw["privacy"]["noise_scale"] = 0.0
    edited = tmp_path / "hospital.yaml"
    edited.write_text(yaml.safe_dump(raw))
    with pytest.raises(SiteConfigError, match="noise_scale"):
        load_site_config(edited)


# ----------------------------------------------------------------------------- the simulation report
def test_simulation_report_gains_the_audit_of_one_site(site, tmp_path):
    from simulation.config import SimulationConfig
    from simulation.hospitals import SiteFiles, make_profiles
    from simulation.report import audit_section
    from simulation.runner import audit_one_site

    # as in a simulation: no backbone in the YAML, the coordinator's one installed in the state dir
    sha = read_meta(site.backbone).backbone_sha256
    installed = site.state_dir / "backbones" / f"{sha}.safetensors"
    installed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(site.backbone, installed)
    raw = yaml.safe_load(site.source.read_text())
    del raw["backbone"]
    (tmp_path / "hospital.yaml").write_text(yaml.safe_dump(raw))
    profile = dataclasses.replace(make_profiles(2, 0, 8, 16, 5)[0], name=site.site)
    files = SiteFiles(profile, tmp_path / "hospital.yaml", tmp_path / "hospital.yaml", 16)
    cfg = SimulationConfig(task="report", audit_canaries=300)
    assert SimulationConfig().audit is True          # on by default: it takes seconds, not minutes
    audit = audit_one_site(cfg, files, site.backbone, tmp_path)
    assert audit["verdict"] == CONSISTENT and audit["canaries"] == 300
    assert json.loads((tmp_path / "privacy-audit.json").read_text())["correct"] == audit["correct"]
    assert (tmp_path / "plots" / "privacy-audit.png").stat().st_size > 5000
    text = "\n".join(audit_section(audit))
    assert f"| {site.site} | 300 | {audit['correct']} of {audit['guesses']} | 95% |" in text
    assert "plots/privacy-audit.png" in text and "lower bound, not a proof" in text
    skipped = audit_one_site(dataclasses.replace(cfg, task="segment"), files, site.backbone, tmp_path)
    assert "segment cannot be audited" in "\n".join(audit_section(skipped))
    assert "Not run" in "\n".join(audit_section(None))
    assert _site_ledger_untouched(site)
