"""trl-dpo-plus: every preference loss for TRL's DPOTrainer from one registry.

Migrating a TRL script is one import: `from trl_dpo_plus import DPOConfig, DPOTrainer`.

Names are imported on first use (as TRL and Transformers do), so `import trl_dpo_plus` and the command line's
`--help` and `losses` do not load torch, Transformers or TRL.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING


class _DropNotice(logging.Filter):
    """Drops one upstream notice that a user of this package cannot act on (the fallback it announces works)."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# Printed on every run on a CPU by optional dependencies, before any of our code runs: bitsandbytes' note that an
# optional faster CPU kernel (the `kernels` package) is missing, and DeepSpeed's accelerator detection on a CPU-only
# machine. Silenced at their source loggers, and only these two messages.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNotice("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("DeepSpeed").addFilter(_DropNotice("Setting accelerator to CPU"))

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
