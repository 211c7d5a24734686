"""Diagnostic callbacks: reward margins, likelihood displacement, length bias.

They read the per-pair statistics `DPOPlusTrainer` already gathered across processes for each logging step (never an
extra forward). `DPOPlusTrainer.log` hands each callback the step's statistics through `observe()` before the logs are
dispatched, so the metrics reach TensorBoard/trackio/W&B and `trainer_state.json` like TRL's own; `on_log` then acts
on the flags. Decisions are made on identical gathered data on every process (so `stop` stops them all together);
warnings, reports and checkpoints happen on the main process only.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

ACTIONS = ("warn", "stop", "checkpoint")
PREFIX = "diagnostics"

REMEDIES = (
    "lower the learning rate; raise beta; add an NLL term (loss_type=['sigmoid', 'sft'] or 'rpo') or use 'dpop'; "
    "or switch to a length-normalised loss ('ipo', 'ln_dpo', 'simpo')"
)


@dataclass
class Flag:
    """One raised flag: which detector, at which step, why, and the numbers behind it."""

    detector: str
    name: str
    step: int
    message: str
    numbers: dict[str, float] = field(default_factory=dict)


def _slope(values) -> float:
    """Least-squares slope of values against their index (per logging step)."""
    y = torch.tensor(list(values), dtype=torch.float64)
    if len(y) < 2:
        return 0.0
    x = torch.arange(len(y), dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def _check_positive(name, value, allow_zero=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


class DiagnosticCallback(TrainerCallback, ExportableState):
    """Base class: windowed history, flag episodes, and the `warn`/`stop`/`checkpoint` actions.

    Its state (history window, open flag episodes) is saved in each checkpoint's `trainer_state.json`
    (`stateful_callbacks`, Transformers' `ExportableState`) and restored on `train(resume_from_checkpoint=...)`, so a
    resumed run raises the same flags at the same steps as an uninterrupted one. The `checkpoint` action's snapshot of
    healthy weights is not saved (it is a copy of the model); after a resume it is taken again at the next healthy log.
    """

    name = "diagnostic"
    needs: tuple[str, ...] = ()  # per-pair statistics this detector cannot work without
    remedies = REMEDIES
    # What the two sides are called in messages: the trainer sets ("desirable", "undesirable") for unpaired (KTO) data,
    # where the statistics' "chosen"/"rejected" are the completions labelled desirable/undesirable
    sides = ("chosen", "rejected")

    default_window = 5

    def __init__(self, *, window: int | None = None, action: str = "warn"):
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 2):
            raise ValueError(f"{type(self).__name__}: window must be an integer ≥ 2 logging steps, got {window!r}")
        if action not in ACTIONS:
            raise ValueError(f"{type(self).__name__}: unknown action {action!r}; choose one of {ACTIONS}")
        self._window_explicit = window is not None
        window = window or self.default_window
        self.window = window
        self.action = action
        self.history: deque[dict[str, float]] = deque(maxlen=window)
        self.disabled_reason: str | None = None
        self._active: set[str] = set()  # flags raised at the previous log: an episode lasts while they stay up
        self._pending: list[Flag] = []
        self._last_step: int | None = None
        self._last_metrics: dict[str, float] = {}
        self._healthy_snapshot: dict[str, torch.Tensor] | None = None

    # -- saved in checkpoints ----------------------------------------------------------------------------------
    def init_args(self) -> dict:
        """The constructor arguments that rebuild this callback (thresholds and action)."""
        return {"window": self.window if self._window_explicit else None, "action": self.action}

    def state(self) -> dict:
        return {"args": self.init_args(), "attributes": {"saved_state": self.saved_state}}

    @property
    def saved_state(self) -> dict:
        """What a resumed run needs to continue exactly: JSON-serialisable."""
        return {"window": self.window, "history": list(self.history), "active": sorted(self._active),
                "last_step": self._last_step, "last_metrics": self._last_metrics,
                "disabled_reason": self.disabled_reason}

    @saved_state.setter
    def saved_state(self, saved: dict) -> None:
        self.window = saved["window"]
        self.history = deque(saved["history"], maxlen=self.window)
        self._active = set(saved["active"])
        self._last_step, self._last_metrics = saved["last_step"], saved["last_metrics"]
        self.disabled_reason = saved["disabled_reason"]

    def reset(self) -> None:
        """Forget the history (thresholds stay): for a new run, or a one-off evaluation."""
        self.history.clear()
        self._active, self._pending = set(), []
        self._last_step, self._last_metrics = None, {}

    def observe_once(self, step: int, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics and flags of one set of statistics on its own (an evaluation), leaving this callback's state alone."""
        snapshot, self._healthy_snapshot = self._healthy_snapshot, None  # a model's weights: not worth copying
        try:
            fresh = copy.deepcopy(self)
        finally:
            self._healthy_snapshot = snapshot
        fresh.reset()
        return fresh.observe(step, stats, is_main=False)

    # -- called by DPOPlusTrainer.log, before the logs are dispatched ----------------------------------------
    def observe(self, step: int, stats: dict[str, torch.Tensor], is_main: bool) -> dict[str, float]:
        """Metrics for this logging step (idempotent per step). Raised flags are kept for `on_log`."""
        if step == self._last_step:
            return self._last_metrics
        self._last_step = step
        if self.disabled_reason is not None or not stats:
            return {}
        missing = [key for key in self.needs if key not in stats]
        if missing:
            self.disabled_reason = (f"needs {missing}, which this run does not produce (a reference-free loss has no "
                                    "log-ratios; unpaired data has no pairs whose lengths to compare)")
            if is_main:
                logger.info("%s switched off: %s", type(self).__name__, self.disabled_reason)
            return {}
        if any(stats[key].numel() == 0 for key in self.needs):  # e.g. no undesirable row since the last log
            return {}
        metrics, raised = self.evaluate(step, stats)
        new = [flag for flag in raised if flag.name not in self._active]
        self._active = {flag.name for flag in raised}
        self._pending = new
        for flag in raised:
            metrics[f"{PREFIX}/flag/{flag.name}"] = 1.0
        self._last_metrics = {f"{PREFIX}/{k}" if not k.startswith(PREFIX) else k: v for k, v in metrics.items()}
        return self._last_metrics

    def evaluate(self, step: int, stats: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[Flag]]:
        raise NotImplementedError

    # -- TrainerCallback -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        steps = state.max_steps or args.max_steps
        # As Transformers reads it: a fraction of the run below 1, else a step count (the CLI passes 1.0, a float).
        ratio = args.logging_steps
        logging_steps = max(1, math.ceil(ratio * steps) if ratio < 1 else int(ratio)) if steps and steps > 0 else 1
        logs = steps // logging_steps if steps and steps > 0 else None
        if logs is not None and self.window > logs:
            if self._window_explicit:
                raise ValueError(
                    f"{type(self).__name__}: window={self.window} logging steps is longer than the run, which logs "
                    f"{logs} times ({steps} steps, logging_steps={args.logging_steps}). Lower the window or log more "
                    "often."
                )
            self._resize(max(2, logs))  # the default window shrinks to fit a short run

    def _resize(self, window: int) -> None:
        self.window = window
        self.history = deque(self.history, maxlen=window)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        pending, self._pending = self._pending, []
        if not pending:
            if self.action == "checkpoint" and not self._active and model is not None:
                self._healthy_snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                self._healthy_step = state.global_step
            return control
        if state.is_world_process_zero:
            for flag in pending:
                numbers = ", ".join(f"{k}={v:.4g}" for k, v in flag.numbers.items())
                logger.warning("[step %d] %s: %s (%s). Remedies: %s.", flag.step, flag.name, flag.message, numbers,
                               self.remedies)
        if self.action in ("stop", "checkpoint"):
            if self.action == "checkpoint" and state.is_world_process_zero:
                self._save_healthy(args, model, kwargs.get("processing_class"))
            control.should_training_stop = True
        return control

    def _save_healthy(self, args, model, processing_class=None):
        if self._healthy_snapshot is None or model is None:
            logger.warning("%s: no healthy state was seen before the first flag; nothing to checkpoint", self.name)
            return
        from pathlib import Path

        path = Path(args.output_dir) / f"last-healthy-checkpoint-step-{self._healthy_step}"
        current = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.load_state_dict(self._healthy_snapshot)
        model.save_pretrained(path)
        model.load_state_dict(current)
        if processing_class is not None:  # the folder loads on its own, as a Trainer checkpoint does
            processing_class.save_pretrained(path)
        logger.warning("%s: saved the last healthy model (step %d) to %s", self.name, self._healthy_step, path)


class RewardMarginCallback(DiagnosticCallback):
    """Reward margins per logging step: mean, p10/p50/p90, accuracy, and the trend of the mean over the window.

    Margins are the first loss's rewards, chosen − rejected, per pair. The trend is the least-squares slope of the
    mean margin per logging step over the last `window` logs. It flags nothing: it is what the other detectors and the
    report read.
    """

    name = "reward_margin"
    needs = ("margin",)

    def evaluate(self, step, stats):
        margin = stats["margin"].double()
        q = torch.quantile(margin, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        row = {"margin/mean": margin.mean().item(), "margin/p10": q[0].item(), "margin/p50": q[1].item(),
               "margin/p90": q[2].item(), "margin/accuracy": (margin > 0).double().mean().item()}
        self.history.append(row)
        row["margin/trend"] = _slope(h["margin/mean"] for h in self.history)
        return row, []


class LikelihoodDisplacementCallback(DiagnosticCallback):
    """Catches likelihood displacement: DPO pushing rejected log-probs down far faster than it lifts chosen ones.

    Reads the per-token (length-normalised) policy − reference log-ratios of chosen and rejected completions,
    averaged over the pairs of each logging step, and flags:

    - `both_falling`: the chosen log-ratio is below −`chosen_drop` nats/token and falling over the window while the
      margin grows: the "reward" is rising because both likelihoods fall, the rejected faster.
    - `rejected_collapse`: the rejected log-ratio is below −`rejected_collapse` nats/token (default 1.5: rejected
      tokens e^1.5 ≈ 4.5× less likely than under the reference).
    - `rejected_driven`: over the window the rejected log-ratio moved more than `rejected_ratio` times as much as the
      chosen one (and by at least `min_change` nats/token) while the margin grew.

    Args:
        window: logging steps over which trends are measured (≥ 2); default 5, shrunk to fit a shorter run.
        chosen_drop: nats/token below the reference the chosen side may fall before `both_falling` can fire.
        rejected_collapse: nats/token below the reference at which the rejected side counts as collapsed.
        rejected_ratio: |Δ rejected| / |Δ chosen| over the window above which growth counts as rejected-driven.
        min_change: smallest |Δ rejected| over the window (nats/token) for `rejected_driven` to be considered.
        action: `warn` (log once per episode), `stop`, or `checkpoint` (save the last healthy model, then stop).
    """

    name = "likelihood_displacement"
    needs = ("chosen_logratio_per_token", "rejected_logratio_per_token", "margin")

    def __init__(self, *, window: int | None = None, chosen_drop: float = 0.1, rejected_collapse: float = 1.5,
                 rejected_ratio: float = 4.0, min_change: float = 0.1, action: str = "warn"):
        super().__init__(window=window, action=action)
        for name, value in (("chosen_drop", chosen_drop), ("rejected_collapse", rejected_collapse),
                            ("rejected_ratio", rejected_ratio), ("min_change", min_change)):
            _check_positive(f"LikelihoodDisplacementCallback: {name}", value, allow_zero=name == "chosen_drop")
        self.chosen_drop, self.rejected_collapse = chosen_drop, rejected_collapse
        self.rejected_ratio, self.min_change = rejected_ratio, min_change

    def init_args(self) -> dict:
        return {**super().init_args(), "chosen_drop": self.chosen_drop, "rejected_collapse": self.rejected_collapse,
                "rejected_ratio": self.rejected_ratio, "min_change": self.min_change}

    def evaluate(self, step, stats):
        row = {
            "displacement/chosen_logratio": stats["chosen_logratio_per_token"].double().mean().item(),
            "displacement/rejected_logratio": stats["rejected_logratio_per_token"].double().mean().item(),
            "displacement/margin": stats["margin"].double().mean().item(),
        }
        self.history.append(row)
        chosen = [h["displacement/chosen_logratio"] for h in self.history]
        rejected = [h["displacement/rejected_logratio"] for h in self.history]
        margin = [h["displacement/margin"] for h in self.history]
        d_chosen, d_rejected, d_margin = chosen[-1] - chosen[0], rejected[-1] - rejected[0], margin[-1] - margin[0]
        ratio = abs(d_rejected) / max(abs(d_chosen), 1e-8)
        metrics = {**row, "displacement/rejected_to_chosen_ratio": min(ratio, 1e6)}
        full = len(self.history) == self.window
        numbers = {"chosen_logratio": chosen[-1], "rejected_logratio": rejected[-1],
                   "d_chosen": d_chosen, "d_rejected": d_rejected, "d_margin": d_margin, "ratio": ratio}
        flags = []
        good, bad = self.sides
        if full and chosen[-1] < -self.chosen_drop and _slope(chosen) < 0 and _slope(margin) > 0:
            flags.append(Flag(self.name, "both_falling", step,
                              f"{good} log-probs are falling below the reference while the margin grows", numbers))
        if rejected[-1] < -self.rejected_collapse:
            flags.append(Flag(self.name, "rejected_collapse", step,
                              f"{bad} per-token log-ratio {rejected[-1]:.3f} < −{self.rejected_collapse}", numbers))
        if full and d_margin > 0 and abs(d_rejected) >= self.min_change and ratio > self.rejected_ratio:
            flags.append(Flag(self.name, "rejected_driven", step,
                              f"margin growth is driven by the {bad} side ({ratio:.1f}× the {good} change)", numbers))
        return metrics, flags


class LengthBiasCallback(DiagnosticCallback):
    """Flags margins explained by length: R² of per-pair margin against chosen − rejected length.

    Pools the pairs of the last `window` logging steps; logs the Pearson correlation, R², the share of pairs whose
    chosen completion is longer, and flags `length_exploitation` when R² > `max_r2` with a positive correlation and at
    least `min_pairs` pairs.
    """

    name = "length_bias"
    needs = ("margin", "chosen_len", "rejected_len")

    def __init__(self, *, window: int | None = None, max_r2: float = 0.5, min_pairs: int = 32, action: str = "warn"):
        super().__init__(window=window, action=action)
        if not isinstance(max_r2, (int, float)) or not 0 < max_r2 < 1:
            raise ValueError(f"LengthBiasCallback: max_r2 must lie in (0, 1), got {max_r2!r}")
        if not isinstance(min_pairs, int) or min_pairs < 3:
            raise ValueError(f"LengthBiasCallback: min_pairs must be an integer ≥ 3, got {min_pairs!r}")
        self.max_r2, self.min_pairs = max_r2, min_pairs
        self._pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.window)

    def init_args(self) -> dict:
        return {**super().init_args(), "max_r2": self.max_r2, "min_pairs": self.min_pairs}

    @property
    def saved_state(self) -> dict:
        pairs = [[m.tolist(), g.tolist()] for m, g in self._pairs]
        return {**DiagnosticCallback.saved_state.fget(self), "pairs": pairs}

    @saved_state.setter
    def saved_state(self, saved: dict) -> None:
        DiagnosticCallback.saved_state.fset(self, saved)
        pairs = [(torch.tensor(m, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)) for m, g in saved["pairs"]]
        self._pairs = deque(pairs, maxlen=self.window)

    def reset(self) -> None:
        super().reset()
        self._pairs.clear()

    def _resize(self, window: int) -> None:
        super()._resize(window)
        self._pairs = deque(self._pairs, maxlen=window)

    def evaluate(self, step, stats):
        self._pairs.append((stats["margin"].double(), (stats["chosen_len"] - stats["rejected_len"]).double()))
        margin = torch.cat([m for m, _ in self._pairs])
        length_gap = torch.cat([g for _, g in self._pairs])
        corr = 0.0
        if margin.std() > 0 and length_gap.std() > 0:
            corr = torch.corrcoef(torch.stack([margin, length_gap]))[0, 1].item()
        metrics = {"length/corr": corr, "length/r2": corr * corr,
                   "length/chosen_longer": (length_gap > 0).double().mean().item()}
        flags = []
        if len(margin) >= self.min_pairs and corr > 0 and corr * corr > self.max_r2:
            flags.append(Flag(self.name, "length_exploitation", step,
                              f"length explains {corr * corr:.0%} of the margin's variance",
                              {"corr": corr, "r2": corr * corr, "pairs": float(len(margin))}))
        return metrics, flags


class NonFiniteCallback(DiagnosticCallback):
    """Flags `nonfinite` at the step where the loss, the policy or reference log-probs, or a gradient first stops
    being finite, naming which.

    The trainer records whether each micro-batch's loss and log-probs were finite (`record`); this callback checks
    the gradients after clipping and before the optimizer step, and agrees across processes. With `stop` or
    `checkpoint` it drops that step's gradients, so the optimizer skips the update and the weights stay finite, and
    training stops there; with `warn` it logs the flag once per episode and training goes on. The step is always
    logged, so the flag carries its own step (Transformers' NaN filter would otherwise hide a NaN loss in the average).
    """

    name = "nonfinite"
    QUANTITIES = ("loss", "policy_logps", "reference_logps", "gradients")
    remedies = (
        "lower the learning rate (or raise warmup); keep max_grad_norm > 0; train in float32 or bf16 rather than fp16; "
        "check the model's weights and the loss_weights/loss_kwargs for NaN or Infinity; set "
        "diagnostics_action='stop' to stop before a non-finite update reaches the weights"
    )

    def __init__(self, *, action: str = "warn"):
        super().__init__(window=2, action=action)
        self._window_explicit = False  # two logs at most; a shorter run shrinks it instead of refusing
        self._step_checks: torch.Tensor | None = None  # per quantity: True while everything this step was finite
        self._seen: dict[str, int] = {}  # quantity -> first step it was non-finite, since the last log

    def record(self, loss: torch.Tensor, policy_logps: torch.Tensor, reference_logps: torch.Tensor | None) -> None:
        """Called by the trainer for every training micro-batch (no device sync here)."""
        ref_ok = reference_logps.isfinite().all() if reference_logps is not None else loss.new_ones((), dtype=torch.bool)
        checks = torch.stack([loss.detach().isfinite().all(), policy_logps.detach().isfinite().all(), ref_ok])
        self._step_checks = checks if self._step_checks is None else self._step_checks & checks

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        checks, self._step_checks = self._step_checks, None
        if checks is None:
            return control
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        grads_ok = torch.stack([g.isfinite().all() for g in grads]).all().to(checks.device) if grads else checks[0]
        bad = (~torch.cat([checks, grads_ok.reshape(1)])).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        names = [q for q, b in zip(self.QUANTITIES, bad.tolist()) if b > 0]
        if not names:
            return control
        step = state.global_step + 1  # the step being taken
        for name in names:
            self._seen.setdefault(name, step)
        if self.action != "warn" or "nonfinite" not in self._active:
            control.should_log = True  # log the step where an episode starts, so the flag carries its step
        if self.action in ("stop", "checkpoint"):
            for p in model.parameters():  # no update from this step: the weights stay as they were
                p.grad = None
            control.should_training_stop = True
        return control

    def init_args(self) -> dict:
        return {"action": self.action}  # its window is fixed

    def evaluate(self, step, stats):
        seen, self._seen = self._seen, {}
        metrics = {f"nonfinite/{q}": float(q in seen) for q in self.QUANTITIES}
        if not seen:
            return metrics, []
        first = min(seen.values())
        return metrics, [Flag(self.name, "nonfinite", first, f"non-finite {', '.join(seen)} at step {first}",
                              {"first_step": float(first)})]

    def _save_healthy(self, args, model, processing_class=None):
        if self._healthy_snapshot is None and model is not None:  # the update was skipped: these weights are finite
            self._healthy_snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self._healthy_step = self._last_step or 0
        super()._save_healthy(args, model)


def default_callbacks(action: str = "warn") -> list[DiagnosticCallback]:
    return [RewardMarginCallback(action=action), LikelihoodDisplacementCallback(action=action),
            LengthBiasCallback(action=action), NonFiniteCallback(action=action)]
