"""CPO: reference-free DPO plus NLL on the chosen completion."""

from __future__ import annotations

from ._lazy import F
from ._common import sft_nll
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss(
    "cpo",
    requires_reference=False,
    paper="https://arxiv.org/abs/2401.08417",
    ranges={"beta": "(0, inf)", "alpha": "[0, inf)"},
)
def cpo(batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """CPO — Xu et al. 2024, https://arxiv.org/abs/2401.08417 (Eq. 5).

    Loss: −logσ(β·(lw − ll)) + α·NLL_w
    Use: when reference-free DPO with an NLL term (machine translation in the paper).

    DPO with the reference dropped (a uniform prior), plus the chosen NLL as a behaviour-cloning regulariser.
    α is TRL's `cpo_alpha` (default 1.0); β default 0.1. Reward: β·lw, as TRL's CPOTrainer logs.
    """
    losses = -F.logsigmoid(beta * (batch.chosen_logps - batch.rejected_logps)) + alpha * sft_nll(batch)
    return LossOutput(losses, beta * batch.chosen_logps.detach(), beta * batch.rejected_logps.detach())
