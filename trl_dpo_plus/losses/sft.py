"""Likelihood terms: plain SFT on the chosen completion, and RPO (DPO + NLL)."""

from __future__ import annotations

from ._lazy import F
from ._common import dpo_rewards, logratios, mean_logp_rewards, sft_nll
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss("sft", requires_reference=False, supports_f_divergence=True, per_pair=False, ranges={"beta": "(0, inf)"})
def sft(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """SFT on the chosen completions (negative log-likelihood), as TRL's `loss_type="sft"`.

    Loss: −Σ_pairs lw / Σ_pairs |yw|  (token mean over the batch, broadcast to every pair)
    Use: when as a weighted extra term next to a preference loss, to keep the chosen likelihood up.

    Usually combined with a preference loss through `loss_weights` (e.g. MPO: sigmoid + bco_pair + sft). Needs no
    reference. β only scales the logged reward, β·lw/|yw|.
    """
    nll = sft_nll(batch)
    return LossOutput(nll.expand_as(batch.chosen_logps), *mean_logp_rewards(batch, beta))


@register_loss(
    "rpo",
    requires_reference=True,
    paper="https://arxiv.org/abs/2404.19733",
    ranges={"beta": "(0, inf)", "alpha": "[0, inf)"},
)
def rpo(batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO (DPO + NLL) — Pang et al. 2024, https://arxiv.org/abs/2404.19733 (Eq. 2).

    Loss: −logσ(β(Δw − Δl)) + α·(−Σ lw / Σ |yw|)
    Use: when DPO pushes chosen log-probs down (likelihood displacement); the NLL term holds them up.

    The NLL on the chosen completion keeps its likelihood from falling (the paper normalises by length; here the
    token mean is over the batch, as TRL's former `rpo_alpha`). α = 1 in the paper.
    """
    dw, dl = logratios(batch)
    losses = -F.logsigmoid(beta * (dw - dl)) + alpha * sft_nll(batch)
    return LossOutput(losses, *dpo_rewards(batch, beta))
