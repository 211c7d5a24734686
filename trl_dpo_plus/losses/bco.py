"""BCO on pairs: each completion classified on its own log-ratio."""

from __future__ import annotations

from ._lazy import F
from ._common import dpo_rewards, logratios
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss("bco_pair", requires_reference=True, paper="https://arxiv.org/abs/2404.04656", ranges={"beta": "(0, inf)"})
def bco_pair(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """BCO (pairwise) — Jung et al. 2024, https://arxiv.org/abs/2404.04656.

    Loss: −logσ(βΔw) − logσ(−βΔl)
    Use: when you want each completion judged on its own (binary classifier view); also in MPO mixes.

    Deviation from the paper: no running-mean reward shift δ (as TRL's DPOTrainer `bco_pair`).
    """
    dw, dl = logratios(batch)
    return LossOutput(-F.logsigmoid(beta * dw) - F.logsigmoid(-beta * dl), *dpo_rewards(batch, beta))
