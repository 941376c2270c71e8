"""The questions a consortium asks, answered on the same data in the same run.

Each comparison trains the task head on the sites' training patients (exactly the
ones their agents used) and scores it on every site's held-out test cases:
- federated (DP): the federation's final heads;
- local (DP): each hospital alone, with its own budget over the same plan
  (rounds x local epochs), scored on its own held-out cases;
- pooled (DP) / pooled (no DP): all training patients in one place;
- pooled scratch (DP): the same on features of a randomly initialised backbone;
- pretrained heads before fine-tuning, as the floor.
Counterfactual training never touches a site's privacy ledger (fresh accountants).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from client.features import FeatureCache, SiteTaskData, TaskSplit
from client.privacy.dp_trainer import train_head_dp, train_head_plain
from client.privacy.planning import plan_noise
from client.site_config import load_site_config
from pasta_model.checkpoint import backbone_sha256, load_checkpoint
from pasta_model.finetune import PRIMARY_METRIC, evaluate_head, head_loss, output_layer_only
from pasta_model.network import PastaNet, build_model
from simulation.config import SimulationConfig
from simulation.hospitals import SiteFiles

log = logging.getLogger(__name__)


@dataclass
class SiteSets:
    name: str
    train: TaskSplit
    heldout: TaskSplit


def _concat(splits: list[TaskSplit]) -> TaskSplit:
    splits = [s for s in splits if len(s)]
    if not splits:
        return TaskSplit(torch.zeros(0), {}, [], [])
    return TaskSplit(torch.cat([s.inputs for s in splits]),
                     {k: torch.cat([s.targets[k] for s in splits]) for k in splits[0].targets},
                     [p for s in splits for p in s.patient_ids], [c for s in splits for c in s.case_ids])


def load_sets(sites: list[SiteFiles], model: PastaNet, task: str) -> list[SiteSets]:
    sha = backbone_sha256(model)
    out = []
    for s in sites:
        data: SiteTaskData = FeatureCache(load_site_config(s.config), model, sha).task_data(task)
        held: SiteTaskData = FeatureCache(load_site_config(s.heldout_config), model, sha).task_data(task)
        out.append(SiteSets(s.profile.name, data.train, _concat([held.train, held.val])))
    return out


def _train(cfg: SimulationConfig, task: str, head: torch.nn.Module, data: TaskSplit, dp: bool, seed: int):
    n = len(data)
    kwargs = dict(epochs=cfg.rounds * cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate,
                  device="auto", seed=seed, patient_ids=data.patient_ids)
    head = output_layer_only(copy.deepcopy(head).train())   # what the sites train, too
    if not dp:
        return train_head_plain(head, data.inputs, data.targets, head_loss(task), **kwargs).head
    plan = plan_noise(max_epsilon=cfg.epsilon, delta=cfg.delta, n_patients=n, batch_size=cfg.batch_size,
                      local_epochs=cfg.local_epochs, rounds=cfg.rounds)
    return train_head_dp(head, data.inputs, data.targets, head_loss(task),
                         noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                         delta=cfg.delta, **kwargs).head


def _score(task: str, head, sets: list[SiteSets]) -> dict[str, float]:
    key = PRIMARY_METRIC[task]
    return {s.name: evaluate_head(task, head, s.heldout.inputs, s.heldout.targets).get(key, float("nan"))
            for s in sets}


def run_comparisons(cfg: SimulationConfig, sites: list[SiteFiles], pretrained: Path, final: Path
                    ) -> dict[str, dict[str, float]]:
    """method -> site -> primary metric on that site's held-out cases."""
    task = cfg.task
    log.info("comparisons (%s): each on every hospital's held-out cases; about a minute",
             ", ".join(["pretrained and federated heads", *cfg.comparisons]))
    model, _ = load_checkpoint(pretrained)
    model.eval()
    sets = load_sets(sites, model, task)
    base_head = model.heads[task]
    table: dict[str, dict[str, float]] = {"pretrained heads, no fine-tuning": _score(task, base_head, sets)}
    fed_model, _ = load_checkpoint(final)
    table["federated (DP)"] = _score(task, fed_model.heads[task], sets)
    if "local" in cfg.comparisons:
        table["local alone (DP)"] = {}
        for i, s in enumerate(sets):
            if len(s.train) == 0:   # e.g. a hospital without lesion masks, for segment: n/a, not a crash
                log.warning("%s has no training cases for task %s: 'local alone' is n/a there", s.name, task)
                table["local alone (DP)"][s.name] = float("nan")
                continue
            head = _train(cfg, task, base_head, s.train, dp=True, seed=cfg.seed + 100 + i)
            table["local alone (DP)"][s.name] = _score(task, head, [s])[s.name]
    pooled = _concat([s.train for s in sets])
    if "pooled" in cfg.comparisons:
        table["pooled (DP)"] = _score(task, _train(cfg, task, base_head, pooled, True, cfg.seed + 200), sets)
    if "pooled_no_dp" in cfg.comparisons:
        table["pooled (no DP)"] = _score(task, _train(cfg, task, base_head, pooled, False, cfg.seed + 300), sets)
    if "pooled_scratch" in cfg.comparisons:
        torch.manual_seed(cfg.seed + 400)
        scratch = build_model(model.preset, model.tasks).eval()
        scratch_sets = load_sets(sites, scratch, task)
        scratch_pooled = _concat([s.train for s in scratch_sets])
        head = _train(cfg, task, scratch.heads[task], scratch_pooled, True, cfg.seed + 400)
        table["pooled, scratch backbone (DP)"] = _score(task, head, scratch_sets)
        table["pooled, pretrained backbone (DP)"] = table.get("pooled (DP)") or _score(
            task, _train(cfg, task, base_head, pooled, True, cfg.seed + 200), sets)
    return table
