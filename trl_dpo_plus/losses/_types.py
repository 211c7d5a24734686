"""The typed inputs and outputs every preference loss shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._lazy import torch as _torch

if TYPE_CHECKING:
    import torch


def _check_shapes(batch, first: str, others: tuple[str, ...]) -> None:
    """Every named field of `batch` that is set has the `(B,)` shape of its field `first`."""
    kind, size = type(batch).__name__, getattr(batch, first).shape
    if len(size) != 1:
        raise ValueError(f"{kind} fields must have shape (B,), got {first} of shape {tuple(size)}")
    for name in others:
        value = getattr(batch, name)
        if value is not None and value.shape != size:
            raise ValueError(f"{kind}.{name} has shape {tuple(value.shape)}, expected {tuple(size)}")


@dataclass(frozen=True)
class PreferenceBatch:
    """Per-pair statistics of a batch of B preference pairs (chosen `w`, rejected `l`).

    Every tensor field has shape `(B,)` unless noted. Policy fields carry gradients; the trainer produces the
    reference fields under `torch.no_grad()` and the losses detach them again, so no gradient ever reaches them.

    Args:
        chosen_logps: policy log-prob of the chosen completion, summed over its tokens (`lw`).
        rejected_logps: policy log-prob of the rejected completion, summed over its tokens (`ll`).
        ref_chosen_logps: reference log-prob of the chosen completion (`rw`); `None` for reference-free losses.
        ref_rejected_logps: reference log-prob of the rejected completion (`rl`); `None` for reference-free losses.
        chosen_lengths: number of chosen completion tokens (`|yw|`); losses clamp it to at least 1.
        rejected_lengths: number of rejected completion tokens (`|yl|`); losses clamp it to at least 1.
        chosen_nll: summed negative log-likelihood of the chosen completion tokens, never length-weighted (LD-DPO's
            `ld_alpha` reweights `chosen_logps` but not this). `None` means `-chosen_logps`.
        chosen_scores, rejected_scores: the f-divergence transform `f'(π/π_ref)` of the log-ratios (f-DPO). `None`
            means reverse KL, i.e. the plain log-ratios `lw - rw`, `ll - rl`.
        chosen_kl, rejected_kl: 0-dim batch-level baselines `mean(lw - rw)`, `mean(ll - rl)` over the *global* batch
            (all processes), for losses with `requires_kl=True` (kto_pair). `None` means "use this batch".
        chosen_tokens: 0-dim chosen-token count of the global batch divided by the number of processes, for
            token-mean terms (sft, rpo): with it, the gradient averaged over processes equals one process's on the
            whole batch. `None` means "this batch's count".
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None
    chosen_scores: torch.Tensor | None = None
    rejected_scores: torch.Tensor | None = None
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None

    def __post_init__(self):
        _check_shapes(self, "chosen_logps", ("rejected_logps", "chosen_lengths", "rejected_lengths", "ref_chosen_logps",
                                             "ref_rejected_logps", "chosen_nll", "chosen_scores", "rejected_scores"))
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            raise ValueError("PreferenceBatch needs both ref_chosen_logps and ref_rejected_logps, or neither")

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None


@dataclass(frozen=True)
class UnpairedBatch:
    """Per-completion statistics of a batch of B unpaired completions, each labelled desirable or undesirable (KTO).

    Args:
        logps: `(B,)` policy log-prob of each completion, summed over its tokens.
        ref_logps: `(B,)` reference log-prob of each completion; `None` for reference-free losses.
        lengths: `(B,)` completion token counts.
        labels: `(B,)` bool, True where the completion is desirable.
        kl: 0-dim KL baseline `mean(log π(y'|x) − log π_ref(y'|x))` over mismatched (prompt, completion) pairs of the
            *global* batch (all processes), detached, not yet clamped; `None` for losses without a KL term.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor | None = None
    kl: torch.Tensor | None = None

    def __post_init__(self):
        _check_shapes(self, "logps", ("lengths", "labels", "ref_logps"))
        if self.labels.dtype != _torch.bool:
            raise TypeError(f"UnpairedBatch.labels must be a bool tensor, got {self.labels.dtype}")

    @property
    def has_reference(self) -> bool:
        return self.ref_logps is not None


@dataclass
class LossOutput:
    """What a loss returns: unreduced per-pair losses and the rewards as that loss defines them.

    Args:
        losses: `(B,)` per-pair losses, not reduced; the trainer takes the mean. Losses that are defined per batch
            (aot, sft) return the same value broadcast or a per-position value whose mean is the batch loss.
        chosen_rewards, rejected_rewards: `(B,)` detached implicit rewards, e.g. `β·(lw - rw)` for DPO, `β·lw/|yw|`
            for SimPO.
        metrics: extra detached scalars or `(B,)` tensors to log, keyed by a short name.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class UnpairedLossOutput:
    """What an unpaired loss returns.

    Args:
        losses: `(B,)` per-completion losses, weights (λD, λU) applied, not reduced; the trainer takes the mean.
        rewards: `(B,)` detached implicit reward of each completion, e.g. `β·(log π − log π_ref)` for KTO.
        metrics: extra detached scalars to log, keyed by a short name (KTO logs its baseline as `kl`).
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
