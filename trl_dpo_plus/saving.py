"""Nothing finished is lost: optional outputs are written best-effort, a full disk is named, final weights are checked.

The weights and the tables are what a run is for; the diagnostics plot, `diagnostics.json` and the model card are
optional extras. `best_effort` writes an extra and, when that fails (a full disk, an unwritable folder, a plotting
bug), warns with the file and the reason instead of raising out of `train()` before the user's `save_model`.
`disk_full_named` turns the errors torch and safetensors raise on a full disk (`unexpected pos …`, `file write
failed`, `StorageFull`) into an `OSError(ENOSPC)` that says so. `nonfinite_weights` names the tensors of a model that
hold NaN or infinity, for the card and the command line's exit status.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a write that ran out of space raises, beside OSError(ENOSPC): torch's zip writer and safetensors' Rust writer
_NO_SPACE_MARKERS = ("No space left", "StorageFull", "unexpected pos", "file write failed")
_NAMED = "No space left on the device while writing"


def best_effort(what: str, path, write: Callable[[], T]) -> T | None:
    """`write()`, or `None` with a warning naming `what`, `path` and the reason when it raises."""
    try:
        return write()
    except Exception as err:
        reason = "no space left on the device" if is_no_space(err) else f"{type(err).__name__}: {err}"
        logger.warning("Could not write %s (%s): %s. The run and its weights are not affected; free the space or fix "
                       "the folder, then rebuild it (diagnostics: trl_dpo_plus.diagnostics.rebuild_report)",
                       what, path, str(reason)[:300])
        return None


def is_no_space(err: BaseException | None) -> bool:
    """Whether `err` (or an error it was raised from) is a write that ran out of disk space."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if any(marker in str(err) for marker in _NO_SPACE_MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def disk_full_named(what: str) -> Iterator[None]:
    """Re-raise a full-disk failure while writing `what` as `OSError(ENOSPC)` that says what happened and what to do."""
    try:
        yield
    except Exception as err:
        if not is_no_space(err) or (isinstance(err, OSError) and str(err.strerror).startswith(_NAMED)):
            raise
        raise OSError(errno.ENOSPC, f"{_NAMED} {what}. Free space there (or set "
                      "save_total_limit, or another output_dir), then resume from the last complete checkpoint "
                      "with --resume_from_checkpoint true") from err


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters of `model` that hold NaN or infinity (sharded, empty ones skipped)."""
    return [name for name, param in model.named_parameters()
            if param.is_floating_point() and param.numel() and not torch.isfinite(param.detach()).all()]


def strict_json_value(value: Any) -> tuple[Any, int]:
    """`value` with every NaN/±Infinity float replaced by `None` (strict JSON has no such tokens), and how many."""
    replaced = [0]

    def strict(item):
        if isinstance(item, float) and not math.isfinite(item):
            replaced[0] += 1
            return None
        if isinstance(item, dict):
            return {k: strict(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [strict(v) for v in item]
        return item

    return strict(value), replaced[0]


class RunRecord(TrainerCallback, ExportableState):
    """The objective a run trains with, saved in every checkpoint (`trainer_state.json`, `stateful_callbacks`), so
    that a resume with another loss says so (`check_resumed_losses`)."""

    def __init__(self, loss_type: list[str], loss_kwargs: dict | None = None):
        self.loss_type, self.loss_kwargs = list(loss_type), dict(loss_kwargs or {})

    def state(self) -> dict:
        return {"args": {"loss_type": self.loss_type, "loss_kwargs": self.loss_kwargs}, "attributes": {}}


def check_resumed_losses(stateful_callbacks: dict | None, loss_type: list[str], loss_kwargs: dict) -> None:
    """Warn when a checkpoint was trained with another loss (or other loss hyperparameters) than the run resuming it."""
    saved = (stateful_callbacks or {}).get(RunRecord.__name__)
    saved = saved[0] if isinstance(saved, list) else saved
    if not saved:
        return
    before = saved["args"]
    now = {"loss_type": list(loss_type), "loss_kwargs": dict(loss_kwargs)}
    changed = [key for key in ("loss_type", "loss_kwargs") if before.get(key) != now[key]]
    if changed:
        logger.warning("Resuming a checkpoint trained with %s with %s: the weights, optimizer and schedule carry on, "
                       "the objective changes from here (the card records the new one). Resume with the same loss to "
                       "continue that run.", ", ".join(f"{k}={before.get(k)}" for k in changed),
                       ", ".join(f"{k}={now[k]}" for k in changed))
