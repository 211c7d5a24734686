"""Run an unchanged TRL script with trl-dpo-plus in place of TRL's DPO trainer, for this process only.

`trl-dpo-plus run my_dpo.py --loss_type simpo ...`: `trl.DPOTrainer` and `trl.DPOConfig` (and their homes in
`trl.trainer`) resolve to `DPOPlusTrainer` and `DPOPlusConfig` while the script runs, so its own argument parser
accepts every registry loss and `--loss_kwargs`, `--qlora`, `--diagnostics_action`; its arguments pass through.
"""

from __future__ import annotations

import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

import trl
import trl.trainer
from trl.trainer import dpo_config, dpo_trainer

from .config import DPOPlusConfig
from .trainer import DPOPlusTrainer

_TARGETS = [(trl, "DPOTrainer", DPOPlusTrainer), (trl, "DPOConfig", DPOPlusConfig),
            (trl.trainer, "DPOTrainer", DPOPlusTrainer), (trl.trainer, "DPOConfig", DPOPlusConfig),
            (dpo_trainer, "DPOTrainer", DPOPlusTrainer), (dpo_config, "DPOConfig", DPOPlusConfig)]


@contextmanager
def trl_replaced():
    """Within the block, `from trl import DPOTrainer, DPOConfig` gives trl-dpo-plus's classes."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in _TARGETS]
    for module, name, replacement in _TARGETS:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _embedded_alias_resolved(arg: str) -> str:
    """`trl-dpo-plus:stories260K` (the embedded model's alias, as in `train`) as its folder, which a script's own
    `from_pretrained` can load; any other argument as it is."""
    from .assets import EMBEDDED_MODEL

    if arg in (EMBEDDED_MODEL, f"--model_name_or_path={EMBEDDED_MODEL}"):
        from .assets import default_model_path

        return arg.replace(EMBEDDED_MODEL, str(default_model_path()))
    return arg


def run_script(script: str, script_args: list[str]) -> int:
    path = Path(script)
    if not path.is_file():
        print(f"trl-dpo-plus run: no such script: {script}", file=sys.stderr)
        return 2
    if "DPOTrainer" not in path.read_text(errors="replace"):
        print(f"trl-dpo-plus run: {script} does not use TRL's DPOTrainer, so there is nothing to replace. "
              "Run it with python directly.", file=sys.stderr)
        return 2
    created_before = DPOPlusTrainer.instances_created
    argv = sys.argv
    sys.argv = [str(path), *(_embedded_alias_resolved(a) for a in script_args)]
    try:
        with trl_replaced():
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:  # the script's own exit status
        if exit_.code not in (None, 0):
            return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    if DPOPlusTrainer.instances_created == created_before:
        print(f"trl-dpo-plus run: {script} finished without creating a DPOTrainer; nothing was trained with "
              "trl-dpo-plus.", file=sys.stderr)
        return 3
    return 0
