"""`pasta-fed client ledger` shows one delta: its header and every row agree."""
from __future__ import annotations

import json

import pytest

from client.privacy.ledger import PrivacyLedger, make_accountant, merge_history
from simulation.cli import main


def _site(tmp_path, delta: str) -> str:
    (tmp_path / "ct").mkdir()
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"site: hospital-a\ndata:\n  images: ct\nprivacy:\n  max_epsilon: 8\n  delta: {delta}\n"
                   f"  max_grad_norm: 1.0\nstate_dir: state\n")
    return str(cfg)


def _charge(ledger: PrivacyLedger, rounds: list[tuple[float, float, int]], delta: float) -> None:
    history: list = []
    for i, (sigma, q, steps) in enumerate(rounds, start=1):
        res = ledger.reserve(run_id="run", round=i, noise_multiplier=sigma, sample_rate=q, steps=steps,
                             max_epsilon=8.0, delta=delta)
        history = merge_history(history, sigma, q, steps)
        ledger.commit(res, make_accountant(ledger.mechanism, history))


def test_rounds_charged_at_the_coordinators_stricter_delta_are_shown_at_it(tmp_path, capsys):
    """The site allows 1e-3; the coordinator's rounds were charged at 1e-5. Before, the header
    said '6.17 of 8 spent' at 1e-3 while the rows (and the next round's check) were at 1e-5."""
    config = _site(tmp_path, "1.0e-3")
    _charge(PrivacyLedger.open_site(tmp_path / "state"), [(1.2, 0.05, 100), (1.2, 0.05, 100)], delta=1e-5)
    assert main(["client", "ledger", "--config", config, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ledger = PrivacyLedger.open_site(tmp_path / "state")
    assert out["delta"] == 1e-5 and out["site_delta"] == 1e-3
    assert out["epsilon"] == pytest.approx(ledger.epsilon(1e-5)) and out["epsilon"] > ledger.epsilon(1e-3)
    assert out["history"][-1]["epsilon_after"] == pytest.approx(out["epsilon"])
    assert all(row["charged_delta"] == 1e-5 for row in out["history"])

    assert main(["client", "ledger", "--config", config]) == 0
    text = capsys.readouterr().out
    assert f"epsilon spent {out['epsilon']:.4f} of 8 (remaining {8 - out['epsilon']:.4f}) at delta 1e-05" in text
    assert "the coordinator's, stricter than this site's 0.001" in text
    assert f"{out['history'][-1]['epsilon_after']:>9.4f}  committed" in text


def test_without_a_stricter_charge_the_sites_own_delta_is_shown(tmp_path, capsys):
    config = _site(tmp_path, "1.0e-5")
    _charge(PrivacyLedger.open_site(tmp_path / "state"), [(1.2, 0.05, 100)], delta=1e-5)
    assert main(["client", "ledger", "--config", config]) == 0
    assert "delta 1e-05: this site's privacy.delta" in capsys.readouterr().out
