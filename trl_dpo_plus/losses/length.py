"""Length-aware DPO: length-normalised (sigmoid_norm / LN-DPO) and length-regularised (R-DPO).

LD-DPO's `ld_alpha` reweights the log-probs themselves, so it lives in the trainer (TRL's `ld_alpha` field) and
composes with every loss here.
"""

from __future__ import annotations

from ._lazy import F
from ._common import dpo_rewards, logratios, per_token, scores
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss(
    "sigmoid_norm",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2411.15124",
    ranges={"beta": "(0, inf)"},
)
def sigmoid_norm(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO, TRL's name and default β — Tülu 3, https://arxiv.org/abs/2411.15124 (Eq. 6).

    Loss: −logσ(β·(Δw/|yw| − Δl/|yl|))
    Use: when completion lengths vary and DPO learns to prefer length; TRL's name and β default.

    Same numbers as TRL's `loss_type="sigmoid_norm"`. Per-token log-ratios are small, so β is usually far larger
    than DPO's: Tülu 3 used β = 5; see `ln_dpo`, which defaults to it.
    """
    chosen, rejected = scores(batch)
    gap = per_token(chosen, batch.chosen_lengths) - per_token(rejected, batch.rejected_lengths)
    return LossOutput(-F.logsigmoid(beta * gap), *dpo_rewards(batch, beta))


@register_loss(
    "ln_dpo",
    requires_reference=True,
    paper="https://arxiv.org/abs/2411.15124",
    ranges={"beta": "(0, inf)"},
)
def ln_dpo(batch: PreferenceBatch, *, beta: float = 5.0) -> LossOutput:
    """LN-DPO (length-normalised DPO) — Tülu 3, https://arxiv.org/abs/2411.15124 (Eq. 6).

    Loss: −logσ(β·(Δw/|yw| − Δl/|yl|))
    Use: when the same, with Tülu 3's β=5 as the default.

    The same function as `sigmoid_norm` with Tülu 3's β = 5 as the default (typical 2–10).
    """
    return sigmoid_norm(batch, beta=beta)


@register_loss(
    "rdpo",
    requires_reference=True,
    paper="https://arxiv.org/abs/2403.19159",
    ranges={"beta": "(0, inf)", "alpha": "(-inf, inf)"},
)
def rdpo(batch: PreferenceBatch, *, beta: float = 0.1, alpha: float = 0.01) -> LossOutput:
    """R-DPO (length-regularised DPO) — Park et al. 2024, https://arxiv.org/abs/2403.19159 (Eq. 9).

    Loss: −logσ(β(Δw − Δl) + α(|yw| − |yl|))
    Use: when the margin is explained by length (see the length-bias diagnostic); α penalises length in the reward.

    Derivation: with the length-penalised reward r − α|y|, the optimal policy gives r = β·Δ + α|y| + β·log Z, so the
    Bradley-Terry logit gains +α(|yw| − |yl|): a longer chosen already "explains" part of the preference, and the
    policy is pushed less toward length. Equals sail-sg/oat's `(α/β)(|yw| − |yl|)` added inside β(·). The paper
    sweeps α in about 0.005–0.05 at β = 0.1.
    """
    dw, dl = logratios(batch)
    length_gap = (batch.chosen_lengths - batch.rejected_lengths).to(dw.dtype)
    return LossOutput(-F.logsigmoid(beta * (dw - dl) + alpha * length_gap), *dpo_rewards(batch, beta))
