"""Likelihood displacement: DPO pushing rejected log-probs down far faster than it lifts chosen ones, until both fall."""

from __future__ import annotations

from .base import DiagnosticCallback, Flag, check_positive, slope


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
            check_positive(f"LikelihoodDisplacementCallback: {name}", value, allow_zero=name == "chosen_drop")
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
        if full and chosen[-1] < -self.chosen_drop and slope(chosen) < 0 and slope(margin) > 0:
            flags.append(Flag(self.name, "both_falling", step,
                              f"{good} log-probs are falling below the reference while the margin grows", numbers))
        if rejected[-1] < -self.rejected_collapse:
            flags.append(Flag(self.name, "rejected_collapse", step,
                              f"{bad} per-token log-ratio {rejected[-1]:.3f} < −{self.rejected_collapse}", numbers))
        if full and d_margin > 0 and abs(d_rejected) >= self.min_change and ratio > self.rejected_ratio:
            flags.append(Flag(self.name, "rejected_driven", step,
                              f"margin growth is driven by the {bad} side ({ratio:.1f}× the {good} change)", numbers))
        return metrics, flags
