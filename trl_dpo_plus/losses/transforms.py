"""Pure transforms the trainer applies around the losses: f-DPO's scores of the log-ratios, and WPO's pair weights."""

from __future__ import annotations

import math

from ._common import per_token
from ._lazy import F, torch


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(π/π_ref) of the f-DPO paper (https://arxiv.org/abs/2309.16240), as TRL 1.16 computes it."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log 2 + logσ(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(α−1) − 1)/(α − 1)
        dtype = logratios.dtype
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(dtype, 80.0)
        t = torch.clamp(((alpha - 1.0) * logratios).float(), max=clamp_max)
        return (torch.exp(t) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown f_divergence_type: {kind!r}")


def wpo_weights(per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO weights (https://arxiv.org/abs/2406.11827 Eq. 2), as TRL computes them, one per pair, from the `(2B, T)`
    rows `[chosen; rejected]`: exp of each sequence's mean of `log p − log Σp²`, chosen times rejected, no gradient."""
    with torch.no_grad():
        aligned = (per_token_logps - log_sum_sq_probs) * mask
    weights = torch.exp(per_token(aligned.sum(dim=1), mask.sum(dim=1)))
    chosen_weights, rejected_weights = weights.chunk(2, dim=0)
    return chosen_weights * rejected_weights
