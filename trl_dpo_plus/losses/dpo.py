"""The DPO family on the reward difference `h = Δw − Δl`: sigmoid, hinge, robust, exo_pair, discopop, aot."""

from __future__ import annotations

import math

from ._lazy import torch, F
from ._common import dpo_rewards, logratios, scores
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


def _margin(batch: PreferenceBatch) -> torch.Tensor:
    chosen, rejected = scores(batch)
    return chosen - rejected


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@register_loss(
    "sigmoid",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2305.18290",
    ranges={"beta": "(0, inf)"},
)
def sigmoid(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """DPO — Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 (Eq. 7).

    Loss: −logσ(β·(Δw − Δl)), Δ = log π(y|x) − log π_ref(y|x)
    Use: when the default; start here with β≈0.1.

    β typically 0.01–0.5 (0.1 is the paper's and TRL's default). Same numbers as TRL's `loss_type="sigmoid"`.
    """
    return LossOutput(-F.logsigmoid(beta * _margin(batch)), *dpo_rewards(batch, beta))


@register_loss(
    "hinge",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2309.06657",
    ranges={"beta": "(0, inf)"},
)
def hinge(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """SLiC/RSO hinge — Liu et al. 2023, https://arxiv.org/abs/2309.06657.

    Loss: relu(1 − β·(Δw − Δl))
    Use: when you want zero loss once the margin reaches 1/β (SLiC-style), e.g. noisy rankings from a reward model.

    β is the inverse margin (1/β is the log-ratio gap at which the loss is zero); TRL default 0.1.
    """
    return LossOutput(torch.relu(1 - beta * _margin(batch)), *dpo_rewards(batch, beta))


@register_loss(
    "robust",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2403.00409",
    ranges={"beta": "(0, inf)", "label_smoothing": "[0, 0.5)"},
)
def robust(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO — Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409.

    Loss: (−(1−ε)·logσ(βh) + ε·logσ(−βh)) / (1 − 2ε), h = Δw − Δl, ε = label_smoothing
    Use: when your preference labels are noisy; set label_smoothing to the flip rate (≈0.1).

    ε is the probability that a label is flipped, in [0, 0.5); the paper suggests ε ≈ 0.1. ε = 0 is plain DPO.
    """
    logits = beta * _margin(batch)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses, *dpo_rewards(batch, beta))


@register_loss(
    "exo_pair",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2402.00856",
    ranges={"beta": "(0, inf)", "label_smoothing": "(0, 1)"},
)
def exo_pair(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO (pairwise) — Ji et al. 2024, https://arxiv.org/abs/2402.00856 (Eq. 16).

    Loss: σ(βh)·(logσ(βh) − log(1−ε)) + σ(−βh)·(logσ(−βh) − log ε), h = Δw − Δl
    Use: when you want mode-seeking alignment rather than DPO's mass-covering behaviour.

    The reverse KL from the model's pair distribution to the smoothed label [1−ε, ε]. ε must be > 0; the paper
    recommends 1e-3.
    """
    logits = beta * _margin(batch)
    eps = label_smoothing
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(eps)
    )
    return LossOutput(losses, *dpo_rewards(batch, beta))


@register_loss(
    "discopop",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2406.08414",
    ranges={"beta": "(0, inf)", "tau": "(0, inf)"},
)
def discopop(batch: PreferenceBatch, *, beta: float = 0.1, tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss) — Chan Lu et al. 2024, https://arxiv.org/abs/2406.08414 (Eq. 5).

    Loss: (1 − m)·(−logσ(βh)) + m·exp(−βh), m = σ(βh/τ), h = Δw − Δl
    Use: when you want DPO with a softer push on pairs it already gets right (discovered objective, τ=0.05).

    τ (TRL's `discopop_tau`) = 0.05 as recommended by the paper. Deviation from TRL, numerics only: m·exp(−βh) is
    computed as exp(logσ(βh/τ) − βh), which is finite where TRL's product gives 0·∞ = NaN (βh ≲ −88 in float32).
    """
    logits = beta * _margin(batch)
    mix = torch.sigmoid(logits / tau)
    exp_part = torch.exp(F.logsigmoid(logits / tau) - logits)  # = mix · exp(−logits)
    return LossOutput((1 - mix) * -F.logsigmoid(logits) + exp_part, *dpo_rewards(batch, beta))


@register_loss(
    "aot",
    requires_reference=True,
    per_pair=False,
    whole_batch=True,
    paper="https://arxiv.org/abs/2406.05882",
    ranges={"beta": "(0, inf)", "label_smoothing": "[0, 0.5)"},
)
def aot(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (paired) — Melnyk et al. 2024, https://arxiv.org/abs/2406.05882.

    Loss: −(1−ε)·logσ(βδ_(i)) − ε·logσ(−βδ_(i)), δ_(i) = sort(lw − ll)_i − sort(rw − rl)_i
    Use: when large batches (≥8) and you want distributional rather than per-pair alignment.

    Optimal-transport distributional alignment: the policy and reference log-odds are each sorted across the batch,
    so position i is not pair i; the mean over the batch is the loss. Use batch sizes of 8 or more.
    """
    rewards = dpo_rewards(batch, beta)  # also checks the reference is there
    ref_gap = (batch.ref_chosen_logps - batch.ref_rejected_logps).detach()
    delta = torch.sort(batch.chosen_logps - batch.rejected_logps, dim=0)[0] - torch.sort(ref_gap, dim=0)[0]
    return LossOutput(_smoothed_logistic(beta * delta, label_smoothing), *rewards)


@register_loss(
    "aot_unpaired",
    requires_reference=True,
    per_pair=False,
    whole_batch=True,
    paper="https://arxiv.org/abs/2406.05882",
    ranges={"beta": "(0, inf)", "label_smoothing": "[0, 0.5)"},
)
def aot_unpaired(batch: PreferenceBatch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (unpaired) — Melnyk et al. 2024, https://arxiv.org/abs/2406.05882.

    Loss: −(1−ε)·logσ(βδ_(i)) − ε·logσ(−βδ_(i)), δ_(i) = sort(Δw)_i − sort(Δl)_i
    Use: when chosen and rejected completions are not really paired.

    Chosen and rejected log-ratios are sorted separately across the batch (for unpaired data); batch-level.
    """
    chosen, rejected = logratios(batch)
    delta = torch.sort(chosen, dim=0)[0] - torch.sort(rejected, dim=0)[0]
    return LossOutput(_smoothed_logistic(beta * delta, label_smoothing), *dpo_rewards(batch, beta))
