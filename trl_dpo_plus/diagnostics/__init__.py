"""Diagnostics: reward margins, likelihood displacement, length bias, non-finite values, and the end-of-run report."""

from .callbacks import (
    ACTIONS,
    DiagnosticCallback,
    Flag,
    LengthBiasCallback,
    LikelihoodDisplacementCallback,
    NonFiniteCallback,
    RewardMarginCallback,
    default_callbacks,
)
from .report import DiagnosticsReportCallback, build_report, plot_report, rebuild_report, write_report

__all__ = [
    "ACTIONS",
    "DiagnosticCallback",
    "DiagnosticsReportCallback",
    "Flag",
    "LengthBiasCallback",
    "LikelihoodDisplacementCallback",
    "NonFiniteCallback",
    "RewardMarginCallback",
    "build_report",
    "default_callbacks",
    "plot_report",
    "rebuild_report",
    "write_report",
]
