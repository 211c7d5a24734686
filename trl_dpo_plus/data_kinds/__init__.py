"""What a run trains on: preference pairs (`paired`) or thumbs-up/down completions (`unpaired`, KTO).

Each kind says which prepared columns it reads, how its rows ride the pair layouts, how a `PolicyForward` and the
reference log-probs become the typed batch its losses take, and which metrics and per-row statistics it logs. The
trainer holds one `DataKind` and never branches on the kind itself.
"""

from __future__ import annotations

from ..losses import LossSpec
from .base import DataKind, global_means
from .paired import PairedKind
from .unpaired import UnpairedCollator, UnpairedKind


def data_kind_for(args, loss_specs: list[LossSpec], loss_kwargs: list[dict]) -> DataKind:
    """The kind of rows `args.loss_type` trains on (the config has checked that every loss takes the same kind)."""
    requires_kl = any(spec.requires_kl for spec in loss_specs)
    if args.data_kind == "paired":
        return PairedKind(requires_kl=requires_kl, f_divergence_type=args.f_divergence_type,
                          f_alpha=args.f_alpha_divergence_coef)
    weights = next((kw for kw in loss_kwargs if "desirable_weight" in kw), {})
    return UnpairedKind(calculate_KL=requires_kl, desirable_weight=weights.get("desirable_weight", 1.0),
                        undesirable_weight=weights.get("undesirable_weight", 1.0))


__all__ = ["DataKind", "PairedKind", "UnpairedCollator", "UnpairedKind", "data_kind_for", "global_means"]
