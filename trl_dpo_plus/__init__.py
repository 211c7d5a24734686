"""trl-dpo-plus: every preference loss for TRL's DPOTrainer from one registry.

Migrating a TRL script is one import: `from trl_dpo_plus import DPOConfig, DPOTrainer`.

Names are imported on first use (as TRL and Transformers do), so `import trl_dpo_plus` and the command line's
`--help` and `losses` do not load torch, Transformers or TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "DPOConfig": ("config", "DPOPlusConfig"),
    "DPOPlusConfig": ("config", "DPOPlusConfig"),
    "DPOPlusTrainer": ("trainer", "DPOPlusTrainer"),
    "DPOTrainer": ("trainer", "DPOPlusTrainer"),
    "KTOConfig": ("kto", "KTOConfig"),
    "KTOTrainer": ("kto", "KTOTrainer"),
    "LossOutput": ("losses", "LossOutput"),
    "LossSpec": ("losses", "LossSpec"),
    "PreferenceBatch": ("losses", "PreferenceBatch"),
    "UnpairedBatch": ("losses", "UnpairedBatch"),
    "UnpairedLossOutput": ("losses", "UnpairedLossOutput"),
    "check_preference_dataset": ("data", "check_preference_dataset"),
    "default_model_path": ("assets", "default_model_path"),
    "get_loss": ("losses", "get_loss"),
    "list_losses": ("losses", "list_losses"),
    "load_preference_dataset": ("data", "load_preference_dataset"),
    "lora_defaults": ("qlora", "lora_defaults"),
    "qlora_defaults": ("qlora", "qlora_defaults"),
    "register_loss": ("losses", "register_loss"),
    "unpair_preference_dataset": ("data", "unpair_preference_dataset"),
    "validate_loss_kwargs": ("losses", "validate_loss_kwargs"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trl_dpo_plus' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .assets import default_model_path
    from .config import DPOPlusConfig
    from .config import DPOPlusConfig as DPOConfig
    from .data import check_preference_dataset, load_preference_dataset, unpair_preference_dataset
    from .kto import KTOConfig, KTOTrainer
    from .losses import (
        LossOutput,
        LossSpec,
        PreferenceBatch,
        UnpairedBatch,
        UnpairedLossOutput,
        get_loss,
        list_losses,
        register_loss,
        validate_loss_kwargs,
    )
    from .qlora import lora_defaults, qlora_defaults
    from .trainer import DPOPlusTrainer
    from .trainer import DPOPlusTrainer as DPOTrainer
