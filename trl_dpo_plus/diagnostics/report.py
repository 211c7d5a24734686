"""End-of-run diagnostics report: `diagnostics.json` and `diagnostics.png`, built from the trainer's log history.

Everything the report needs is in the log history (`trainer_state.json`): the diagnostics metrics and flags are
logged like any metric, so `rebuild_report("out/checkpoint-100/trainer_state.json")` reproduces it after the fact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from ..metrics import DIAGNOSTICS_PREFIX as PREFIX
from ..metrics import FLAG_PREFIX, REPORT_SERIES, UNPAIRED_MARKERS
from ..saving import best_effort, strict_json_value
from .base import REMEDIES

logger = logging.getLogger(__name__)

REPORT_FILE = "diagnostics.json"


def _series(log_history: list[dict], mode: str) -> dict[str, list[tuple[int, float]]]:
    prefix = "eval_" if mode == "eval" else ""
    out = {}
    for name, keys in REPORT_SERIES.items():
        for key in keys:
            points = [(h["step"], h[prefix + key]) for h in log_history if prefix + key in h and "step" in h]
            if points:
                out[name] = points
                break
    return out


def _flags(log_history: list[dict], mode: str) -> list[dict]:
    """Each flag episode once: the first step of a run of consecutive logs where it was raised."""
    prefix = ("eval_" if mode == "eval" else "") + FLAG_PREFIX
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
    unpaired = any(k.startswith(UNPAIRED_MARKERS) for h in log_history for k in h)
    report = {"data": "unpaired" if unpaired else "paired", "remedies": REMEDIES}
    for mode in ("train", "eval"):
        series = _series(log_history, mode)
        if not series:
            continue
        first_last = {name: {"first": points[0][1], "last": points[-1][1], "steps": [points[0][0], points[-1][0]]}
                      for name, points in series.items()}
        flags = _flags(log_history, mode)
        report[mode] = {"summary": first_last, "flags": flags, "healthy": not flags, "series": series}
    return report


def _line(ax, series: dict, name: str, **style) -> None:
    if name in series:
        steps, values = zip(*series[name])
        ax.plot(steps, values, marker="o", ms=2.5, **style)


def _eval_points(ax, series: dict, name: str, **style) -> None:
    if name in series:
        steps, values = zip(*series[name])
        ax.scatter(steps, values, marker="D", s=22, zorder=3, **style)


def plot_report(report: dict, path: str | Path, title: str = "trl-dpo-plus diagnostics") -> Path | None:
    """Four panels over steps: chosen vs rejected log-ratio (likelihood displacement), the reward margin's p10–p90
    band, the loss, and the length bias; evaluation points as diamonds, flags as dashed lines.

    Drawn on a `matplotlib.figure.Figure` (no pyplot), so the user's backend, e.g. a notebook's, is left alone.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'trl-dpo-plus[plot]'): no diagnostics plot")
        return None
    train, evaluation = report.get("train"), (report.get("eval") or {}).get("series", {})
    if not train:
        logger.info("No diagnostics plot: the run logged no training step (logging_steps is larger than the run?)")
        return None
    series = train["series"]
    fig = Figure(figsize=(8.5, 10), layout="constrained")
    ratio, margin, loss, length = fig.subplots(4, 1, sharex=True)
    fig.suptitle(title)

    good, bad = ("desirable", "undesirable") if report.get("data") == "unpaired" else ("chosen", "rejected")
    _line(ratio, series, "chosen_logratio", color="tab:green", label=good)
    _line(ratio, series, "rejected_logratio", color="tab:red", label=bad)
    ratio.set_ylabel("log π/π_ref\nper token (nats)")
    if "chosen_logratio" not in series:
        ratio.text(0.5, 0.5, "no reference log-ratios (reference-free loss)", ha="center", transform=ratio.transAxes)

    if "margin_p10" in series:
        steps, p10 = zip(*series["margin_p10"])
        margin.fill_between(steps, p10, [v for _, v in series["margin_p90"]], color="tab:blue", alpha=0.25,
                            label="p10–p90")
        _line(margin, series, "margin_p50", color="tab:blue", label="median")
    else:
        _line(margin, series, "margin_mean", color="tab:blue", label="mean")
    _eval_points(margin, evaluation, "margin_mean", color="black", label="eval mean")
    margin.set_ylabel("reward margin" if good == "chosen" else "signed reward\n(+ desirable, − undesirable)")

    _line(loss, series, "loss", color="tab:purple", label="train")
    _eval_points(loss, evaluation, "loss", color="black", label="eval")
    loss.set_ylabel("loss")

    _line(length, series, "length_corr", color="tab:brown", label="corr(margin, length difference)")
    _eval_points(length, evaluation, "length_corr", color="black", label="eval")
    length.set_ylabel("length bias")
    length.set_xlabel("step")

    empty = {margin: "no reward margins were logged", loss: "no loss was logged",
             length: "no length bias: unpaired data has no pairs to compare" if good != "chosen" else
             "no length bias was logged (too few pairs per log)"}
    for ax, why in empty.items():  # a panel with no data says why, instead of an empty frame
        if not ax.lines and not ax.collections:
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in (ratio, margin, length):
        ax.axhline(0, color="grey", lw=0.8)
    for ax in (ratio, margin, loss, length):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    by_step: dict = {}
    for flag in train["flags"]:
        by_step.setdefault(flag["step"], []).append(flag["flag"])
    for step, names in by_step.items():  # one label per step, so flags raised together do not overprint
        for ax in (ratio, margin, loss, length):
            ax.axvline(step, color="tab:orange", ls="--", lw=1)
        ratio.annotate(", ".join(names), (step, 0.97), xycoords=("data", "axes fraction"), rotation=90, va="top",
                       ha="right", fontsize=7, color="tab:orange")
    nonfinite = [f["step"] for f in train["flags"] if f["flag"] == "nonfinite"]
    if nonfinite:
        ratio.text(0.98, 0.95, f"non-finite values from step {min(nonfinite)}:\nthe run diverged; later points are missing",
                   ha="right", va="top", transform=ratio.transAxes, color="tab:red", fontsize=9)
    steps = [step for points in (*series.values(), *evaluation.values()) for step, _ in points]
    low, high = min(steps), max(steps)  # every logged step, also non-finite ones (a diverged run shows where it went)
    pad = max(1.0 if high - low < 2 else 0.5, 0.03 * (high - low))
    length.set_xlim(low - pad, high + pad)
    length.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


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
    plot = best_effort("the diagnostics plot", output_dir / "diagnostics.png",
                       lambda: plot_report(report, output_dir / "diagnostics.png"))
    report["plot"] = plot.name if plot else None
    report, replaced = strict_json_value(report)
    if replaced:
        report["note"] = f"{replaced} non-finite values (NaN or ±Infinity) are written as null"
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def write_interrupted_report(log_history: list[dict], output_dir: str | Path, error: BaseException) -> None:
    """The report of a run that raised, marked `interrupted` with the error; a failure here is logged, never raised
    (it must not mask the training error). An attempt that logged no step (e.g. a resume from a checkpoint that does
    not exist) leaves a finished run's report in place."""
    existing = Path(output_dir) / REPORT_FILE
    if not any("step" in h for h in log_history) and existing.exists():
        logger.info("Kept %s of the earlier run: this attempt stopped before logging a step", existing)
        return
    try:
        write_report(log_history, output_dir, interrupted=f"{type(error).__name__}: {error}"[:500])
    except Exception as report_error:
        logger.warning("Could not write the diagnostics report after the error: %s", report_error)


def read_report(output_dir: str | Path) -> dict | None:
    """The `diagnostics.json` a run wrote into `output_dir`, or `None` when there is none (the model card and
    `compare` read it)."""
    path = Path(output_dir) / REPORT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def rebuild_report(trainer_state: str | Path, output_dir: str | Path | None = None) -> dict:
    """Rebuild the report from a `trainer_state.json` (its `log_history`)."""
    trainer_state = Path(trainer_state)
    log_history = json.loads(trainer_state.read_text())["log_history"]
    return write_report(log_history, output_dir or trainer_state.parent)


class DiagnosticsReportCallback(TrainerCallback):
    """Writes the report into `output_dir` at the end of training and after each evaluation (main process)."""

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._write(args, state)

    @staticmethod
    def _write(args, state) -> None:
        """Best-effort: a report that cannot be written warns and never costs the weights saved after training."""
        if state.is_world_process_zero:
            best_effort("the diagnostics report", Path(args.output_dir) / REPORT_FILE,
                        lambda: write_report(state.log_history, args.output_dir))
