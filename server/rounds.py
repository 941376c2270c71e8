"""The round loop: Flower's strategy aggregates; this loop adds what a coordinator needs.

`Strategy.start` runs all rounds in one go. We drive the same strategy methods
(configure_train / aggregate_train / configure_evaluate / aggregate_evaluate) one
round at a time so that each round is checkpointed before the next starts, a stopped
run resumes from its last complete round, failing sites are named, and a round that
falls below the minimum of sites is retried instead of silently aggregating too few.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pasta_model.protocol import EPSILON, NOISE_MULTIPLIER, SITE_RECORD
from server.replies import error_reason, exchange_by_node

log = logging.getLogger(__name__)

# A site whose budget is (nearly) spent still replies: it plans the noise that fits what
# is left, so its update is noise (sigma 40 was seen) and the run looks successful. From
# this noise multiplier on, the coordinator is told. DP-SGD that learns uses ~0.5-3.
NOISE_DOMINATED_SIGMA = 10.0


class RoundFailed(RuntimeError):
    """Fewer sites than the minimum replied, after all retries."""


class SiteFailure(TypedDict):
    """One entry of a round record's "failed" / "evaluate_failed" lists."""
    site: str
    reason: str
    attempt: NotRequired[int]     # train failures only: which try of the round


@dataclass
class RoundOutcome:
    arrays: ArrayRecord
    record: dict[str, Any]


@dataclass
class SiteBook:
    """node id -> site name, learnt from replies (error replies carry no name)."""
    names: dict[int, str] = field(default_factory=dict)

    def learn(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        if not msg.has_error() and SITE_RECORD in msg.content.config_records:
            self.names[node] = str(msg.content.config_records[SITE_RECORD]["name"])
        return self.name(node)

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")


def _metrics(msg: Message) -> dict[str, MetricRecordValues]:
    recs = msg.content.metric_records
    return {k: v for rec in recs.values() for k, v in rec.items()} if recs else {}


def _exchange(grid: Grid, messages: list[Message], timeout: float, book: SiteBook, what: str,
              warn: bool = True) -> tuple[list[Message], list[SiteFailure]]:
    """Replies and failures; each failure is a warning when `warn` (training), else it is
    said once in the round's summary line (evaluation: sites refuse it routinely)."""
    sent = {m.metadata.dst_node_id for m in messages}
    ok: list[Message] = []
    failed: list[SiteFailure] = []
    replied = set()
    for node, msg in exchange_by_node(grid, messages, timeout):
        replied.add(node)
        if msg.has_error():
            site, reason = book.name(node), error_reason(msg)
            failed.append({"site": site, "reason": reason})
            if warn:
                log.warning("%s: site %s failed: %s", what, site, reason)
        else:
            book.learn(msg)
            ok.append(msg)
    for node in sorted(sent - replied):
        failed.append({"site": book.name(node), "reason": f"no reply within {timeout:.0f}s"})
        if warn:
            log.warning("%s: site %s did not reply within %.0fs", what, book.name(node), timeout)
    return ok, failed


def _consistent(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """Keep replies whose metric keys match the most common key set (strategies refuse mixed sets)."""
    if not replies:
        return [], []
    keysets = [frozenset(_metrics(m)) for m in replies]
    common = max(set(keysets), key=keysets.count)
    keep = [m for m, k in zip(replies, keysets) if k == common]
    drop = [m for m, k in zip(replies, keysets) if k != common]
    return keep, drop


def run_round(
    *,
    grid: Grid,
    strategy: Strategy,
    rnd: int,
    arrays: ArrayRecord,
    train_config: dict[str, Any],
    evaluate_config: dict[str, Any],
    min_sites: int,
    timeout: float,
    retries: int,
    book: SiteBook,
    evaluator: Callable[[int, ArrayRecord], dict[str, float] | None] | None = None,
) -> RoundOutcome:
    t0 = time.monotonic()
    failures: list[SiteFailure] = []
    for attempt in range(1, retries + 2):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)), grid))
        ok, failed = _exchange(grid, msgs, timeout, book, f"round {rnd} train")
        failures += [{"site": f["site"], "reason": f["reason"], "attempt": attempt} for f in failed]
        ok, inconsistent = _consistent(ok)
        for m in inconsistent:
            failures.append({"site": book.name(m.metadata.src_node_id), "reason": "reply metrics inconsistent",
                             "attempt": attempt})
        if len(ok) >= min_sites:
            break
        log.warning("round %d attempt %d: %d site(s) replied, minimum is %d%s", rnd, attempt, len(ok), min_sites,
                    "; retrying" if attempt <= retries else "")
    else:
        raise RoundFailed(
            f"round {rnd}: only {len(ok)} site(s) replied after {retries + 1} attempt(s), minimum is {min_sites}; "
            f"failures: " + "; ".join(f"{f['site']}: {f['reason']}" for f in failures)
        )

    new_arrays, agg_train = strategy.aggregate_train(rnd, ok)
    if new_arrays is None:
        raise RoundFailed(f"round {rnd}: the strategy returned no aggregate")
    new_arrays = _in_dtypes_of(new_arrays, arrays)
    sites: dict[str, dict[str, Any]] = {}
    for m in ok:
        sites[book.name(m.metadata.src_node_id)] = {"node_id": m.metadata.src_node_id, "train": _metrics(m)}
    noisy = noise_dominated(sites)
    for site in noisy:
        train = sites[site]["train"]
        log.warning("round %d: site %s trained with noise multiplier %.1f (epsilon spent %.3f): its privacy "
                    "budget is (nearly) spent, so its update is mostly noise; give it a new model or leave it out",
                    rnd, site, train[NOISE_MULTIPLIER], train.get(EPSILON, float("nan")))

    eval_msgs = list(strategy.configure_evaluate(rnd, new_arrays, ConfigRecord(dict(evaluate_config)), grid))
    eval_ok, eval_failed = _exchange(grid, eval_msgs, timeout, book, f"round {rnd} evaluate", warn=False)
    eval_ok, _ = _consistent(eval_ok)
    agg_eval = strategy.aggregate_evaluate(rnd, eval_ok) if eval_ok else None
    for m in eval_ok:
        sites.setdefault(book.name(m.metadata.src_node_id), {})["evaluate"] = _metrics(m)

    global_metrics = evaluator(rnd, new_arrays) if evaluator else None
    record = {
        "sites": sites,
        "failed": failures,
        "evaluate_failed": eval_failed,
        "num_sites": len(ok),
        "noise_dominated": noisy,
        "aggregated": {
            "train": dict(agg_train) if agg_train is not None else {},
            "evaluate": dict(agg_eval) if agg_eval is not None else {},
        },
        "global": global_metrics or {},
        "seconds": round(time.monotonic() - t0, 3),
    }
    refused = "; ".join(f"{f['site']} ({f['reason']})" for f in eval_failed)
    log.info("round %d: %d site(s) aggregated (%s), %.1fs%s", rnd, len(ok), ", ".join(sorted(sites)),
             record["seconds"], f"; evaluation refused by {refused}" if refused else "")
    return RoundOutcome(new_arrays, record)


def _in_dtypes_of(aggregate: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """The aggregate in the dtypes of the heads sent: FedAdam's server step returns float64, which
    the sites (and the final checkpoint) refuse as a dtype change."""
    want = {k: sent[k].numpy().dtype for k in aggregate.keys() if k in sent}
    if all(aggregate[k].numpy().dtype == dtype for k, dtype in want.items()):
        return aggregate
    return ArrayRecord({k: Array(v.numpy().astype(want.get(k, v.numpy().dtype), copy=False))
                        for k, v in aggregate.items()})


def noise_dominated(sites: dict[str, dict[str, Any]]) -> list[str]:
    """Sites whose reported noise multiplier is at least NOISE_DOMINATED_SIGMA."""
    return sorted(s for s, e in sites.items()
                  if float(e.get("train", {}).get(NOISE_MULTIPLIER, 0.0)) >= NOISE_DOMINATED_SIGMA)
