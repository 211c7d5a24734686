"""Preference losses: pure functions `fn(PreferenceBatch, *, beta, ...) -> LossOutput`, one registry of names.

Importing this package imports every family module, which registers its losses.
"""

from . import apo, bco, cpo, dpo, dpop, ipo, kto, length, nca, orpo, simpo, sft, sppo  # noqa: F401  (register)
from ._types import LossOutput, PreferenceBatch, UnpairedBatch, UnpairedLossOutput
from .registry import (
    DATA_KINDS,
    ENTRY_POINT_GROUP,
    LossSpec,
    get_loss,
    list_losses,
    register_loss,
    validate_loss_kwargs,
)

__all__ = [
    "DATA_KINDS",
    "ENTRY_POINT_GROUP",
    "LossOutput",
    "LossSpec",
    "PreferenceBatch",
    "UnpairedBatch",
    "UnpairedLossOutput",
    "get_loss",
    "list_losses",
    "register_loss",
    "validate_loss_kwargs",
]
