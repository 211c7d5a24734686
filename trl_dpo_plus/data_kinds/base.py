"""The interface every data kind implements, and the one cross-process baseline both kinds use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..layout import PolicyForward


def global_means(values: list[torch.Tensor], reduce: Callable) -> list[torch.Tensor]:
    """The mean of each `(B,)` tensor in `values` over every process's rows (each process holds the same B), detached:
    the batch-level KL baselines of `kto_pair` (chosen and rejected log-ratios) and `kto` (z0)."""
    count = torch.tensor(float(values[0].numel()), device=values[0].device)
    sums = reduce(torch.stack([v.detach().sum() for v in values] + [count]), reduction="sum")
    return [total / sums[-1] for total in sums[:-1]]


class DataKind:
    """One kind of training row. Subclasses set the attributes and implement the three methods.

    Attributes:
        name: `"paired"` or `"unpaired"` (the registry's `data` of its losses).
        unit: what one row is called in messages (`"pairs"`, `"rows"`).
        sides: what the two branches of a `PolicyForward` are called in diagnostics messages.
        token_columns: the prepared token-id columns (`prompt_ids` first).
        extra_columns: further prepared columns the batches need (kept from TRL's unused-column filter).
        calculate_KL, desirable_weight, undesirable_weight: what TRL's KTO preparation reads from the trainer.
    """

    name: str
    unit: str = "pairs"
    sides: tuple[str, str] = ("chosen", "rejected")
    token_columns: tuple[str, ...] = ()
    extra_columns: tuple[str, ...] = ()
    calculate_KL: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def kto_preparation(self) -> tuple[bool, float, float]:
        """`(calculate_KL, desirable_weight, undesirable_weight)`, as TRL's KTO preparation reads them."""
        return self.calculate_KL, self.desirable_weight, self.undesirable_weight

    def wrap_collator(self, collator):
        """The collator that feeds this kind's rows to a pair layout's collator."""
        return collator

    def preparation_args(self, args):
        """The config TRL's preparation of this kind runs with."""
        return args

    def longest_completion(self, lengths: list[np.ndarray]) -> np.ndarray:
        """Per row, the completion length that truncation is decided by (`lengths` in `token_columns` order)."""
        return np.maximum(lengths[1], lengths[2])

    def label_counts(self, dataset) -> dict[str, int] | None:
        """Rows per label of a prepared split, where the kind has labels."""
        return None

    def build_batch(self, forward: PolicyForward, reference, inputs: dict, accelerator) -> Any:
        """The typed batch the kind's losses take, from the policy forward and the reference log-probs (or `None`)."""
        raise NotImplementedError

    def metrics(self, forward: PolicyForward, batch, outputs: list, inputs: dict,
                accelerator) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """`(metrics, per_row)`: TRL's metrics of this kind and ours under `dpo_plus/`, gathered over processes, and
        the per-row statistics the diagnostics read."""
        raise NotImplementedError
