"""SimPO: reference-free, length-normalised, with a target margin."""

from __future__ import annotations

from ._lazy import F
from ._common import per_token
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss(
    "simpo",
    requires_reference=False,
    paper="https://arxiv.org/abs/2405.14734",
    ranges={"beta": "(0, inf)", "gamma": "[0, inf)"},
)
def simpo(batch: PreferenceBatch, *, beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO — Meng et al. 2024, https://arxiv.org/abs/2405.14734 (Eq. 6).

    Loss: −logσ(β·lw/|yw| − β·ll/|yl| − γ)
    Use: when memory or speed matters (no reference model) and lengths vary; needs a higher β (2–10).

    γ is the absolute target margin, as in the paper's Eq. 6 and TRL's CPO `simpo_gamma`; princeton-nlp/SimPO's
    code takes γ/β (`gamma_beta_ratio`) instead. Defaults β = 2.0, γ = 1.0, i.e. γ/β = 0.5, where the SimPO README
    advises to start; released settings use β 2–10 and γ/β 0.1–0.8. Reward: β·mean token log-prob.
    """
    chosen_rewards = beta * per_token(batch.chosen_logps, batch.chosen_lengths)
    rejected_rewards = beta * per_token(batch.rejected_logps, batch.rejected_lengths)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
