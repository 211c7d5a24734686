"""DPO-Positive (Smaug): DPO with a penalty when the chosen log-prob falls below the reference."""

from __future__ import annotations

from ._lazy import torch, F
from ._common import dpo_rewards, logratios
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss(
    "dpop",
    requires_reference=True,
    paper="https://arxiv.org/abs/2402.13228",
    ranges={"beta": "(0, inf)", "lambda_": "[0, inf)"},
)
def dpop(batch: PreferenceBatch, *, beta: float = 0.1, lambda_: float = 50.0) -> LossOutput:
    """DPO-Positive — Pal et al. 2024, https://arxiv.org/abs/2402.13228 (Eq. 3).

    Loss: −logσ(β·(Δw − Δl − λ·max(0, rw − lw)))
    Use: when chosen log-probs fall below the reference (small edit-distance pairs, maths); λ penalises that.

    The penalty sits inside the sigmoid, as in the paper (some community versions put it outside). The paper
    reports λ between 5 and 500 (50 for MetaMath); very large λ has diverged in user reports. `lambda_` because
    `lambda` is a Python keyword; `loss_kwargs={"dpop": {"lambda_": 50}}`.
    """
    dw, dl = logratios(batch)
    penalty = torch.clamp(-dw, min=0)  # max(0, rw − lw) = max(0, −Δw)
    losses = -F.logsigmoid(beta * (dw - dl - lambda_ * penalty))
    return LossOutput(losses, *dpo_rewards(batch, beta), metrics={"dpop_penalty": penalty.detach()})
