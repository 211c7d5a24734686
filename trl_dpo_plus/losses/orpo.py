"""ORPO: reference-free odds-ratio preference term plus NLL on the chosen completion."""

from __future__ import annotations

import math

from ._lazy import torch, F
from ._common import per_token, sft_nll
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable at both ends (Mächler 2012); x is clamped to ≤ −1e-6 so p = 1 stays finite."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_loss("orpo", requires_reference=False, paper="https://arxiv.org/abs/2403.07691", ranges={"beta": "(0, inf)"})
def orpo(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """ORPO — Hong et al. 2024, https://arxiv.org/abs/2403.07691 (Eq. 6–7).

    Loss: NLL_w − β·logσ((pw − pl) − (log(1 − e^pw) − log(1 − e^pl))), p = mean token log-prob
    Use: when you want SFT and preference tuning in one stage without a reference model.

    β is the paper's λ (TRL's ORPO `beta`), 0.1 by default (paper: 0.1–0.5 ... 1.0). NLL_w is the token-mean
    cross-entropy over the batch's chosen completions, as in TRL. Reward: β·p, as TRL's ORPOTrainer logs.
    Deviation: log(1 − eᵖ) is computed stably and p is clamped to ≤ −1e-6 (TRL's log1p(−exp(p)) is −inf at p = 0).
    """
    p_w = per_token(batch.chosen_logps, batch.chosen_lengths)
    p_l = per_token(batch.rejected_logps, batch.rejected_lengths)
    log_odds = (p_w - p_l) - (_log1mexp(p_w) - _log1mexp(p_l))
    odds_term = beta * F.logsigmoid(log_odds)
    losses = sft_nll(batch) - odds_term
    return LossOutput(losses, beta * p_w.detach(), beta * p_l.detach(), metrics={"log_odds": log_odds.detach()})
