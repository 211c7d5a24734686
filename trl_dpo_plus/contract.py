"""The TRL code this package overrides or relies on, checked against the TRL installed, when a trainer is built.

`trl_dpo_plus` works beside any TRL 1.x whose relied-on code is the code it was tested with: the trainer overrides
TRL's private `_compute_loss` and extends five more `DPOTrainer` methods, runs `KTOTrainer._prepare_dataset` on
itself, and calls TRL's fused LM head. Each is pinned by a hash of its source (TRL 1.16.0). When a trainer is built:

- the installed TRL is the tested one: nothing to say;
- another TRL whose pinned code is unchanged: one INFO line, and training goes on;
- any pinned code changed: a `RuntimeError` naming what changed, the tested versions and the pin to install.

`tests/test_trl_contract.py` checks the same pins, with what each seam needs of the upstream code.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging

logger = logging.getLogger(__name__)

TESTED = "1.16"  # the TRL minor version the pins were taken from (and CI runs)
INSTALL_TESTED = "pip install 'trl>=1.16,<1.17'"

# name -> (module, qualified name, sha256[:16] of its source in TRL 1.16.0, what relies on it)
PINS = {
    "DPOTrainer._compute_loss": ("trl.trainer.dpo_trainer", "DPOTrainer._compute_loss", "5e58a1699e0d76cd",
                                 "overridden by DPOPlusTrainer._compute_loss"),
    "DPOTrainer.compute_ref_log_probs": ("trl.trainer.dpo_trainer", "DPOTrainer.compute_ref_log_probs",
                                         "90611af9cbadb8ec", "the padded layout's reference forward"),
    "DPOTrainer.log": ("trl.trainer.dpo_trainer", "DPOTrainer.log", "e80e122cfe5fd8ad", "extended by DPOPlusTrainer.log"),
    "DPOTrainer._precompute_ref_logps": ("trl.trainer.dpo_trainer", "DPOTrainer._precompute_ref_logps",
                                         "f2c098c7da6ca701", "collated in the chosen layout, cached"),
    "DPOTrainer._prepare_dataset": ("trl.trainer.dpo_trainer", "DPOTrainer._prepare_dataset", "35e349e8e8266df4",
                                    "extended: the error when max_length drops every pair"),
    "DPOTrainer._set_signature_columns_if_needed": ("trl.trainer.dpo_trainer",
                                                    "DPOTrainer._set_signature_columns_if_needed", "71225a628baed4cb",
                                                    "extended: keeps the unpaired rows' columns"),
    "KTOTrainer._prepare_dataset": ("trl.trainer.kto_trainer", "KTOTrainer._prepare_dataset", "d22cf45470e637d6",
                                    "run on DPOPlusTrainer for unpaired rows"),
    "add_fused_lm_head": ("trl.trainer.utils", "add_fused_lm_head", "422d009f04b66659",
                          "the layouts' LM head and its compact path"),
}


def source_digest(module: str, qualname: str) -> str:
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
        if inspect.isclass(obj) and not obj.__module__.startswith("trl."):  # `trl-dpo-plus run` put ours there
            obj = next(c for c in obj.__mro__ if c.__module__ == module and c.__name__ == part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def changed_pins() -> list[str]:
    """The pinned TRL code that differs from the TRL installed (empty when everything matches)."""
    return [name for name, (module, qualname, digest, _) in PINS.items() if source_digest(module, qualname) != digest]


@functools.lru_cache(maxsize=1)
def check_trl_contract() -> None:
    """Raise, naming the versions and the fix, when the installed TRL changed code this package relies on; log one
    INFO line for an untested TRL whose relied-on code is unchanged. Checked once per process."""
    import trl

    changed = changed_pins()
    if changed:
        uses = "; ".join(f"{name} ({PINS[name][3]})" for name in changed)
        raise RuntimeError(f"trl {trl.__version__} changed code trl-dpo-plus relies on: {uses}. trl-dpo-plus is tested "
                           f"with trl {TESTED}.x; install it ({INSTALL_TESTED}), or a trl-dpo-plus release that "
                           "supports this TRL.")
    if not trl.__version__.startswith(TESTED + "."):
        logger.info("trl %s is not the tested %s.x, but the %d TRL methods trl-dpo-plus relies on are unchanged: "
                    "going on", trl.__version__, TESTED, len(PINS))
