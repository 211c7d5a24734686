"""KTO on preference pairs (kto_pair), with the batch-level KL baseline."""

from __future__ import annotations

from .._lazy import torch
from ._common import dpo_rewards, logratios
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss(
    "kto_pair",
    requires_reference=True,
    requires_kl=True,
    per_pair=False,
    paper="https://arxiv.org/abs/2402.01306",
    ranges={"beta": "(0, inf)"},
)
def kto_pair(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """KTO on pairs — Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306 (HALOs Eq. 7; old TRL `kto_pair`).

    Loss: ½·[(1 − σ(β(Δw − z_l))) + (1 − σ(β(z_w − Δl)))], z = clamp(mean Δ, min=0), detached
    Use: when you want KTO's prospect-theoretic loss on paired data; robust to noisy, intransitive preferences.

    The chosen half is measured against the rejected side's KL baseline z_l and vice versa. z_w, z_l are the means
    of Δw, Δl over the global batch (the trainer gathers them across processes into `chosen_kl`/`rejected_kl`), or
    over this batch when unset. Deviations from old TRL (≤ 0.8.6): the baselines are detached, as in the KTO paper
    (old TRL back-propagated through them); the ½ makes the per-pair mean equal old TRL's mean over 2B terms.
    """
    dw, dl = logratios(batch)
    z_w = (dw.mean() if batch.chosen_kl is None else batch.chosen_kl).detach().clamp(min=0)
    z_l = (dl.mean() if batch.rejected_kl is None else batch.rejected_kl).detach().clamp(min=0)
    losses = 0.5 * ((1 - torch.sigmoid(beta * (dw - z_l))) + (1 - torch.sigmoid(beta * (z_w - dl))))
    return LossOutput(losses, *dpo_rewards(batch, beta), metrics={"kl_chosen": z_w, "kl_rejected": z_l})
