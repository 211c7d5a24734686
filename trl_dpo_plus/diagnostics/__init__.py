"""Diagnostics: reward margins, likelihood displacement, length bias, non-finite values, and the end-of-run report.

One detector per file (`margins`, `displacement`, `length_bias`, `nonfinite`, `no_learning`) on the base in `base`; `statistics`
holds what they read; `report` writes `diagnostics.json`/`.png` from the log history.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..saving import RunRecord

from .base import ACTIONS, REMEDIES, DiagnosticCallback, Flag, restore_states
from .displacement import LikelihoodDisplacementCallback
from .length_bias import LengthBiasCallback
from .margins import RewardMarginCallback
from .no_learning import NoLearningCallback
from .nonfinite import NonFiniteCallback
from .report import (
    DiagnosticsReportCallback,
    build_report,
    plot_report,
    read_report,
    rebuild_report,
    write_interrupted_report,
    write_report,
)
from .statistics import PairStatistics

logger = logging.getLogger(__name__)


def default_callbacks(action: str = "warn") -> list[DiagnosticCallback]:
    return [RewardMarginCallback(action=action), LikelihoodDisplacementCallback(action=action),
            LengthBiasCallback(action=action), NonFiniteCallback(action=action), NoLearningCallback(action=action)]


def callbacks_to_add(existing: list[TrainerCallback], args, sides: tuple[str, str] = ("chosen", "rejected")):
    """What a trainer adds to its callbacks: the default detectors of a kind the user did not pass (when
    `args.diagnostics`), with `args.diagnostics_action`, the report writer when any detector runs, and the record of
    the objective that checkpoints keep (`saving.RunRecord`). Every detector,
    the user's too, names the two sides `sides` in its messages (desirable/undesirable for unpaired data)."""
    given = {type(cb) for cb in existing}
    added = [cb for cb in default_callbacks(args.diagnostics_action) if type(cb) not in given] if args.diagnostics else []
    detectors = [cb for cb in existing + added if isinstance(cb, DiagnosticCallback)]
    for detector in detectors:
        detector.sides = sides
    own = [f"{type(cb).__name__}(action={cb.action!r})" for cb in existing
           if isinstance(cb, DiagnosticCallback) and cb.action != args.diagnostics_action]
    if own:
        logger.info("diagnostics_action=%r applies to the default detectors; the ones passed in keep their own: %s",
                    args.diagnostics_action, ", ".join(own))
    if DiagnosticsReportCallback not in given and detectors:
        added.append(DiagnosticsReportCallback())
    if RunRecord not in given:
        added.append(RunRecord(args.loss_type, args.loss_kwargs))
    return added


__all__ = [
    "ACTIONS",
    "REMEDIES",
    "DiagnosticCallback",
    "DiagnosticsReportCallback",
    "Flag",
    "LengthBiasCallback",
    "LikelihoodDisplacementCallback",
    "NoLearningCallback",
    "NonFiniteCallback",
    "PairStatistics",
    "RewardMarginCallback",
    "build_report",
    "callbacks_to_add",
    "default_callbacks",
    "plot_report",
    "read_report",
    "rebuild_report",
    "restore_states",
    "write_interrupted_report",
    "write_report",
]
