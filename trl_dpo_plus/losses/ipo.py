"""IPO: squared regression of the log-ratio gap onto 1/(2β) — TRL's length-normalised form and the paper's."""

from __future__ import annotations

from ._common import dpo_rewards, logratios, per_token, scores
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss(
    "ipo",
    requires_reference=True,
    supports_f_divergence=True,
    paper="https://arxiv.org/abs/2310.12036",
    ranges={"beta": "(0, inf)"},
)
def ipo(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """IPO, length-normalised (TRL's form) — Azar et al. 2023, https://arxiv.org/abs/2310.12036 (Eq. 17).

    Loss: (Δw/|yw| − Δl/|yl| − 1/(2β))²
    Use: when DPO overfits (margins run away on deterministic preferences); IPO regularises towards a fixed gap.

    Deviation from the paper: Eq. 17 uses summed log-probs; like TRL (whose comment says the authors confirmed it),
    this divides each log-ratio by its completion length so β is comparable across lengths. The paper's form is
    `ipo_sum`. β here is the paper's τ; TRL default 0.1, useful range 0.01–1.
    """
    chosen, rejected = scores(batch)
    gap = per_token(chosen, batch.chosen_lengths) - per_token(rejected, batch.rejected_lengths)
    return LossOutput((gap - 1 / (2 * beta)) ** 2, *dpo_rewards(batch, beta))


@register_loss("ipo_sum", requires_reference=True, paper="https://arxiv.org/abs/2310.12036", ranges={"beta": "(0, inf)"})
def ipo_sum(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """IPO as printed in the paper (summed log-probs) — Azar et al. 2023, https://arxiv.org/abs/2310.12036 (Eq. 17).

    Loss: (Δw − Δl − 1/(2β))²
    Use: when you need the paper's exact IPO (summed log-probs), e.g. to reproduce its numbers.

    The target gap 1/(2β) is in summed nats, so it does not scale with completion length; prefer `ipo` for
    completions of varied length. β is the paper's τ.
    """
    chosen, rejected = logratios(batch)
    return LossOutput((chosen - rejected - 1 / (2 * beta)) ** 2, *dpo_rewards(batch, beta))
