"""Reward margins per logging step: what the other detectors and the report read."""

from __future__ import annotations

import torch

from .base import DiagnosticCallback, slope


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
        row["margin/trend"] = slope(h["margin/mean"] for h in self.history)
        return row, []
