"""Flower's own strategies, chosen by name; only their construction lives here."""
from __future__ import annotations

from typing import TypedDict

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from server.settings import RunSettings


class _CommonArgs(TypedDict):
    """The keyword arguments every FedAvg-derived strategy takes (typed so mypy checks each)."""
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


def build_strategy(settings: RunSettings, num_sites_hint: int | None = None) -> Strategy:
    common = _CommonArgs(
        fraction_train=settings.fraction_sites,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_sites,
        min_evaluate_nodes=settings.min_sites,
        min_available_nodes=settings.min_sites,
    )
    name = settings.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=settings.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=settings.trimmed_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=settings.krum_malicious)
    raise ValueError(f"unknown strategy {name!r}")
