"""Small pieces the losses share: log-ratios, f-divergence scores, per-token means, the SFT term, and the unpaired
losses' log-ratio and label weights."""

from __future__ import annotations

from ._lazy import torch
from ._types import PreferenceBatch, UnpairedBatch

# The unpaired losses' hyperparameters (TRL's KTOConfig names): β and the desirable / undesirable weights λD, λU
UNPAIRED_RANGES = {"beta": "(0, inf)", "desirable_weight": "(0, inf)", "undesirable_weight": "(0, inf)"}


def logratios(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Δw, Δl) = (lw - rw, ll - rl)`; the reference side is detached."""
    if not batch.has_reference:
        raise ValueError("This loss needs reference log-probs, but the batch has ref_chosen_logps=None")
    return (
        batch.chosen_logps - batch.ref_chosen_logps.detach(),
        batch.rejected_logps - batch.ref_rejected_logps.detach(),
    )


def scores(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The f-divergence scores `f'(π/π_ref)` when the trainer set them, else the plain log-ratios (reverse KL)."""
    if batch.chosen_scores is None:
        return logratios(batch)
    return batch.chosen_scores, batch.rejected_scores


def per_token(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`x / |y|`, with zero-length completions counted as length 1."""
    return x / lengths.clamp(min=1).to(x.dtype)


def sft_nll(batch: PreferenceBatch) -> torch.Tensor:
    """Token-mean NLL of the chosen completions over the whole batch (cross-entropy on chosen), a scalar.

    The denominator is `batch.chosen_tokens` when the trainer gives it (the global token count per process, so that
    the gradient averaged over processes is the one-process gradient), else this batch's chosen tokens."""
    nll = -batch.chosen_logps if batch.chosen_nll is None else batch.chosen_nll
    tokens = batch.chosen_lengths.sum() if batch.chosen_tokens is None else batch.chosen_tokens
    return nll.sum() / tokens.clamp(min=1).to(nll.dtype)


def dpo_rewards(batch: PreferenceBatch, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards `β·Δw`, `β·Δl`, detached (TRL's `rewards/*` for every reference-based loss)."""
    chosen, rejected = logratios(batch)
    return beta * chosen.detach(), beta * rejected.detach()


def mean_logp_rewards(batch: PreferenceBatch, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-free rewards `β·lw/|yw|`, `β·ll/|yl|` (SimPO's definition), detached."""
    return (
        beta * per_token(batch.chosen_logps, batch.chosen_lengths).detach(),
        beta * per_token(batch.rejected_logps, batch.rejected_lengths).detach(),
    )


def unpaired_logratios(batch: UnpairedBatch) -> torch.Tensor:
    """`Δ = log π(y|x) − log π_ref(y|x)` per completion; the reference side is detached."""
    if not batch.has_reference:
        raise ValueError("This loss needs reference log-probs, but the batch has ref_logps=None")
    return batch.logps - batch.ref_logps.detach()


def label_weighted(losses_desirable: torch.Tensor, losses_undesirable: torch.Tensor, labels: torch.Tensor,
                   desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Per completion: `λD·loss` where the label is desirable, `λU·loss` where it is not."""
    return torch.where(labels, desirable_weight * losses_desirable, undesirable_weight * losses_undesirable)
