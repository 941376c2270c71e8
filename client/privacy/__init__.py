"""The site's privacy core: DP-SGD for heads, the privacy ledger, noise planning, audit log, outbox gate.

Nothing here knows about Flower: the ClientApp calls `plan_noise`, `private_round`
and `release`, in that order, for each round.
"""
import importlib

# name -> submodule; imported on first use so `pasta-fed client ...` starts without opacus/torch.
_EXPORTS = {
    "AuditLog": "audit", "AuditRecord": "audit", "payload_sha256": "audit",
    "DPTrainResult": "dp_trainer", "train_head_dp": "dp_trainer", "train_head_plain": "dp_trainer",
    "private_round": "dp_trainer",
    "check_one_row_per_patient": "dp_trainer", "first_row_per_patient": "dp_trainer",
    "BudgetExceeded": "ledger", "DuplicateRound": "ledger", "LedgerEntry": "ledger", "LedgerError": "ledger",
    "PrivacyLedger": "ledger", "Reservation": "ledger", "epsilon_of": "ledger", "ledger_key": "ledger",
    "make_accountant": "ledger",
    "OutboxPolicy": "outbox", "OutboxRefused": "outbox", "check_outgoing": "outbox", "release": "outbox",
    "NoisePlan": "planning", "PoissonSchedule": "planning", "noise_for_budget": "planning",
    "plan_noise": "planning", "poisson_schedule": "planning",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
