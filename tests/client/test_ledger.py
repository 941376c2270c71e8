"""Privacy ledger and noise planning: epsilon agrees with an independent accountant, survives restarts,
refuses rounds past the budget, and composes rounds with one accountant."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import pld
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from privacy_checks import dp_accounting_epsilon
from torch.utils.data import DataLoader, TensorDataset

from client.privacy.dp_trainer import private_round
from client.privacy.ledger import (
    BudgetExceeded,
    DuplicateRound,
    LedgerError,
    PrivacyLedger,
    epsilon_of,
    ledger_key,
    ledger_path,
)
from client.privacy.planning import noise_for_budget, plan_noise, poisson_schedule

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5
INTEGER_ORDERS = list(range(2, 64))
SHA = "ab" * 32


def dp_accounting_pld(history, delta) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
    return float(acc.get_epsilon(delta))


def _record(ledger, rounds, max_epsilon=100.0):
    for i, (sigma, q, steps) in enumerate(rounds, 1):
        ledger.record_round(run_id="run-1", round=i, noise_multiplier=sigma, sample_rate=q, steps=steps,
                            max_epsilon=max_epsilon, delta=DELTA, task="stage")


ROUNDS = [(1.0, 0.1, 30), (1.0, 0.1, 30), (1.3, 0.25, 40), (0.9, 0.05, 100)]


def test_ledger_epsilon_agrees_with_dp_accounting_after_reload(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, ledger_key(SHA))
    _record(ledger, ROUNDS)
    reloaded = PrivacyLedger.open(tmp_path, ledger_key(SHA))
    # the persisted history is Opacus' own (rounds with the same sigma and q merged)
    assert reloaded.history == [(1.0, 0.1, 60), (1.3, 0.25, 40), (0.9, 0.05, 100)]
    # same orders, integer: the two libraries' RDP agree to float precision
    ours = reloaded.accountant().get_epsilon(delta=DELTA, alphas=INTEGER_ORDERS)
    assert ours == pytest.approx(dp_accounting_epsilon(ROUNDS, DELTA, INTEGER_ORDERS), rel=1e-9)
    # Opacus' default orders include fractional ones below 2, where dp-accounting's series sometimes
    # does not converge and it drops the order (logging a warning): it can then only be looser.
    theirs = dp_accounting_epsilon(ROUNDS, DELTA)
    assert theirs * 0.99 <= reloaded.epsilon(DELTA) <= theirs * (1 + 1e-9)
    assert reloaded.entries[-1].epsilon_after == pytest.approx(reloaded.epsilon(DELTA), rel=1e-12)


def test_prv_ledger_agrees_with_dp_accounting_pld(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "prv-model", mechanism="prv")
    _record(ledger, ROUNDS[:2])
    assert ledger.epsilon(DELTA) == pytest.approx(dp_accounting_pld(ROUNDS[:2], DELTA), rel=5e-3)
    with pytest.raises(LedgerError, match="one accountant per model"):
        PrivacyLedger.open(tmp_path, "prv-model", mechanism="rdp")


@pytest.mark.parametrize("history, rdp_ref, prv_ref", [
    ([(1.1, 256 / 60000, 14063)], 2.597, (2.38, 2.395)),
    ([(1.5, 0.04, 2250)], 7.329, (6.765, 6.785)),
    ([(1.0, 64 / 2000, 31 * 10)], 4.13, (3.655, 3.67)),
    ([(1.0, 64 / 2000, 31 * 50)], 9.14, (8.365, 8.385)),
])
def test_reference_values_of_privacy_md_reproduce(history, rdp_ref, prv_ref):
    assert epsilon_of("rdp", history, DELTA) == pytest.approx(rdp_ref, abs=0.005)
    assert prv_ref[0] <= epsilon_of("prv", history, DELTA) <= prv_ref[1]


@pytest.mark.parametrize("target, sigma_ref", [(1.0, 5.23), (3.0, 2.04), (8.0, 1.06)])
def test_reference_noise_multipliers_reproduce(target, sigma_ref):
    q = 16 / 1000
    sigma = noise_for_budget(target_epsilon=target, delta=DELTA, sample_rate=q, steps=int(100 / q))
    assert sigma == pytest.approx(sigma_ref, abs=0.01)


def test_prv_noise_multiplier_reference():
    q = 16 / 1000
    sigma = noise_for_budget(target_epsilon=3.0, delta=DELTA, sample_rate=q, steps=int(100 / q), mechanism="prv")
    assert sigma == pytest.approx(1.92, abs=0.01)


def test_poisson_schedule_matches_opacus_data_loader():
    for n, b in [(64, 16), (100, 16), (93, 1), (5, 8)]:
        sched = poisson_schedule(n, b)
        dl = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b))
        assert sched.sample_rate == dl.batch_sampler.sample_rate
        assert sched.steps_per_epoch == len(dl)
    assert poisson_schedule(93, 1).steps_per_epoch == 92  # Opacus' float rounding, mirrored


def test_plan_without_history_is_opacus_get_noise_multiplier():
    plan = plan_noise(max_epsilon=4.0, delta=DELTA, n_patients=200, batch_size=20, local_epochs=2, rounds=5)
    sched = poisson_schedule(200, 20)
    expected = get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=sched.sample_rate,
                                    steps=sched.steps_per_epoch * 2 * 5, accountant="rdp")
    assert plan.noise_multiplier == expected
    assert plan.steps_per_round == 20 and plan.rounds == 5


def test_executing_the_plan_fits_the_budget_given_what_is_spent(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "m")
    _record(ledger, [(2.0, 0.1, 50)])
    spent = ledger.epsilon(DELTA)
    plan = plan_noise(max_epsilon=6.0, delta=DELTA, n_patients=100, batch_size=10, local_epochs=1, rounds=3,
                      history=ledger.history)
    assert plan.epsilon_spent == pytest.approx(spent)
    for r in range(3):
        ledger.record_round(run_id="run-2", round=r + 1, noise_multiplier=plan.noise_multiplier,
                            sample_rate=plan.sample_rate, steps=plan.steps_per_round, max_epsilon=6.0, delta=DELTA)
    final = ledger.epsilon(DELTA)
    assert final <= 6.0
    assert final >= 6.0 - 0.05
    assert final == pytest.approx(plan.projected_epsilon, rel=1e-9)
    with pytest.raises(BudgetExceeded, match="plan refused"):
        plan_noise(max_epsilon=spent * 0.9, delta=DELTA, n_patients=100, batch_size=10, local_epochs=1, rounds=1,
                   history=[(2.0, 0.1, 50)])


def test_round_past_budget_is_refused_and_leaves_ledger_untouched(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "m")
    _record(ledger, [(1.0, 0.1, 30)])
    before = ledger.path.read_bytes()
    spent = ledger.epsilon(DELTA)
    assert ledger.would_exceed(1.0, 0.1, 300, max_epsilon=spent + 0.5, delta=DELTA)
    assert not ledger.would_exceed(1.0, 0.1, 1, max_epsilon=spent + 0.5, delta=DELTA)
    assert ledger.path.read_bytes() == before  # would_exceed commits nothing
    with pytest.raises(BudgetExceeded) as err:
        ledger.reserve(run_id="run-1", round=2, noise_multiplier=1.0, sample_rate=0.1, steps=300,
                       max_epsilon=spent + 0.5, delta=DELTA)
    msg = str(err.value)
    assert f"{spent:.4f}" in msg and f"max_epsilon={spent + 0.5:.4f}" in msg and "not trained" in msg
    assert ledger.path.read_bytes() == before


def test_duplicate_round_is_an_error_and_a_replay_pays_again(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "m")
    _record(ledger, [(1.0, 0.1, 30)])
    eps1 = ledger.epsilon(DELTA)
    with pytest.raises(DuplicateRound, match="replay"):
        ledger.record_round(run_id="run-1", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=30,
                            max_epsilon=100, delta=DELTA)
    entry = ledger.record_round(run_id="run-1", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=30,
                                max_epsilon=100, delta=DELTA, replay=True)
    assert entry.attempt == 2
    assert [e.attempt for e in ledger.attempts("run-1", 1)] == [1, 2]
    assert ledger.epsilon(DELTA) == pytest.approx(epsilon_of("rdp", [(1.0, 0.1, 60)], DELTA))
    assert ledger.epsilon(DELTA) > eps1


def _head_and_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LeakyReLU(0.01), torch.nn.Linear(8, 3))
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return head, x, y


def test_epsilon_after_two_rounds_covers_both(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "m")
    head, x, y = _head_and_data()
    kw = dict(max_epsilon=50.0, delta=DELTA, head=head, inputs=x, targets=y,
              loss_fn=torch.nn.functional.cross_entropy, epochs=2, batch_size=8, lr=0.05, noise_multiplier=1.1,
              max_grad_norm=1.0, device="cpu")
    r1 = private_round(ledger, run_id="run-1", round=1, **kw)
    r2 = private_round(ledger, run_id="run-1", round=2, **kw)
    assert r1.steps == r2.steps == 10
    assert r2.epsilon > r1.epsilon
    both = [(1.1, 0.2, 20)]
    assert r2.epsilon == pytest.approx(epsilon_of("rdp", both, DELTA), rel=1e-12)
    assert r2.epsilon == pytest.approx(dp_accounting_epsilon(both, DELTA), rel=1e-3)
    # the PrivacyEngine stepped the ledger's accountant: its history spans both rounds
    assert r2.accountant.history == [(1.1, 0.2, 20)]
    assert [e.status for e in PrivacyLedger.open(tmp_path, "m").entries] == ["committed", "committed"]


def test_private_round_past_budget_trains_nothing(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "m")
    head, x, y = _head_and_data()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(BudgetExceeded):
        private_round(ledger, run_id="run-1", round=1, max_epsilon=0.5, delta=DELTA, head=head, inputs=x,
                      targets=y, loss_fn=torch.nn.functional.cross_entropy, epochs=5, batch_size=8, lr=0.5,
                      noise_multiplier=0.8, max_grad_norm=1.0, device="cpu")
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not ledger_path(tmp_path, "m").exists()


ROUND_SCRIPT = textwrap.dedent("""
    import sys, torch
    from client.privacy.dp_trainer import private_round
    from client.privacy.ledger import PrivacyLedger
    state, rnd, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "crash"
    ledger = PrivacyLedger.open(state, "bb-0123456789abcdef")
    if crash:  # the process dies after reserving, in the middle of training
        ledger.reserve(run_id="run-9", round=rnd, noise_multiplier=1.1, sample_rate=0.2, steps=10,
                       max_epsilon=50, delta=1e-5, task="stage")
        import os; os._exit(3)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(16, 3))
    r = private_round(ledger, run_id="run-9", round=rnd, max_epsilon=50, delta=1e-5, head=head,
                      inputs=torch.randn(40, 16, generator=g), targets=torch.randint(0, 3, (40,), generator=g),
                      loss_fn=torch.nn.functional.cross_entropy, epochs=2, batch_size=8, lr=0.05,
                      noise_multiplier=1.1, max_grad_norm=1.0, device="cpu", task="stage")
    print(repr(r.epsilon))
""")

READ_SCRIPT = textwrap.dedent("""
    import json, sys
    from client.privacy.ledger import PrivacyLedger
    ledger = PrivacyLedger.open(sys.argv[1], "bb-0123456789abcdef")
    print(json.dumps({"epsilon": ledger.epsilon(1e-5), "history": ledger.history,
                      "status": [e.status for e in ledger.entries]}))
""")


def _py(script, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


@pytest.mark.slow  # three fresh interpreters importing torch + opacus: ~10 s idle, 25 s on a busy machine
def test_ledger_survives_process_restart_and_crash(tmp_path):
    r = _py(ROUND_SCRIPT, tmp_path, 1, "ok")
    assert r.returncode == 0, r.stderr
    eps_round1 = float(r.stdout.strip().splitlines()[-1])
    crashed = _py(ROUND_SCRIPT, tmp_path, 2, "crash")
    assert crashed.returncode == 3
    read = _py(READ_SCRIPT, tmp_path)
    assert read.returncode == 0, read.stderr
    state = json.loads(read.stdout)
    # round 1 committed; round 2 was cut short but its cost stays counted
    assert state["status"] == ["committed", "reserved"]
    assert state["history"] == [[1.1, 0.2, 20]]
    assert state["epsilon"] > eps_round1
    assert state["epsilon"] == pytest.approx(epsilon_of("rdp", [(1.1, 0.2, 20)], DELTA), rel=1e-12)
    assert eps_round1 == pytest.approx(epsilon_of("rdp", [(1.1, 0.2, 10)], DELTA), rel=1e-12)
    assert not list((tmp_path / "privacy").glob(".*.tmp"))  # no temp file left behind


def _site_yaml(tmp_path, max_epsilon=8.0):
    (tmp_path / "ct").mkdir()
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"site: hospital-a\ndata:\n  images: ct\nprivacy:\n  max_epsilon: {max_epsilon}\n"
                   f"  delta: 1.0e-5\n  max_grad_norm: 1.0\nstate_dir: state\n")
    return cfg


def _run_cli(argv):
    import argparse

    from client.cli import register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_client_ledger_cli_shows_spent_and_remaining(tmp_path, capsys):
    cfg = _site_yaml(tmp_path)
    assert _run_cli(["client", "ledger", "--config", str(cfg), "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["epsilon"] == 0.0 and empty["history"] == [] and empty["max_epsilon"] == 8.0

    ledger = PrivacyLedger.open_site(tmp_path / "state")
    _record(ledger, ROUNDS[:2], max_epsilon=8.0)
    assert _run_cli(["client", "ledger", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"site", "delta", "epsilon", "max_epsilon", "history", "by_backbone"} <= set(out)
    assert out["site"] == "hospital-a" and out["delta"] == DELTA and out["model_key"] == "site"
    assert out["epsilon"] == pytest.approx(epsilon_of("rdp", ROUNDS[:2], DELTA))
    assert out["remaining_epsilon"] == pytest.approx(8.0 - out["epsilon"])
    assert [(h["round"], h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in out["history"]] == \
        [(i + 1, s, q, n) for i, (s, q, n) in enumerate(ROUNDS[:2])]
    assert out["history"][-1]["epsilon_after"] == pytest.approx(out["epsilon"])
    assert {"run_id", "round", "kind", "noise_multiplier", "sample_rate", "steps", "epsilon_after"} <= \
        set(out["history"][0])

    assert _run_cli(["client", "ledger", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert f"epsilon spent {out['epsilon']:.4f} of 8" in text and "committed" in text


def test_per_backbone_ledgers_of_earlier_versions_fold_into_one_site_budget(tmp_path):
    """Two backbones over the same patients used to be two budgets; opened now, they compose."""
    a = PrivacyLedger.open(tmp_path, ledger_key("a" * 64), audited=False)
    b = PrivacyLedger.open(tmp_path, ledger_key("b" * 64), audited=False)
    _record(a, ROUNDS[:1], max_epsilon=100)
    _record(b, ROUNDS[1:2], max_epsilon=100)
    alone = max(a.epsilon(DELTA), b.epsilon(DELTA))

    site = PrivacyLedger.open_site(tmp_path)
    assert site.epsilon(DELTA) == pytest.approx(dp_accounting_epsilon(ROUNDS[:2], DELTA), rel=1e-2)
    assert site.epsilon(DELTA) > alone
    assert {e.backbone for e in site.entries} == {ledger_key("a" * 64), ledger_key("b" * 64)}
    assert not list((tmp_path / "privacy").glob("ledger-bb-*.json"))      # retired, not read twice
    assert PrivacyLedger.open_site(tmp_path).epsilon(DELTA) == pytest.approx(site.epsilon(DELTA))


def test_commit_refuses_an_accountant_that_does_not_match_and_counts_both(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "m")
    res = ledger.reserve(run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10, max_epsilon=100,
                         delta=DELTA)
    acc = res.accountant()
    for _ in range(12):  # the engine took more steps than were reserved
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(LedgerError, match="does not match the reserved round"):
        ledger.commit(res, acc)
    reloaded = PrivacyLedger.open(tmp_path, "m")
    assert reloaded.history == [(1.0, 0.1, 22)] and reloaded.entries[0].status == "mismatch"
