"""Drop-in for `trl.KTOTrainer` and `trl.KTOConfig`: `from trl_dpo_plus import KTOConfig, KTOTrainer` is the whole
migration of a TRL KTO script.

Both are the DPO classes with TRL's KTO defaults: the loss is `kto`; paired rows (prompt, chosen, rejected) are
unpaired as `trl.KTOTrainer` unpairs them (each chosen completion a desirable row, each rejected one an undesirable
row, in TRL's order), with one log line; a trainer built without a config gets `KTOConfig(output_dir="<model>-KTO")`;
a `trl.KTOConfig` is converted field by field; the model card is tagged `kto`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .config import DPOPlusConfig
from .trainer import DPOPlusTrainer


@dataclasses.dataclass
class KTOConfig(DPOPlusConfig):
    """`DPOPlusConfig` with TRL's `KTOConfig` defaults: `loss_type=["kto"]`, and paired data unpaired in TRL's order."""

    loss_type: list[str] = dataclasses.field(default_factory=lambda: ["kto"], metadata={
        "help": "Preference loss(es) from the trl_dpo_plus registry; 'kto' as in trl.KTOConfig."})
    unpair: bool = dataclasses.field(default=True, metadata={
        "help": "Turn paired rows into unpaired ones (chosen → desirable, rejected → undesirable), as trl.KTOTrainer "
                "does."})
    unpair_shuffle: ClassVar[bool] = False  # TRL's order: within each block of 1000 pairs, the chosen rows first

    def __post_init__(self):
        from .losses import get_loss

        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if self.unpair and names and get_loss(names[0]).data == "paired":
            self.unpair = False  # a paired loss in a KTOConfig trains on the pairs themselves
        super().__post_init__()


class KTOTrainer(DPOPlusTrainer):
    """`DPOPlusTrainer` with TRL's `KTOTrainer` defaults (see the module docstring); arguments are TRL's."""

    _tag_names = ["trl", "kto", "trl-dpo-plus"]

    def __init__(self, model, ref_model=None, args=None, *pos_args, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = KTOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-KTO")
        elif not isinstance(args, DPOPlusConfig):  # trl.KTOConfig (or a TRL DPOConfig): the same field values
            ours = {f.name for f in dataclasses.fields(KTOConfig) if f.init}
            args = KTOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                                if f.init and f.name in ours})
        super().__init__(model, ref_model, args, *pos_args, **kwargs)
