"""An empirical privacy audit of a site's own DP training: attack what leaves, bound epsilon from below.

`run_audit` plays a coordinator that got M synthetic canaries into a site's training set,
each with probability 1/2, and then tries to tell from the replies alone (the released
head weights and metrics) which ones were in. The number of correct guesses gives a lower
bound on epsilon at a stated confidence (`one_run_bound`, Steinke, Nasr, Jagielski 2023).
A lower bound above the ledger's epsilon proves a leak; one below it proves nothing more
than that this attack did not find one.

What runs is the site's own path: `SiteAgent.train` (incoming-head checks, planning from
the site's YAML budget, `private_round` with Opacus' clipping, noise and accountant) on the
site's real training patients plus the included canaries, and every reply goes through the
outbox gate. It runs on a temporary state dir with its own ledger and audit log: the
site's real ledger is never opened, and nothing is sent anywhere.

The attack (white box, as in Nasr et al. 2023, "Tight Auditing of DP ML"): the coordinator
chooses the head it sends. The audit head's frozen layers map every natural feature vector
to (almost) zero and the trained output layer starts at zero, so a patient's gradient lives
in the output layer's bias alone; each canary is a feature vector crafted (by inverting the
frozen layers) so that its gradient is one column of one label group: a near-Dirac gradient
canary. With one full-batch step the released update is the clipped-gradient sum of the
included canaries plus the Gaussian noise, and least squares on the canary directions
decodes membership. Several releases of one round (a coordinator's replays) are combined
twice: as independent noise (weighted mean) and as one noise vector under re-planned
sigmas (the regression that cancels it): that second statistic is what finds noise reuse.

Test-only switches (`_noise_scale`, `_noise_seed`) exist only as keyword arguments of
`run_audit`: no site YAML, message or CLI flag reaches them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from client.features import SiteTaskData, TaskSplit
from client.privacy.ledger import PrivacyLedger
from client.privacy.one_run_bound import epsilon_lower_bound
from client.privacy.outbox import OutboxPolicy, check_outgoing
from client.site_config import SiteConfig
from pasta_model.finetune import head_loss, output_layer_only
from pasta_model.heads import DETECT_OUTPUTS, REPORT_OUTPUTS
from pasta_model.losses import IGNORE_INDEX
from pasta_model.protocol import EPSILON, NOISE_MULTIPLIER, NUM_EXAMPLES, SAMPLE_RATE, RoundConfig

log = logging.getLogger(__name__)

AUDIT_TASKS = ("report", "stage", "detect")
GUESS_FRACTIONS = (1.0, 0.5, 0.2, 0.05)   # share of canaries guessed (the rest abstained), tested together
CANARY_NORM = 30.0                         # hidden-layer norm of a canary: its gradient is ~all weight, little bias
MAX_BATCH = 1024                           # the protocol's largest batch: up to this, one step sees every row
RUN_ID = "privacy-audit"
CONSISTENT = "consistent with the claim"
LEAKS = "the implementation leaks more than it claims"


class AuditError(RuntimeError):
    """The audit cannot run as asked (the message names the file or setting)."""


class GuessTest(TypedDict):
    """One (statistic, guess fraction) test of an audit and the bound it gave."""
    statistic: str
    guess_fraction: float
    guesses: int
    correct: int
    epsilon_lower_bound: float


# ----------------------------------------------------------------------------- the audit head
_SLOPE = 0.01        # LeakyReLU's negative slope in the heads (pasta_model.heads.LEAKY_SLOPE)
_FIRST_SCALE = 1e-3  # first frozen layer: x -> 1e-3 x - 1, so natural inputs sit on the negative branch
_MARGIN = 1e-3       # natural pre-activations of later layers sit this far below zero


def _leaky_inv(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y >= 0, y, y / _SLOPE)


def _linears(head: nn.Module) -> list[nn.Linear]:
    """The head's Linear layers; the audit needs an MLP (report/stage/detect) that does not widen."""
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(layers) < 2 or any(isinstance(m, nn.Conv3d) for m in head.modules()):
        raise AuditError("the audit needs an MLP head (Linear layers with LeakyReLU), as for report/stage/detect")
    widths = [layers[0].in_features] + [m.out_features for m in layers[:-1]]
    if any(b > a for a, b in zip(widths, widths[1:])):
        raise AuditError(f"the audit head needs non-increasing hidden widths, this head has {widths}")
    return layers


def _natural(layer_index: int) -> float:
    """Activation after frozen layer `layer_index` of `audit_head` for a natural (near-zero) input."""
    return -_SLOPE if layer_index == 0 else -_SLOPE * _MARGIN


@torch.no_grad()
def audit_head(head: nn.Module) -> nn.Module:
    """A head the coordinator could send: frozen layers that squash natural features to ~0, output layer 0."""
    head = copy.deepcopy(head)
    layers = _linears(head)
    for i, lin in enumerate(layers[:-1]):
        eye = torch.eye(lin.out_features, lin.in_features)
        if i == 0:                                  # x -> LeakyReLU(1e-3 x - 1) = -0.01 for x ~ 0
            lin.weight.copy_(_FIRST_SCALE * eye)
            lin.bias.fill_(-1.0)
        else:                                       # the natural activation, shifted just below zero
            lin.weight.copy_(eye)
            lin.bias.fill_(-_natural(i - 1) - _MARGIN)
    layers[-1].weight.zero_()
    layers[-1].bias.zero_()
    return head


@torch.no_grad()
def canary_inputs(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Feature vectors whose last hidden activation under `audit_head` is `hidden` (exact inversion)."""
    frozen = _linears(head)[:-1]
    act = hidden.double()
    for index in range(len(frozen) - 1, -1, -1):
        lin = frozen[index]
        pre = _leaky_inv(act)[:, :lin.out_features] - lin.bias.double()
        below = torch.full((act.shape[0], lin.in_features), 0.0 if index == 0 else _natural(index - 1),
                           dtype=torch.float64)
        below[:, :lin.out_features] = pre / (_FIRST_SCALE if index == 0 else 1.0)
        act = below
    return act.float()


# ----------------------------------------------------------------------------- canaries
def _label_slots(task: str) -> list[tuple[str, int]]:
    """(target key, label) pairs whose gradients are linearly independent: n-1 classes per softmax group."""
    if task == "report":
        return [(name, c) for name, n in REPORT_OUTPUTS.items() for c in range(n - 1)]
    if task == "stage":
        return [("stage", c) for c in range(3)]
    if task == "detect":
        return [("detect", k) for k in range(len(DETECT_OUTPUTS))]
    raise AuditError(f"task {task!r} cannot be audited; auditable tasks: {', '.join(AUDIT_TASKS)}")


def _canary_targets(task: str, slots: Sequence[tuple[str, int]], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    m = len(slots)
    if task == "detect":
        target, weight = torch.zeros(m, len(DETECT_OUTPUTS)), torch.zeros(m, len(DETECT_OUTPUTS))
        for i, (_, k) in enumerate(slots):
            target[i, k], weight[i, k] = 1.0, 1.0
        return {"detect": target, "weight": weight}
    out = {k: torch.full((m,), IGNORE_INDEX, dtype=torch.long) for k in keys}
    for i, (key, c) in enumerate(slots):
        out[key][i] = c
    return out


@dataclass
class Canaries:
    inputs: torch.Tensor                  # [M, features]: what is added to the training rows
    targets: dict[str, torch.Tensor]
    directions: np.ndarray                # [weights, M]: each canary's clipped gradient (output-layer weights)


def make_canaries(task: str, head: nn.Module, m: int, target_keys: Sequence[str], rng: np.random.Generator
                  ) -> Canaries:
    """M canaries for `audit_head(head)`: a column e_j per label slot while they last, then random columns."""
    slots = _label_slots(task)
    hidden_width = _linears(head)[-1].in_features
    hidden = torch.zeros(m, hidden_width)
    chosen = []
    for i in range(m):
        if i < len(slots) * hidden_width:
            chosen.append(slots[i % len(slots)])
            hidden[i, i // len(slots)] = CANARY_NORM
        else:
            chosen.append(slots[int(rng.integers(len(slots)))])
            v = torch.from_numpy(rng.standard_normal(hidden_width)).float()
            hidden[i] = CANARY_NORM * v / v.norm()
    inputs = canary_inputs(head, hidden)
    targets = _canary_targets(task, chosen, target_keys)
    return Canaries(inputs, targets, canary_directions(task, head, inputs, targets))


def canary_directions(task: str, head: nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor]
                      ) -> np.ndarray:
    """Each canary's gradient at the sent head, normalised (clipping keeps the direction), weights only."""
    trained = output_layer_only(copy.deepcopy(head))
    last = _linears(trained)[-1]
    loss_fn = head_loss(task)
    cols = []
    for i in range(inputs.shape[0]):
        trained.zero_grad(set_to_none=True)
        loss_fn(trained(inputs[i:i + 1]), {k: v[i:i + 1] for k, v in targets.items()}).backward()
        if last.weight.grad is None or last.bias.grad is None:
            raise AuditError(f"task {task!r}: the canary loss gives the head's output layer no gradient")
        g_w, g_b = last.weight.grad.detach().flatten(), last.bias.grad.detach()
        norm = math.sqrt(float(g_w.square().sum() + g_b.square().sum()))
        cols.append((g_w / max(norm, 1e-12)).double().numpy())
    return np.stack(cols, axis=1)


# ----------------------------------------------------------------------------- the site's own path
def _augmented(data: SiteTaskData, canaries: Canaries, members: np.ndarray) -> SiteTaskData:
    idx = np.flatnonzero(members)
    train = data.train
    inputs = torch.cat([train.inputs.float(), canaries.inputs[idx]])
    targets = {k: torch.cat([train.targets[k], canaries.targets[k][idx].to(train.targets[k].dtype)])
               for k in train.targets}
    ids = [f"audit-canary-{i:05d}" for i in idx]
    split = TaskSplit(inputs, targets, list(train.patient_ids) + ids, list(train.case_ids) + ids)
    return SiteTaskData(data.task, split, data.val, dict(data.skipped))


def _audit_agent(config: SiteConfig, data: SiteTaskData, backbone: str, model: nn.Module,
                 noise_seed: int | None):
    from client.task import SiteAgent

    class AuditAgent(SiteAgent):
        """The site's agent on the audit's state dir, training on patients plus the included canaries
        (with the backbone the site already loaded: the audit's state dir has no installed ones)."""

        def model(self, sha256: str):
            if sha256 != backbone:
                raise AuditError(f"audit agent asked for backbone {sha256[:12]}..., the audit uses {backbone[:12]}...")
            return model

        def task_data(self, sha256: str, task: str) -> SiteTaskData:
            if (sha256, task) != (backbone, data.task):
                raise AuditError(f"audit agent asked for {task} on {sha256[:12]}...")
            return data

    return AuditAgent(config, noise_seed=noise_seed)


@contextlib.contextmanager
def _scaled_noise(factor: float) -> Iterator[None]:
    """Test-only: scale the Gaussian noise Opacus adds (0: DP off) while the ledger still charges the plan."""
    if factor == 1.0:
        yield
        return
    from opacus.optimizers import optimizer as opacus_optimizer
    original = opacus_optimizer._generate_noise

    def scaled(std, reference, generator=None, secure_mode=False):
        return original(std=std * factor, reference=reference, generator=generator, secure_mode=secure_mode)

    opacus_optimizer._generate_noise = scaled
    log.warning("privacy audit: Opacus noise scaled by %g (a test switch: the claim no longer holds)", factor)
    try:
        yield
    finally:
        opacus_optimizer._generate_noise = original


# ----------------------------------------------------------------------------- guessing
def _released_update(arrays: dict[str, np.ndarray], sent: dict[str, np.ndarray], weight_key: str,
                     metrics: dict[str, float], lr: float) -> np.ndarray:
    """The output layer's step in gradient-sum units: -(released - sent) * expected batch / lr."""
    expected_batch = int(metrics[NUM_EXAMPLES] * metrics[SAMPLE_RATE])
    step = np.asarray(arrays[weight_key], dtype=np.float64) - np.asarray(sent[weight_key], dtype=np.float64)
    return -step.ravel() * expected_batch / lr


def combined_updates(updates: Sequence[np.ndarray], sigmas: Sequence[float]) -> dict[str, np.ndarray]:
    """The statistics the auditor decodes: one release as is; several as independent noise (weighted
    mean) and, when the sigmas differ, as one noise vector under changing sigma (its regression)."""
    if len(updates) == 1:
        return {"release": updates[0]}
    y = np.stack(updates)
    s = np.asarray(sigmas, dtype=np.float64)
    w = 1.0 / np.maximum(s, 1e-12) ** 2
    out = {"independent-noise mean": (w[:, None] * y).sum(0) / w.sum()}
    if np.ptp(s) > 1e-9 * max(1.0, float(s.max())):
        design = np.stack([np.ones_like(s), s], axis=1)            # y_k = G + sigma_k * Z
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        out["shared-noise regression"] = coef[0]
    return out


def decode(directions: np.ndarray, update: np.ndarray) -> np.ndarray:
    """Membership scores (about 1 for an included canary, 0 for one left out): least squares on the
    canary directions; box-constrained to [0, 1] when there are more canaries than independent
    directions (a 0/1 vector is still recoverable there, an unconstrained one is not)."""
    if np.linalg.matrix_rank(directions) == directions.shape[1]:
        return np.linalg.lstsq(directions, update, rcond=None)[0]
    from scipy.optimize import lsq_linear
    x = lsq_linear(directions, update, bounds=(0.0, 1.0)).x
    # a canary held at a bound gets the value it would take alone (the others fixed): how hard it
    # pushes against the bound, so that saturated canaries are still ranked by evidence
    pull = directions.T @ (update - directions @ x) / np.maximum((directions ** 2).sum(0), 1e-12)
    return x + pull


def split_threshold(scores: np.ndarray, iterations: int = 50) -> float:
    """The score between the two clusters (1-D two-means from the median): output-only, no labels."""
    t = float(np.median(scores))
    for _ in range(iterations):
        high, low = scores[scores > t], scores[scores <= t]
        if not len(high) or not len(low):
            break
        new = float(high.mean() + low.mean()) / 2
        if new == t:
            break
        t = new
    return t


def guess_tests(scores: np.ndarray, members: np.ndarray, fractions: Sequence[float] = GUESS_FRACTIONS
                ) -> list[tuple[float, int, int]]:
    """(fraction, r, correct): guess on the r canaries farthest from the split ('in' above it), abstain
    on the rest. Guesses use the scores alone; `members` only counts them."""
    t = split_threshold(scores)
    order = np.argsort(-np.abs(scores - t), kind="stable")
    guess_in = scores > t
    out = []
    for f in fractions:
        r = min(len(scores), max(1, int(round(f * len(scores)))))
        chosen = order[:r]
        out.append((f, r, int((guess_in[chosen] == members[chosen].astype(bool)).sum())))
    return out


# ----------------------------------------------------------------------------- result
@dataclass
class AuditResult:
    site: str
    task: str
    canaries: int
    included: int
    releases: int
    guesses: int
    correct: int
    confidence: float
    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    noise_multipliers: list[float]
    statistic: str
    verdict: str
    seconds: float
    tests: list[GuessTest] = field(default_factory=list)
    scores: np.ndarray | None = field(default=None, repr=False)
    members: np.ndarray | None = field(default=None, repr=False)

    @property
    def leaks(self) -> bool:
        return self.verdict == LEAKS

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("scores", "members")}

    def text(self) -> str:
        return (f"privacy audit of site {self.site}, task {self.task}: {self.canaries} canaries "
                f"({self.included} included), {self.releases} release(s)\n"
                f"  correct guesses {self.correct} of {self.guesses} ({self.statistic})\n"
                f"  epsilon lower bound {self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence; "
                f"the ledger claims epsilon {self.claimed_epsilon:.3f} (delta {self.delta:g})\n"
                f"  verdict: {self.verdict}")


def write_json(result: AuditResult, path: Path) -> Path:
    from synth.atomic import write_atomic
    write_atomic(Path(path), json.dumps(result.summary(), indent=2) + "\n")
    return Path(path)


def plot_scores(result: AuditResult, path: Path) -> Path:
    """Histogram of the canary scores, included vs left out: the separation the bound comes from."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if result.scores is None or result.members is None:
        raise AuditError(f"audit of site {result.site}: no canary scores to plot")
    s, m = result.scores, result.members.astype(bool)
    bins = np.linspace(float(np.min(s)), float(np.max(s)) + 1e-9, 50).tolist()
    ax.hist(s[m], bins=bins, alpha=0.6, label=f"included ({int(m.sum())})")
    ax.hist(s[~m], bins=bins, alpha=0.6, label=f"left out ({int((~m).sum())})")
    ax.set_xlabel(f"canary score ({result.statistic})")
    ax.set_ylabel("canaries")
    ax.set_title(f"{result.task}: eps >= {result.epsilon_lower_bound:.2f} (claimed {result.claimed_epsilon:.2f})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the audit
def _backbone_sha(config: SiteConfig, backbone: str | None) -> str:
    from pasta_model.checkpoint import read_meta
    if backbone:
        return backbone
    if config.backbone is not None:
        if not Path(config.backbone).exists():
            raise AuditError(f"{config.source or 'site config'}: backbone {config.backbone} does not exist")
        return read_meta(config.backbone).backbone_sha256
    installed = sorted((Path(config.state_dir) / "backbones").glob("*.safetensors"))
    if len(installed) != 1:
        raise AuditError(f"{config.source or 'site config'}: no 'backbone' set and {len(installed)} backbones "
                         f"installed under {Path(config.state_dir) / 'backbones'}; name one with --backbone")
    return installed[0].name.removesuffix(".safetensors")


def run_audit(config: SiteConfig, *, task: str = "report", canaries: int = 1000, releases: int = 1,
              confidence: float = 0.95, backbone: str | None = None, learning_rate: float = 1.0,
              local_epochs: int = 1, seed: int | None = None, work_dir: Path | None = None,
              _noise_scale: float = 1.0, _noise_seed: int | None = None) -> AuditResult:
    """Audit the site's DP training with `canaries` canaries over `releases` releases of one round.

    `seed` fixes only the canaries' membership draw (the site's noise stays fresh);
    `_noise_scale` and `_noise_seed` are test switches that break the guarantee on purpose.
    """
    t0 = time.perf_counter()
    if task not in AUDIT_TASKS:
        raise AuditError(f"task {task!r} cannot be audited; auditable tasks: {', '.join(AUDIT_TASKS)}")
    if canaries < 2 or releases < 1:
        raise AuditError(f"need at least 2 canaries and 1 release, got {canaries} and {releases}")
    from client.task import SiteAgent, SiteRefused
    from pasta_model.protocol import heads_to_arrays

    sha = _backbone_sha(config, backbone)
    site = SiteAgent(config)                        # reads backbone and feature cache; no ledger
    data = site.task_data(sha, task)
    sent_head = audit_head(site.model(sha).heads[task])
    rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    design = make_canaries(task, sent_head, canaries, list(data.train.targets), rng)
    members = rng.integers(0, 2, canaries).astype(np.int64)
    augmented = _augmented(data, design, members)
    prefix = f"heads.{task}."
    sent = heads_to_arrays({prefix + k: v for k, v in sent_head.state_dict().items()}, task)
    weight_key = prefix + next(n for n, p in output_layer_only(copy.deepcopy(sent_head)).named_parameters()
                               if p.requires_grad and p.ndim == 2)
    n = len(augmented.train)
    round_config = RoundConfig(server_round=1, task=task, local_epochs=local_epochs, learning_rate=learning_rate,
                               batch_size=min(n, MAX_BATCH), backbone_sha256=sha, dp_delta=config.privacy.delta,
                               planned_rounds=releases, run_id=RUN_ID)
    policy = OutboxPolicy(task=task, min_cases=config.min_cases_for_metrics)
    shapes = {k: v.shape for k, v in sent.items()}

    with contextlib.ExitStack() as stack:
        state = Path(work_dir) if work_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="pasta-fed-audit-")))
        if state.resolve() == Path(config.state_dir).resolve():
            raise AuditError(f"the audit's state dir must not be the site's ({config.state_dir})")
        audit_config = dataclasses.replace(config, state_dir=state)
        agent = _audit_agent(audit_config, augmented, sha, copy.deepcopy(site.model(sha)), _noise_seed)
        updates, sigmas, claimed, delta = [], [], 0.0, config.privacy.delta
        with _scaled_noise(_noise_scale):
            for k in tqdm(range(releases), desc="audit releases", disable=releases == 1):
                try:
                    reply = agent.train(round_config, sent)
                except SiteRefused as exc:
                    raise AuditError(f"{config.source or config.site}: the site refused the audit's round "
                                     f"(code {exc.code}): {exc}") from exc
                check_outgoing(reply.arrays, reply.metrics, policy, expected_shapes=shapes)  # what would leave
                updates.append(_released_update(reply.arrays, sent, weight_key, reply.metrics, learning_rate))
                sigmas.append(float(reply.metrics[NOISE_MULTIPLIER]))
                claimed = float(reply.metrics[EPSILON])
                log.info("privacy audit: release %d/%d, sigma %.3f, claimed epsilon %.3f",
                         k + 1, releases, sigmas[-1], claimed)
        ledger_eps = PrivacyLedger.open_site(state).epsilon(delta)
        if abs(ledger_eps - claimed) > 1e-9 * max(1.0, claimed):
            raise AuditError(f"audit ledger {state} says epsilon {ledger_eps}, the reply said {claimed}")

    statistics = combined_updates(updates, sigmas)
    n_tests = len(statistics) * len(GUESS_FRACTIONS)
    level_confidence = 1.0 - (1.0 - confidence) / n_tests          # Bonferroni over every test tried
    tests: list[GuessTest] = []
    best: tuple[GuessTest, np.ndarray] | None = None
    for name, update in statistics.items():
        scores = decode(design.directions, update)
        for fraction, r, v in guess_tests(scores, members):
            eps = epsilon_lower_bound(canaries, r, v, delta, level_confidence)
            tests.append(GuessTest(statistic=name, guess_fraction=fraction, guesses=r, correct=v,
                                   epsilon_lower_bound=eps))
            if best is None or eps > best[0]["epsilon_lower_bound"]:
                best = (tests[-1], scores)
    if best is None:
        raise AuditError(f"audit of site {config.site}: no release statistic to test")
    top, scores = best
    bound = top["epsilon_lower_bound"]
    result = AuditResult(
        site=config.site, task=task, canaries=canaries, included=int(members.sum()), releases=releases,
        guesses=top["guesses"], correct=top["correct"], confidence=confidence, epsilon_lower_bound=bound,
        claimed_epsilon=claimed, delta=delta, noise_multipliers=sigmas, statistic=top["statistic"],
        verdict=LEAKS if bound > claimed else CONSISTENT, seconds=time.perf_counter() - t0, tests=tests,
        scores=scores, members=members)
    log.info("privacy audit: %s", result.text().replace("\n", ";"))
    return result


__all__ = ["run_audit", "AuditResult", "AuditError", "audit_head", "canary_inputs", "make_canaries",
           "combined_updates", "decode", "guess_tests", "plot_scores", "write_json", "CONSISTENT", "LEAKS"]
