"""SPPO with hard preference probabilities."""

from __future__ import annotations

from ._common import dpo_rewards, logratios
from ._types import LossOutput, PreferenceBatch
from .registry import register_loss


@register_loss("sppo_hard", requires_reference=True, paper="https://arxiv.org/abs/2405.00675", ranges={"beta": "(0, inf)"})
def sppo_hard(batch: PreferenceBatch, *, beta: float = 0.1) -> LossOutput:
    """SPPO (hard labels) — Wu et al. 2024, https://arxiv.org/abs/2405.00675 (Eq. 4.7 with P ∈ {0, 1}).

    Loss: (Δw − 1/(2β))² + (Δl + 1/(2β))²
    Use: when self-play iterations where chosen/rejected come from the current policy.

    The paper estimates P(y ≻ π) with PairRM; the hard version sets it to 1 for the winner and 0 for the loser, as
    TRL's `sppo_hard` does.
    """
    chosen, rejected = logratios(batch)
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return LossOutput(losses, *dpo_rewards(batch, beta))
