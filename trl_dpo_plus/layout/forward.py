"""What every layout hands the loss path (`PolicyForward`), and what it receives from the run (`ForwardContext`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

# Keys of a collated batch that are not model inputs
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "label"}
# Per-token statistics of TRL's fused LM head, for TRL's metrics and WPO weighting
TOKEN_FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


@dataclass
class PolicyForward:
    """The policy forward of a batch of B pairs, rows `[chosen; rejected]`, whatever the layout.

    Attributes:
        per_token_logps: `(2B, T)` log-probs of the completion tokens, in order, 0 elsewhere.
        mask: `(2B, T)` 1 where `per_token_logps` holds a completion token.
        logps: `(2B,)` summed completion log-probs, LD-DPO-weighted when `ld_alpha` is set.
        entropy, mean_logits, is_top1: `(2B, T)` per-token statistics of the fused LM head (for TRL's metrics).
        log_sum_sq_probs: `(2B, T)` `log Σ p²` for WPO weighting, or `None` when weighting is off.
        aux_loss: the MoE load-balancing loss, or `None`.
        num_tokens: tokens of the batch as TRL counts them (prompt counted once per completion), for `num_tokens`.
    """

    per_token_logps: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    @property
    def nll(self) -> torch.Tensor:
        """`(2B,)` summed NLL of the completion tokens, never LD-weighted."""
        return -(self.per_token_logps * self.mask).sum(dim=1)


def _no_grad(model: torch.nn.Module) -> AbstractContextManager:
    return torch.no_grad()


@dataclass(frozen=True)
class ForwardContext:
    """What a layout needs from the run, handed in instead of the trainer (which builds it: `forward_context`).

    Attributes:
        pad_token_id: the tokenizer's padding id.
        unwrap: the model under its distributed/compiled wrappers (`accelerator.unwrap_model`).
        ld_alpha: LD-DPO's weight of the tokens past the shorter completion, or `None`.
        aux_loss_enabled: whether the model returns a MoE load-balancing loss to add.
        compact_head: a context under which TRL's fused LM head scores only the labelled positions.
        reference: `reference(model)`, the context the reference forward runs under (no gradient, no checkpointing,
            the adapter disabled when the reference is the PEFT model's base, autocast).
        padded_reference: `padded_reference(model, padded_batch) -> (chosen, rejected)`, TRL's own reference forward.
        no_checkpointing: `no_checkpointing(model)`, gradient checkpointing off for a forward without backward.
        gather: `accelerator.gather`, so that a decision taken on one batch is the same on every process.
        half_precision: whether the forward runs in bf16/fp16 (weights or autocast).
    """

    pad_token_id: int
    unwrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
    ld_alpha: float | None = None
    aux_loss_enabled: bool = False
    compact_head: Callable[[], AbstractContextManager] = contextlib.nullcontext
    reference: Callable[[torch.nn.Module], AbstractContextManager] = _no_grad
    padded_reference: Callable | None = None
    no_checkpointing: Callable[[torch.nn.Module], AbstractContextManager] = contextlib.nullcontext
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor
    half_precision: bool = False


def ld_weighted_sum(per_token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sum over completion tokens; with LD-DPO's α, tokens past the shorter completion of the pair count α times."""
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    position = mask.cumsum(dim=1)
    chosen_len, rejected_len = mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    shared_mask = (position > 0) & (position <= shared)
    tail_mask = position > shared
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)
