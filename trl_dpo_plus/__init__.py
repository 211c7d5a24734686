"""trl-dpo-plus: every preference loss for TRL's DPOTrainer from one registry."""

from .losses import LossOutput, LossSpec, PreferenceBatch, get_loss, list_losses, register_loss, validate_loss_kwargs

__version__ = "0.1.0"

__all__ = [
    "LossOutput",
    "LossSpec",
    "PreferenceBatch",
    "get_loss",
    "list_losses",
    "register_loss",
    "validate_loss_kwargs",
]
