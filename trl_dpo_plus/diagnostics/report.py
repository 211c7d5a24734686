"""End-of-run diagnostics report: `diagnostics.json` and `diagnostics.png`, built from the trainer's log history.

Everything the report needs is in the log history (`trainer_state.json`): the diagnostics metrics and flags are
logged like any metric, so `rebuild_report("out/checkpoint-100/trainer_state.json")` reproduces it after the fact.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from transformers import TrainerCallback

from .callbacks import PREFIX, REMEDIES

logger = logging.getLogger(__name__)

SERIES = {
    "chosen_logratio": ("dpo_plus/chosen_logratio_per_token",),
    "rejected_logratio": ("dpo_plus/rejected_logratio_per_token",),
    "margin_mean": (f"{PREFIX}/margin/mean", "rewards/margins"),
    "margin_p10": (f"{PREFIX}/margin/p10",),
    "margin_p50": (f"{PREFIX}/margin/p50",),
    "margin_p90": (f"{PREFIX}/margin/p90",),
    "accuracy": (f"{PREFIX}/margin/accuracy", "rewards/accuracies"),
    "length_r2": (f"{PREFIX}/length/r2",),
    "loss": ("loss",),
}


def _series(log_history: list[dict], mode: str) -> dict[str, list[tuple[int, float]]]:
    prefix = "eval_" if mode == "eval" else ""
    out = {}
    for name, keys in SERIES.items():
        for key in keys:
            points = [(h["step"], h[prefix + key]) for h in log_history if prefix + key in h and "step" in h]
            if points:
                out[name] = points
                break
    return out


def _flags(log_history: list[dict], mode: str) -> list[dict]:
    """Each flag episode once: the first step of a run of consecutive logs where it was raised."""
    prefix = ("eval_" if mode == "eval" else "") + f"{PREFIX}/flag/"
    flags, active = [], set()
    for h in log_history:
        raised = {k[len(prefix) :] for k in h if k.startswith(prefix)}
        has_diagnostics = any(k.startswith(("eval_" if mode == "eval" else "") + PREFIX) for k in h)
        if not has_diagnostics:
            continue
        for name in sorted(raised - active):
            numbers = {k.split(f"{PREFIX}/", 1)[1]: v for k, v in h.items() if f"{PREFIX}/" in k and "/flag/" not in k}
            flags.append({"flag": name, "step": h.get("step"), "numbers": numbers})
        active = raised
    return flags


def build_report(log_history: list[dict]) -> dict:
    report = {"remedies": REMEDIES}
    for mode in ("train", "eval"):
        series = _series(log_history, mode)
        if not series:
            continue
        first_last = {name: {"first": points[0][1], "last": points[-1][1], "steps": [points[0][0], points[-1][0]]}
                      for name, points in series.items()}
        flags = _flags(log_history, mode)
        report[mode] = {"summary": first_last, "flags": flags, "healthy": not flags, "series": series}
    return report


def plot_report(report: dict, path: str | Path, title: str = "trl-dpo-plus diagnostics") -> Path | None:
    """chosen vs rejected per-token log-ratio over steps, the margin's p10–p90 band, flags marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'trl-dpo-plus[plot]'): no diagnostics plot")
        return None
    train = report.get("train")
    if not train:
        return None
    series = train["series"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, color, label in (("chosen_logratio", "tab:green", "chosen"), ("rejected_logratio", "tab:red", "rejected")):
        if name in series:
            steps, values = zip(*series[name])
            top.plot(steps, values, color=color, marker="o", ms=2.5, label=f"{label}: log π/π_ref per token")
    top.axhline(0, color="grey", lw=0.8)
    top.set_ylabel("nats / token")
    if "chosen_logratio" not in series:
        top.text(0.5, 0.5, "no reference log-ratios (reference-free loss)", ha="center", transform=top.transAxes)
    else:
        top.legend(loc="best", fontsize=8)
    top.set_title(title)
    if "margin_p10" in series:
        steps, p10 = zip(*series["margin_p10"])
        _, p90 = zip(*series["margin_p90"])
        bottom.fill_between(steps, p10, p90, color="tab:blue", alpha=0.25, label="margin p10–p90")
        bottom.plot(*zip(*series["margin_p50"]), color="tab:blue", marker="o", ms=2.5, label="margin p50")
    elif "margin_mean" in series:
        bottom.plot(*zip(*series["margin_mean"]), color="tab:blue", label="margin mean")
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_xlabel("step")
    bottom.set_ylabel("reward margin")
    by_step: dict = {}
    for flag in train["flags"]:
        by_step.setdefault(flag["step"], []).append(flag["flag"])
    for step, names in by_step.items():  # one label per step, so flags raised together do not overprint
        for ax in (top, bottom):
            ax.axvline(step, color="tab:orange", ls="--", lw=1)
        top.annotate(", ".join(names), (step, top.get_ylim()[1]), rotation=90, va="top", fontsize=7, color="tab:orange")
    nonfinite = [f["step"] for f in train["flags"] if f["flag"] == "nonfinite"]
    if nonfinite:
        top.text(0.98, 0.95, f"non-finite values from step {min(nonfinite)}:\nthe run diverged; later points are missing",
                 ha="right", va="top", transform=top.transAxes, color="tab:red", fontsize=9)
    plotted = ("chosen_logratio", "rejected_logratio", "margin_p10", "margin_p50", "margin_p90", "margin_mean")
    steps = [step for name in plotted for step, _ in series.get(name, [])]
    if steps:  # every logged step, also those whose values were non-finite (a diverged run shows where it went)
        low, high = min(steps), max(steps)
        pad = max(1.0 if high - low < 2 else 0.5, 0.03 * (high - low))
        bottom.set_xlim(low - pad, high + pad)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _strict(value, replaced: list[int]):
    """The value with every NaN/±Infinity float replaced by None (strict JSON has no such tokens), counted."""
    if isinstance(value, float) and not math.isfinite(value):
        replaced[0] += 1
        return None
    if isinstance(value, dict):
        return {k: _strict(v, replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v, replaced) for v in value]
    return value


def write_report(log_history: list[dict], output_dir: str | Path, interrupted: str | None = None) -> dict:
    """Write `diagnostics.json` (strict JSON: non-finite numbers become `null`, with a note) and `diagnostics.png`
    (when matplotlib is there) into `output_dir`. `interrupted` (the error) marks a run that did not finish."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(log_history)
    if interrupted is not None:
        report["interrupted"] = interrupted
        for mode in ("train", "eval"):
            if mode in report:
                report[mode]["healthy"] = False
    plot = plot_report(report, output_dir / "diagnostics.png")
    report["plot"] = plot.name if plot else None
    replaced = [0]
    report = _strict(report, replaced)
    if replaced[0]:
        report["note"] = f"{replaced[0]} non-finite values (NaN or ±Infinity) are written as null"
    (output_dir / "diagnostics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def rebuild_report(trainer_state: str | Path, output_dir: str | Path | None = None) -> dict:
    """Rebuild the report from a `trainer_state.json` (its `log_history`)."""
    trainer_state = Path(trainer_state)
    log_history = json.loads(trainer_state.read_text())["log_history"]
    return write_report(log_history, output_dir or trainer_state.parent)


class DiagnosticsReportCallback(TrainerCallback):
    """Writes the report into `output_dir` at the end of training and after each evaluation (main process)."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_report(state.log_history, args.output_dir)

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_report(state.log_history, args.output_dir)
