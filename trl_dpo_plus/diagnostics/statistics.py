"""The per-pair statistics the detectors read, buffered per mode between logs, and the per-step finiteness record.

The trainer adds each batch's gathered per-pair (or, for unpaired data, per-row) statistics with `add`, and records
whether each training micro-batch's loss and log-probs were finite with `record_finite`; at each log, `observe` hands
the concatenated statistics to every detector and returns their metrics for the log.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from .base import DiagnosticCallback
from .nonfinite import NonFiniteCallback

MODES = ("train", "eval")


class PairStatistics:
    """Args:
        callbacks: the diagnostics callbacks in use, looked up at each call (a resume may replace callback objects).
    """

    def __init__(self, callbacks: Callable[[], list[DiagnosticCallback]]):
        self._callbacks = callbacks
        self._buffer = {mode: defaultdict(list) for mode in MODES}
        self.last: dict[str, torch.Tensor] = {}  # what the detectors read at the last log

    def add(self, mode: str, per_pair: dict[str, torch.Tensor]) -> None:
        for key, value in per_pair.items():
            self._buffer[mode][key].append(value.detach().cpu())

    def take(self, mode: str) -> dict[str, torch.Tensor]:
        """The statistics gathered since the last log, concatenated; the buffer starts again."""
        stats = {key: torch.cat(values) for key, values in self._buffer[mode].items() if values}
        self._buffer[mode].clear()
        return stats

    def record_finite(self, loss: torch.Tensor, policy_logps: torch.Tensor, reference: torch.Tensor | None) -> None:
        """Whether this training micro-batch's loss and log-probs were finite (read at the optimizer step)."""
        loss = loss if torch.is_tensor(loss) else torch.tensor(loss)
        for callback in self._callbacks():
            if isinstance(callback, NonFiniteCallback):
                callback.record(loss, policy_logps, reference)

    def observe(self, mode: str, step: int, is_main: bool) -> dict[str, float]:
        """Every detector's metrics and flags for this log: training logs move their windows on, evaluations are judged
        on their own (`eval_`-prefixed)."""
        stats = self.last = self.take(mode)
        if not stats:  # nothing since the last log (Transformers' end-of-training summary): nothing to repeat
            return {}
        logs = {}
        for callback in self._callbacks():
            if mode == "train":
                logs.update(callback.observe(step, stats, is_main=is_main))
            else:
                logs.update({f"eval_{k}": v for k, v in callback.observe_once(step, stats).items()})
        return logs
