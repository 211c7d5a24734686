"""The base of every detector: windowed history, flag episodes, the `warn`/`stop`/`checkpoint` actions, and the
state a resumed run restores.

Detectors read the per-pair statistics the trainer already gathered across processes for each logging step (never an
extra forward): `statistics.PairStatistics.observe` hands each one the step's statistics through `observe()` before the
logs are dispatched, so the metrics reach TensorBoard/trackio/W&B and `trainer_state.json` like TRL's own; `on_log`
then acts on the flags. Decisions are made on identical gathered data on every process (so `stop` stops them all
together); warnings, reports and checkpoints happen on the main process only.
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

from ..metrics import DIAGNOSTICS_PREFIX, FLAG_PREFIX

logger = logging.getLogger(__name__)

ACTIONS = ("warn", "stop", "checkpoint")

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


def slope(values) -> float:
    """Least-squares slope of values against their index (per logging step)."""
    y = torch.tensor(list(values), dtype=torch.float64)
    if len(y) < 2:
        return 0.0
    x = torch.arange(len(y), dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def check_positive(name, value, allow_zero=False):
    """A threshold that can fire: a finite number > 0 (>= 0 with `allow_zero`); NaN or infinity never would."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0
            or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got "
                         f"{value!r} (a NaN or infinite threshold can never fire)")


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
            metrics[f"{FLAG_PREFIX}{flag.name}"] = 1.0
        self._last_metrics = {k if k.startswith(DIAGNOSTICS_PREFIX) else f"{DIAGNOSTICS_PREFIX}/{k}": v
                              for k, v in metrics.items()}
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


def restore_states(callbacks: list[DiagnosticCallback], stateful_callbacks: dict | None) -> None:
    """Each detector's saved state, from a checkpoint's `trainer_state.json` (`stateful_callbacks`), restored in
    place: a resumed run raises the same flags at the same steps as an uninterrupted one."""
    stored = stateful_callbacks or {}
    for callback in callbacks:
        data = stored.get(type(callback).__name__)
        data = data[0] if isinstance(data, list) else data
        if data and "saved_state" in data.get("attributes", {}):
            callback.saved_state = data["attributes"]["saved_state"]
            logger.info("Resumed %s from the checkpoint (step %s)", type(callback).__name__, callback._last_step)
