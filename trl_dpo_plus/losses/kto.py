"""KTO: on unpaired completions labelled desirable/undesirable (kto), and on preference pairs (kto_pair)."""

from __future__ import annotations

from ._lazy import torch
from ._common import UNPAIRED_RANGES, dpo_rewards, label_weighted, logratios, unpaired_logratios
from ._types import LossOutput, PreferenceBatch, UnpairedBatch, UnpairedLossOutput
from .registry import register_loss


@register_loss(
    "kto",
    requires_reference=True,
    requires_kl=True,
    per_pair=False,
    paper="https://arxiv.org/abs/2402.01306",
    ranges=UNPAIRED_RANGES,
    data="unpaired",
)
def kto(batch: UnpairedBatch, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> UnpairedLossOutput:
    """KTO — Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306 (Eq. 7 and 8); TRL's KTOTrainer `loss_type="kto"`.

    Loss: λD·(1 − σ(β(Δ − z0))) if desirable, λU·(1 − σ(β(z0 − Δ))) if undesirable; z0 = clamp(KL estimate, min=0)
    Use: when your feedback is single completions marked good or bad (thumbs up/down), not pairs.

    Δ = log π(y|x) − log π_ref(y|x). The baseline z0 is the mean of log π(y'|x) − log π_ref(y'|x) over mismatched
    (prompt, completion) pairs of the global batch (each prompt with its neighbour's completion, as TRL builds them),
    detached and clamped at 0. Set λD, λU so that λD·nD / (λU·nU) lies in [1, 4/3] (the paper's Eq. 8; the trainer
    warns otherwise).
    """
    if batch.kl is None:
        raise ValueError("kto needs the batch's KL baseline (UnpairedBatch.kl), estimated from mismatched completions")
    delta = unpaired_logratios(batch)
    z0 = batch.kl.detach().clamp(min=0)
    losses = label_weighted(1 - torch.sigmoid(beta * (delta - z0)), 1 - torch.sigmoid(beta * (z0 - delta)), batch.labels,
                      desirable_weight, undesirable_weight)
    return UnpairedLossOutput(losses, beta * delta.detach(), metrics={"kl": z0})


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
