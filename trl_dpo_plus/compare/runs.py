"""What a comparison runs: one `RunSpec` per loss (`"ipo:beta=0.5"`), each run's config, and its row of results."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..config import DPOPlusConfig
from ..losses import get_loss


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a registered loss and its hyperparameters (`beta` among them)."""

    loss: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """The run's name in the table and its folder: `ipo`, `ipo-beta0.5`."""
        extra = "".join(f"-{k}{v}" for k, v in self.kwargs.items())
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.loss}{extra}")


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_run(text: str | RunSpec) -> RunSpec:
    """`"ipo"`, `"ipo:beta=0.5"`, `"simpo:beta=2.5,gamma=0.55"` → `RunSpec` (the loss name checked)."""
    if isinstance(text, RunSpec):
        get_loss(text.loss)
        return text
    name, _, rest = text.partition(":")
    get_loss(name.strip())  # an unknown name raises with the closest registered ones
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{text!r}: write each hyperparameter as key=value, e.g. 'ipo:beta=0.5'")
        kwargs[key.strip()] = _value(value.strip())
    return RunSpec(name.strip(), kwargs)


def run_config(base: DPOPlusConfig, run: RunSpec, output_dir: Path, reference_cache_dir: str | None) -> DPOPlusConfig:
    """`base` with this run's loss, hyperparameters and output folder (checked now, before any run trains)."""
    kwargs = dict(run.kwargs)
    beta = kwargs.pop("beta", None if base.beta_per_loss else base.beta)
    spec = get_loss(run.loss)
    return dataclasses.replace(
        base, loss_type=[run.loss], beta=beta, loss_kwargs={run.loss: kwargs} if kwargs else None, loss_weights=None,
        output_dir=str(output_dir / run.label), unpair=spec.data == "unpaired",
        reference_cache_dir=reference_cache_dir if spec.requires_reference else None,
        train_sampling_strategy=None if base.sampling_by_loss else base.train_sampling_strategy,
    )


@dataclasses.dataclass
class RunResult:
    """One row of the table."""

    name: str
    loss: str
    hyperparameters: dict[str, Any]
    reference_free: bool
    status: str = "ok"
    error: str | None = None
    steps: int = 0
    seconds: float = 0.0
    train_reward_accuracy: float | None = None
    flags: list[str] = dataclasses.field(default_factory=list)
    reference_rows: int = 0  # rows the reference forward ran on in this run (0 when it read the cache)
    reference_rows_alone: int = 0  # rows its reference pass covers when run alone (train + held-out, as prepared)
    held_out: dict[str, Any] = dataclasses.field(default_factory=dict)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_dir: str = ""
