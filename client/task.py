"""What a site does in a round, without Flower: the ClientApp only packs and unpacks.

train:    check the announced backbone, load the global heads, plan the noise from
          the site's own budget (keeping room for the planned evaluations), DP-SGD the
          heads with fresh noise (privacy charged in the site's one ledger before
          anything leaves), reply with head weights and the DP bookkeeping. The training
          loss stays in the site's log.
evaluate: score the global heads on the site's held-out patients and release the
          metrics through Gaussian noise on their counts (`dp_metrics`), charged to the
          same ledger; none computed over fewer than `min_cases_for_metrics` patients of
          its own.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.features import FeatureCache, SiteTaskData
from client.privacy.dp_metrics import count_tables, dp_evaluation
from client.privacy.dp_trainer import private_round
from client.privacy.ledger import BudgetExceeded, PrivacyLedger
from client.privacy.planning import evaluation_noise, plan_noise
from client.privacy.tamper import StateMismatch, check_state
from client.site_config import SiteConfig
from pasta_model.checkpoint import backbone_sha256, load_checkpoint, read_meta, save_checkpoint
from pasta_model.device import select_device
from pasta_model.finetune import head_loss, output_layer_only, predict_head
from pasta_model.network import ORGAN_HEAD_PREFIX, PastaNet, backbone_keys, build_model
from pasta_model.protocol import (
    DELTA,
    EPSILON,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    SAMPLE_RATE,
    STEPS,
    ErrorCode,
    ProtocolError,
    RoundConfig,
    arrays_to_heads,
    check_array_dtypes,
    heads_to_arrays,
)

log = logging.getLogger(__name__)


# Error codes of a refusal (the reply carries the code and its fixed message only).
REFUSED_POLICY = int(ErrorCode.SITE_POLICY)     # the site's own rules (its YAML) do not allow it
REFUSED_BUDGET = int(ErrorCode.PRIVACY_BUDGET)  # the privacy budget does not cover it
REFUSED_TOO_FEW = int(ErrorCode.TOO_FEW_CASES)  # too few patients for anything to be released
REFUSED_BACKBONE = int(ErrorCode.BACKBONE)      # no such backbone at the site, or not one it accepts
REFUSED_STATE = int(ErrorCode.SITE_STATE)       # ledger and audit log disagree: the operator must look


class SiteRefused(RuntimeError):
    """The site will not do what was asked; `code` goes back, the text stays in the site's log."""

    def __init__(self, message: str, code: int = REFUSED_POLICY):
        super().__init__(message)
        self.code = code


@dataclass
class RoundReply:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


@dataclass
class EvaluationReply:
    metrics: dict[str, float]            # noisy metrics and DP bookkeeping: what may leave
    cases: dict[str, int]                # exact patients behind each metric (for the outbox, never sent)
    withheld: dict[str, str]             # metrics not released, and why (audited)


class SiteAgent:
    """One per site and process; keeps the backbone and features between rounds."""

    def __init__(self, config: SiteConfig, noise_seed: int | None = None):
        """`noise_seed` only for simulations and tests that need repeatable noise: a deployed
        site never sets it, so every release draws fresh noise from the OS CSPRNG."""
        self.config = config
        self.noise_seed = noise_seed
        self._models: dict[str, PastaNet] = {}
        self._data: dict[tuple[str, str], SiteTaskData] = {}

    # -- backbone -----------------------------------------------------------------------
    def installed_backbone_path(self, sha256: str) -> Path:
        return Path(self.config.state_dir) / "backbones" / f"{sha256}.safetensors"

    def has_backbone(self, sha256: str) -> bool:
        if sha256 in self._models or self.installed_backbone_path(sha256).exists():
            return True
        if self.config.backbone is not None and Path(self.config.backbone).exists():
            return read_meta(self.config.backbone).backbone_sha256 == sha256
        return False

    def model(self, sha256: str) -> PastaNet:
        """The frozen backbone with the announced hash; anything else is refused."""
        if sha256 in self._models:
            return self._models[sha256]
        candidates = [self.installed_backbone_path(sha256)]
        if self.config.backbone is not None:
            candidates.insert(0, Path(self.config.backbone))
        for path in candidates:
            if path.exists() and read_meta(path).backbone_sha256 == sha256:
                model, _ = load_checkpoint(path)    # verifies the stored hash against the weights
                model.freeze_backbone()
                model.to(select_device(self.config.device)).eval()
                self._models[sha256] = model
                return model
        raise SiteRefused(f"site {self.config.site}: no backbone with SHA-256 {sha256[:12]}... "
                          f"(configured: {self.config.backbone}); the coordinator must send it", REFUSED_BACKBONE)

    def install_backbone(self, sha256: str, preset: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Install a backbone the coordinator sent, if the site's YAML accepts it (its releases
        still go to the site's one ledger: a new backbone is not new patients)."""
        if not self.config.backbones.allows(sha256):
            raise SiteRefused(f"site {self.config.site}: backbone {sha256[:12]}... not accepted "
                              f"(backbones.accept_from_coordinator: {self.config.backbones.accept_from_coordinator})",
                              REFUSED_BACKBONE)
        # a backbone with an organ probe (pretrain --segment-minutes) carries its keys: build that shape
        model = build_model(preset, organs=any(k.startswith(ORGAN_HEAD_PREFIX) for k in arrays))
        expected = set(backbone_keys(model))
        if set(arrays) != expected:
            raise SiteRefused(f"backbone payload keys do not match preset {preset!r}", REFUSED_BACKBONE)
        own = model.state_dict()
        try:
            check_array_dtypes(arrays, {k: own[k].dtype for k in arrays})
        except ProtocolError as exc:
            raise SiteRefused(f"backbone payload refused: {exc}", REFUSED_BACKBONE) from exc
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
        model.load_state_dict(state, strict=False)
        actual = backbone_sha256(model)
        if actual != sha256:
            raise SiteRefused(f"backbone payload hash {actual[:12]}... does not match announced {sha256[:12]}...",
                              REFUSED_BACKBONE)
        path = self.installed_backbone_path(sha256)
        save_checkpoint(path, model, extra={"installed_from": "coordinator"})
        log.info("site %s: installed backbone %s... (%s)", self.config.site, sha256[:12], preset)
        return path

    # -- data -----------------------------------------------------------------------------
    def task_data(self, sha256: str, task: str) -> SiteTaskData:
        key = (sha256, task)
        if key not in self._data:
            data = FeatureCache(self.config, self.model(sha256), sha256).task_data(task)
            log.info("site %s: task %s: %d training and %d validation patients, %d case(s) not used",
                     self.config.site, task, len(data.train), len(data.val), len(data.skipped))
            self._data[key] = data
        return self._data[key]

    def ledger(self) -> PrivacyLedger:
        """The site's one ledger: every backbone, task, run and attempt composes into it."""
        return PrivacyLedger.open_site(self.config.state_dir)

    def _checked_ledger(self) -> PrivacyLedger:
        """The ledger, after checking it against the audit log (a rollback or truncation stops here)."""
        try:
            check_state(self.config.state_dir)
        except StateMismatch as exc:
            raise SiteRefused(f"site {self.config.site}: {exc}", REFUSED_STATE) from exc
        return self.ledger()

    def _evaluation_share(self) -> float:
        return self.config.privacy.evaluation_share

    def _evaluation_sigma(self, config: RoundConfig, delta: float) -> float:
        """Noise multiplier of each of the run's planned evaluations (the site's share of its budget)."""
        return evaluation_noise(max_epsilon=self.config.privacy.max_epsilon, share=self._evaluation_share(),
                                delta=delta, evaluations=config.planned_rounds)

    def _planned_evaluations(self, config: RoundConfig, delta: float, count: int) -> list[tuple[float, float, int]]:
        """The room training keeps for the run's evaluations (none when the share cannot buy one)."""
        if self._evaluation_share() <= 0:
            return []
        try:
            return [(self._evaluation_sigma(config, delta), 1.0, count)]
        except BudgetExceeded:
            log.warning("site %s: privacy.evaluation_share %.3g of max_epsilon %.3g cannot pay for %d DP "
                        "evaluation(s); evaluations will be refused", self.config.site, self._evaluation_share(),
                        self.config.privacy.max_epsilon, config.planned_rounds)
            return []

    def _delta(self, config: RoundConfig, n: int) -> float:
        """The site's delta (never loosened by the coordinator's), refused when above 1/patients."""
        delta = min(self.config.privacy.delta, config.dp_delta)
        if delta > 1.0 / n:
            raise SiteRefused(f"site {self.config.site}: delta {delta:g} is above 1/{n} patients; a delta that "
                              f"large allows releasing a patient outright (set privacy.delta <= {1.0 / n:.2g})")
        return delta

    def _check_trainable(self, head, data, task: str) -> None:
        """Refuse a round whose heads cannot train (e.g. 3e38 weights) before it costs any privacy."""
        with torch.no_grad():
            probe = head(data.train.inputs[:8].to(next(head.parameters()).device).float())
            loss = head_loss(task)(probe.cpu(), {k: v[:8] for k, v in data.train.targets.items()})
        if not (torch.isfinite(probe).all() and math.isfinite(float(loss))):
            raise SiteRefused(f"site {self.config.site}: the incoming heads give a non-finite output or loss; "
                              f"nothing trained, nothing charged")

    # -- a round --------------------------------------------------------------------------
    def train(self, config: RoundConfig, head_arrays: Mapping[str, np.ndarray]) -> RoundReply:
        model = self.model(config.backbone_sha256)
        data = self.task_data(config.backbone_sha256, config.task)
        n = len(data.train)
        if n < self.config.min_cases_for_metrics:
            raise SiteRefused(f"site {self.config.site}: only {n} training patient(s) for task {config.task}; "
                              f"at least {self.config.min_cases_for_metrics} are needed", REFUSED_TOO_FEW)
        delta = self._delta(config, n + len(data.val))
        arrays_to_heads(model, head_arrays, config.task)
        head = output_layer_only(copy.deepcopy(model.heads[config.task]).train())
        self._check_trainable(head, data, config.task)
        global_params = [p.detach().clone() for p in head.parameters() if p.requires_grad]
        ledger = self._checked_ledger()
        privacy = self.config.privacy
        remaining_rounds = config.planned_rounds - config.server_round + 1
        try:
            reserved = self._planned_evaluations(config, delta, remaining_rounds)
            plan = plan_noise(max_epsilon=privacy.max_epsilon, delta=delta, n_patients=n,
                              batch_size=config.batch_size, local_epochs=config.local_epochs,
                              rounds=remaining_rounds, history=ledger.history, mechanism=ledger.mechanism,
                              reserved=reserved)
            replay = bool(ledger.attempts(config.run_id, config.server_round))
            if replay:
                log.warning("site %s: round %d of run %s was started before; training it again with fresh "
                            "noise and counting its privacy cost again", self.config.site, config.server_round,
                            config.run_id)
            result = private_round(
                ledger, run_id=config.run_id, round=config.server_round, max_epsilon=privacy.max_epsilon,
                delta=delta, head=head, inputs=data.train.inputs, targets=data.train.targets,
                loss_fn=head_loss(config.task), epochs=config.local_epochs, batch_size=config.batch_size,
                lr=config.learning_rate, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm, task=config.task, replay=replay,
                patient_ids=data.train.patient_ids, device=self.config.device, seed=self.noise_seed,
                global_params=global_params, prox_mu=config.proximal_mu, backbone=config.backbone_sha256)
        except BudgetExceeded as exc:
            raise SiteRefused(f"site {self.config.site}: privacy budget: {exc}", REFUSED_BUDGET) from exc
        trained = result.head.cpu().state_dict()
        prefix = f"heads.{config.task}."
        arrays = heads_to_arrays({prefix + k: v for k, v in trained.items()}, config.task)
        metrics = {
            NUM_EXAMPLES: float(n), EPSILON: float(result.epsilon),
            DELTA: float(delta), NOISE_MULTIPLIER: float(result.noise_multiplier),
            STEPS: float(result.steps), SAMPLE_RATE: float(result.sample_rate),
        }
        # the training loss is computed from patients without noise: it stays in the site's log
        log.info("site %s: round %d trained on %d patients, loss %.4f (not sent), epsilon %.3f / %.3f",
                 self.config.site, config.server_round, n, result.loss, result.epsilon, privacy.max_epsilon)
        return RoundReply(arrays, metrics)

    def evaluate(self, config: RoundConfig, head_arrays: Mapping[str, np.ndarray]) -> EvaluationReply:
        """DP metrics of the global heads on the validation patients, charged to the site's ledger."""
        if self._evaluation_share() <= 0:
            raise SiteRefused(f"site {self.config.site}: evaluation is off (privacy.evaluation_share is 0)")
        model = self.model(config.backbone_sha256)
        data = self.task_data(config.backbone_sha256, config.task)
        n = len(data.val)
        if n < self.config.min_cases_for_metrics:
            raise SiteRefused(f"site {self.config.site}: {n} validation patient(s) for task {config.task}; "
                              f"metrics over fewer than {self.config.min_cases_for_metrics} are not released",
                              REFUSED_TOO_FEW)
        delta = self._delta(config, n + len(data.train))
        arrays_to_heads(model, head_arrays, config.task)
        tables = count_tables(config.task, predict_head(model.heads[config.task], data.val.inputs),
                              data.val.targets)
        ledger = self._checked_ledger()
        try:
            sigma = self._evaluation_sigma(config, delta)
            entry = ledger.record_round(
                run_id=config.run_id, round=config.server_round, noise_multiplier=sigma, sample_rate=1.0,
                steps=1, max_epsilon=self.config.privacy.max_epsilon, delta=delta, task=config.task,
                replay=bool(ledger.attempts(config.run_id, config.server_round, "evaluate")), kind="evaluate",
                backbone=config.backbone_sha256)
        except BudgetExceeded as exc:
            raise SiteRefused(f"site {self.config.site}: privacy budget: {exc}", REFUSED_BUDGET) from exc
        released = dp_evaluation(config.task, tables, sigma, self.config.min_cases_for_metrics)
        metrics = {**released.metrics, EPSILON: float(entry.epsilon_after), DELTA: float(delta),
                   NOISE_MULTIPLIER: float(sigma), STEPS: 1.0, SAMPLE_RATE: 1.0}
        for name, why in released.withheld.items():
            log.info("site %s: metric %s withheld: %s", self.config.site, name, why)
        return EvaluationReply(metrics, released.cases, released.withheld)

