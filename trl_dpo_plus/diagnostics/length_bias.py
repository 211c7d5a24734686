"""Length bias: reward margins explained by the completions' length difference."""

from __future__ import annotations

from collections import deque

import torch

from .base import DiagnosticCallback, Flag


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
