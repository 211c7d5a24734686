"""One registry of preference losses: the single source of loss names for the config, the CLI and the docs.

Register a loss with the decorator; third-party packages register theirs through the `trl_dpo_plus.losses`
entry-point group (the entry point names a module or a callable; importing it runs its `@register_loss`).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from ._types import LossOutput, PreferenceBatch, UnpairedBatch, UnpairedLossOutput

ENTRY_POINT_GROUP = "trl_dpo_plus.losses"
# What a loss trains on: pairs (prompt, chosen, rejected) or unpaired completions (prompt, completion, label)
DATA_KINDS = {
    "paired": "pairs (prompt, chosen, rejected)",
    "unpaired": "unpaired completions (prompt, completion, label: bool)",
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

LossFn = Callable[..., LossOutput | UnpairedLossOutput]


@dataclass(frozen=True)
class Interval:
    """A real interval such as `(0, inf)` or `[0, 0.5)`, parsed from that text."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        match = re.fullmatch(r"\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])\s*", text)
        if match is None:
            raise ValueError(f"Bad interval {text!r}: write it like '(0, inf)' or '[0, 0.5)'")
        return cls(float(match[2]), float(match[3]), match[1] == "[", match[4] == "]")

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def __str__(self) -> str:
        fmt = lambda v: "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"  # noqa: E731
        return f"{'[' if self.low_closed else '('}{fmt(self.low)}, {fmt(self.high)}{']' if self.high_closed else ')'}"


@dataclass(frozen=True)
class LossSpec:
    """Everything the trainer, the config and the docs need to know about one registered loss."""

    name: str
    fn: LossFn
    requires_reference: bool
    requires_kl: bool = False
    supports_f_divergence: bool = False
    per_pair: bool = True
    paper: str | None = None
    ranges: Mapping[str, Interval] = field(default_factory=dict)
    data: str = "paired"
    whole_batch: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """Keyword hyperparameters and their defaults, read from the function's signature."""
        return {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    @property
    def formula(self) -> str:
        """The docstring's `Loss:` line: the formula in one line of Unicode math."""
        return _doc_field(self.fn, "Loss:")

    @property
    def use_when(self) -> str:
        """The docstring's `Use:` line: when to pick this loss."""
        return _doc_field(self.fn, "Use:")

    def __call__(self, batch: PreferenceBatch | UnpairedBatch, **kwargs: Any) -> LossOutput | UnpairedLossOutput:
        return self.fn(batch, **kwargs)


def _doc_field(fn: Callable, prefix: str) -> str:
    for line in (inspect.getdoc(fn) or "").splitlines():
        if line.strip().startswith(prefix):
            return line.strip().removeprefix(prefix).strip()
    return ""


_REGISTRY: dict[str, LossSpec] = {}
_entry_points_loaded = False


def register_loss(
    name: str,
    *,
    requires_reference: bool,
    requires_kl: bool = False,
    supports_f_divergence: bool = False,
    per_pair: bool = True,
    paper: str | None = None,
    ranges: Mapping[str, str] | None = None,
    data: str = "paired",
    whole_batch: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Register `fn(batch: PreferenceBatch, *, beta, ...) -> LossOutput` under `name` (for `data="unpaired"`:
    `fn(batch: UnpairedBatch, *, beta, ...) -> UnpairedLossOutput`).

    Args:
        name: lowercase snake_case; registering a taken name raises.
        requires_reference: whether the loss reads `ref_*_logps`. When every selected loss says False, the trainer
            loads no reference model and runs no reference forward.
        requires_kl: whether the loss reads a KL baseline: `chosen_kl`/`rejected_kl` of a paired batch, or the `kl`
            of an unpaired batch (then the trainer builds mismatched KL completions for it).
        supports_f_divergence: whether the loss reads `chosen_scores`/`rejected_scores` (f-DPO).
        per_pair: False for losses that mix pairs (aot sorts across the batch, sft is a batch token mean).
        paper: link to the method's paper.
        ranges: allowed values of keyword hyperparameters, e.g. `{"beta": "(0, inf)"}`.
        data: `"paired"` (prompt/chosen/rejected rows) or `"unpaired"` (prompt/completion/label rows); the trainer
            refuses a dataset of the other kind at preparation.
        whole_batch: True for losses that sort or rank across the whole batch (aot): per-pair weights (WPO) cannot
            apply to them, and on several processes each would see only its own pairs, so the trainer refuses both.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"Loss name {name!r} must be lowercase snake_case, e.g. 'my_loss'")
    if data not in DATA_KINDS:
        raise ValueError(f"Loss {name!r}: data={data!r}; choose one of {list(DATA_KINDS)}")

    def decorator(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(
                f"A loss named {name!r} is already registered ({_REGISTRY[name].fn.__module__}."
                f"{_REGISTRY[name].fn.__qualname__}); pick another name"
            )
        params = inspect.signature(fn).parameters
        if "beta" not in params or params["beta"].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"Loss {name!r} must take `beta` as a keyword-only argument: fn(batch, *, beta=..., ...)")
        parsed = {key: Interval.parse(text) for key, text in (ranges or {}).items()}
        unknown = set(parsed) - set(params)
        if unknown:
            raise ValueError(f"Loss {name!r} declares ranges for {sorted(unknown)}, which it does not take")
        _REGISTRY[name] = LossSpec(
            name=name,
            fn=fn,
            requires_reference=requires_reference,
            requires_kl=requires_kl,
            supports_f_divergence=supports_f_divergence,
            per_pair=per_pair,
            paper=paper,
            ranges=parsed,
            data=data,
            whole_batch=whole_batch,
        )
        return fn

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not hide the built-in losses
            raise ImportError(
                f"Loading the trl_dpo_plus loss plugin {ep.name!r} ({ep.value}) failed: {err}. "
                f"Fix or uninstall the package that provides it."
            ) from err


def list_losses() -> list[str]:
    """Names of all registered losses, built-in and from installed plugins, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    """The spec of a registered loss; an unknown name raises listing the names and the closest match."""
    _load_entry_points()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown loss {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")


def validate_loss_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Check hyperparameters against a loss's signature and ranges; return them merged over its defaults."""
    spec = get_loss(name)
    defaults = spec.defaults
    for key, value in kwargs.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Loss {name!r} has no hyperparameter {key!r}.{hint} It takes: {', '.join(defaults) or 'none'}"
            )
        if isinstance(defaults[key], (int, float)) and not isinstance(defaults[key], bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Loss {name!r}: {key} must be a number, got {value!r}")
        if key in spec.ranges and value not in spec.ranges[key]:
            raise ValueError(f"Loss {name!r}: {key}={value!r} is out of range; it must lie in {spec.ranges[key]}")
    return {**defaults, **kwargs}
