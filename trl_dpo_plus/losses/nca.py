"""NCA: noise-contrastive alignment on pairs."""

from __future__ import annotations

from ._lazy import F
from ._common import dpo_rewards, logratios
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss("nca_pair", requires_reference=True, paper="https://arxiv.org/abs/2402.05369", ranges={"beta": "(0, inf)"})
def nca_pair(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """NCA (pairwise) — Chen et al. 2024, https://arxiv.org/abs/2402.05369.

    Loss: −logσ(βΔw) − ½·logσ(−βΔw) − ½·logσ(−βΔl)
    Use: when the chosen likelihood keeps falling under DPO; NCA anchors absolute likelihoods.

    Optimises absolute likelihoods rather than only their gap, so the chosen log-prob is less prone to fall.
    """
    dw, dl = logratios(batch)
    losses = -F.logsigmoid(beta * dw) - 0.5 * F.logsigmoid(-beta * dw) - 0.5 * F.logsigmoid(-beta * dl)
    return LossOutput(losses, *dpo_rewards(batch, beta))
