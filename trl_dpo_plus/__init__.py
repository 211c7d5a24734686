"""trl-dpo-plus: every preference loss for TRL's DPOTrainer from one registry.

Migrating a TRL script is one import: `from trl_dpo_plus import DPOConfig, DPOTrainer`.
"""

from .assets import default_model_path
from .config import DPOPlusConfig
from .data import check_preference_dataset, load_preference_dataset
from .losses import LossOutput, LossSpec, PreferenceBatch, get_loss, list_losses, register_loss, validate_loss_kwargs
from .qlora import lora_defaults, qlora_defaults
from .trainer import DPOPlusTrainer

DPOConfig = DPOPlusConfig
DPOTrainer = DPOPlusTrainer

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOPlusConfig",
    "DPOPlusTrainer",
    "DPOTrainer",
    "LossOutput",
    "LossSpec",
    "PreferenceBatch",
    "check_preference_dataset",
    "default_model_path",
    "get_loss",
    "list_losses",
    "load_preference_dataset",
    "lora_defaults",
    "qlora_defaults",
    "register_loss",
    "validate_loss_kwargs",
]
