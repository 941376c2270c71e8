"""What a site does in a round, without Flower: the ClientApp only packs and unpacks.

train:    check the announced backbone, load the global heads, plan the noise from
          the site's own budget, DP-SGD the heads (privacy charged in the ledger
          before anything leaves), reply with head weights and aggregate metrics.
evaluate: score the global heads on the site's held-out patients; aggregate metrics
          only, none over fewer than `min_cases_for_metrics` cases.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from client.features import FeatureCache, SiteTaskData
from client.privacy.audit import payload_sha256
from client.privacy.dp_trainer import private_round, resolve_device
from client.privacy.ledger import BudgetExceeded, PrivacyLedger, ledger_key
from client.privacy.planning import plan_noise
from client.site_config import SiteConfig
from pasta_model.checkpoint import backbone_sha256, load_checkpoint, read_meta, save_checkpoint
from pasta_model.finetune import evaluate_head, head_loss, output_layer_only
from pasta_model.network import PastaNet, backbone_keys, build_model
from pasta_model.protocol import (DELTA, EPSILON, NOISE_MULTIPLIER, NUM_EXAMPLES, SAMPLE_RATE, STEPS, TRAIN_LOSS,
                                  ProtocolError, RoundConfig, arrays_to_heads, heads_to_arrays)

log = logging.getLogger(__name__)


class SiteRefused(RuntimeError):
    """The site will not do what was asked; the reason goes back to the coordinator."""


@dataclass
class RoundReply:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


NOISE_SECRET = "noise-secret"


def site_secret(state_dir: Path) -> bytes:
    """32 random bytes that never leave the site (created once, mode 0600).

    DP noise is drawn from a seed derived from this secret: a seed the coordinator
    knew would let it regenerate the noise and subtract it.
    """
    path = Path(state_dir) / "privacy" / NOISE_SECRET
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{NOISE_SECRET}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)        # first writer wins; never replaces an existing secret
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_bytes()


def noise_seed(secret: bytes, config: RoundConfig, incoming: Mapping[str, np.ndarray],
               data: torch.Tensor | None = None) -> int:
    """A seed only the site can compute, and that repeats only when the whole release would.

    Same secret, round settings, incoming heads and training data -> same seed, so a
    re-run round (after a crash) repeats its release exactly and nothing new leaks;
    anything different -> an unrelated seed, so noise is never reused on a different
    release (two releases with the same noise would let their difference cancel it).
    """
    digest = hashlib.sha256(secret)
    settings = {k: v for k, v in config.to_config_dict().items() if k != "run-id"}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(payload_sha256(incoming).encode())
    if data is not None:
        digest.update(data.detach().cpu().contiguous().numpy().tobytes())
    return int(digest.hexdigest()[:15], 16)


class SiteAgent:
    """One per site and process; keeps the backbone and features between rounds."""

    def __init__(self, config: SiteConfig):
        self.config = config
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
                model.to(resolve_device(self.config.device)).eval()
                self._models[sha256] = model
                return model
        raise SiteRefused(f"site {self.config.site}: no backbone with SHA-256 {sha256[:12]}... "
                          f"(configured: {self.config.backbone}); the coordinator must send it")

    def install_backbone(self, sha256: str, preset: str, arrays: Mapping[str, np.ndarray]) -> Path:
        model = build_model(preset)
        expected = set(backbone_keys(model))
        if set(arrays) != expected:
            raise SiteRefused(f"backbone payload keys do not match preset {preset!r}")
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
        model.load_state_dict(state, strict=False)
        actual = backbone_sha256(model)
        if actual != sha256:
            raise SiteRefused(f"backbone payload hash {actual[:12]}... does not match announced {sha256[:12]}...")
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

    def ledger(self, sha256: str) -> PrivacyLedger:
        return PrivacyLedger.open(self.config.state_dir, ledger_key(sha256))

    # -- a round --------------------------------------------------------------------------
    def train(self, config: RoundConfig, head_arrays: Mapping[str, np.ndarray]) -> RoundReply:
        model = self.model(config.backbone_sha256)
        data = self.task_data(config.backbone_sha256, config.task)
        n = len(data.train)
        if n < self.config.min_cases_for_metrics:
            raise SiteRefused(f"site {self.config.site}: only {n} training patient(s) for task {config.task}; "
                              f"at least {self.config.min_cases_for_metrics} are needed")
        arrays_to_heads(model, head_arrays, config.task)
        head = output_layer_only(copy.deepcopy(model.heads[config.task]).train())
        global_params = [p.detach().clone() for p in head.parameters() if p.requires_grad]
        ledger = self.ledger(config.backbone_sha256)
        privacy = self.config.privacy
        remaining_rounds = config.planned_rounds - config.server_round + 1
        # the budget is the site's: (max_epsilon, its delta); a coordinator's larger delta never loosens it
        delta = min(privacy.delta, config.dp_delta)
        try:
            plan = plan_noise(max_epsilon=privacy.max_epsilon, delta=delta, n_patients=n,
                              batch_size=config.batch_size, local_epochs=config.local_epochs,
                              rounds=remaining_rounds, history=ledger.history, mechanism=ledger.mechanism)
            replay = bool(ledger.attempts(config.run_id, config.server_round))
            if replay:
                log.warning("site %s: round %d of run %s was started before; training it again and "
                            "counting its privacy cost again", self.config.site, config.server_round, config.run_id)
            result = private_round(
                ledger, run_id=config.run_id, round=config.server_round, max_epsilon=privacy.max_epsilon,
                delta=delta, head=head, inputs=data.train.inputs, targets=data.train.targets,
                loss_fn=head_loss(config.task), epochs=config.local_epochs, batch_size=config.batch_size,
                lr=config.learning_rate, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm, task=config.task, replay=replay,
                patient_ids=data.train.patient_ids, device=self.config.device,
                seed=noise_seed(site_secret(self.config.state_dir), config, head_arrays, data.train.inputs),
                global_params=global_params, prox_mu=config.proximal_mu)
        except BudgetExceeded as exc:
            raise SiteRefused(f"site {self.config.site}: privacy budget: {exc}") from exc
        trained = result.head.cpu().state_dict()
        prefix = f"heads.{config.task}."
        arrays = heads_to_arrays({prefix + k: v for k, v in trained.items()}, config.task)
        metrics = {
            NUM_EXAMPLES: float(n), TRAIN_LOSS: float(result.loss), EPSILON: float(result.epsilon),
            DELTA: float(delta), NOISE_MULTIPLIER: float(result.noise_multiplier),
            STEPS: float(result.steps), SAMPLE_RATE: float(result.sample_rate),
        }
        log.info("site %s: round %d trained on %d patients, loss %.4f, epsilon %.3f / %.3f",
                 self.config.site, config.server_round, n, result.loss, result.epsilon, privacy.max_epsilon)
        return RoundReply(arrays, metrics)

    def evaluate(self, config: RoundConfig, head_arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        model = self.model(config.backbone_sha256)
        data = self.task_data(config.backbone_sha256, config.task)
        n = len(data.val)
        if n < self.config.min_cases_for_metrics:
            raise SiteRefused(f"site {self.config.site}: {n} validation patient(s) for task {config.task}; "
                              f"metrics over fewer than {self.config.min_cases_for_metrics} are not released")
        arrays_to_heads(model, head_arrays, config.task)
        metrics = evaluate_head(config.task, model.heads[config.task], data.val.inputs, data.val.targets)
        return {NUM_EXAMPLES: float(n), **metrics}


def parse_round_config(record: Mapping[str, Any]) -> RoundConfig:
    try:
        return RoundConfig.from_config_record(dict(record))
    except ProtocolError as exc:
        raise SiteRefused(f"round config refused: {exc}") from exc
