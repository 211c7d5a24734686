"""APO: anchored preference optimisation (zero and down anchors)."""

from __future__ import annotations

from ._lazy import torch
from ._common import UNPAIRED_RANGES, dpo_rewards, label_weighted, logratios, unpaired_logratios
from ._types import LossOutput, PreferenceBatch, UnpairedBatch, UnpairedLossOutput
from .registry import register_loss


@register_loss("apo_zero", requires_reference=True, paper="https://arxiv.org/abs/2408.06266", ranges={"beta": "(0, inf)"})
def apo_zero(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """APO-zero — D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (Eq. 7).

    Loss: (1 − σ(βΔw)) + σ(βΔl)
    Use: when the chosen outputs are better than what your model writes now.

    Raises chosen and lowers rejected likelihood: for chosen outputs better than the model's own.
    """
    dw, dl = logratios(batch)
    return LossOutput(1 - torch.sigmoid(beta * dw) + torch.sigmoid(beta * dl), *dpo_rewards(batch, beta))


@register_loss("apo_down", requires_reference=True, paper="https://arxiv.org/abs/2408.06266", ranges={"beta": "(0, inf)"})
def apo_down(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """APO-down — D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266 (Eq. 8).

    Loss: σ(βΔw) + (1 − σ(β(Δw − Δl)))
    Use: when the chosen outputs are worse than what your model writes now.

    Lowers both likelihoods, the rejected more: for chosen outputs worse than the model's own.
    """
    dw, dl = logratios(batch)
    return LossOutput(torch.sigmoid(beta * dw) + 1 - torch.sigmoid(beta * (dw - dl)), *dpo_rewards(batch, beta))


@register_loss(
    "apo_zero_unpaired",
    requires_reference=True,
    per_pair=False,
    paper="https://arxiv.org/abs/2408.06266",
    ranges=UNPAIRED_RANGES,
    data="unpaired",
)
def apo_zero_unpaired(batch: UnpairedBatch, *, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> UnpairedLossOutput:
    """APO-zero, unpaired — D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266; TRL's KTOTrainer
    `loss_type="apo_zero_unpaired"`.

    Loss: λD·(1 − σ(βΔ)) if desirable, λU·σ(βΔ) if undesirable
    Use: when your feedback is unpaired good/bad completions and the good ones are better than your model's own.

    APO-zero's two halves applied to single completions: no KL baseline, so no mismatched completions are needed
    (any sampling order works, and a batch of one).
    """
    delta = unpaired_logratios(batch)
    losses = label_weighted(1 - torch.sigmoid(beta * delta), torch.sigmoid(beta * delta), batch.labels,
                      desirable_weight, undesirable_weight)
    return UnpairedLossOutput(losses, beta * delta.detach())
