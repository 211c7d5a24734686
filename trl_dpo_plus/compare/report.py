"""The comparison's report: `comparison.md` (the table and what each column means), `comparison.json` and
`comparison.png`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..saving import best_effort, strict_json_value
from .runs import RunResult


@dataclasses.dataclass
class Comparison:
    runs: list[RunResult]
    base_generation: dict[str, Any]
    reference: dict[str, Any]
    setup: dict[str, Any]
    files: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)  # what the report left out, and why

    def to_dict(self) -> dict:
        return {"setup": self.setup, "reference": self.reference, "base_generation": self.base_generation,
                "runs": [dataclasses.asdict(r) for r in self.runs], "files": self.files, "notes": self.notes}


COLUMNS = {
    "reward acc": "held-out reward accuracy: share of held-out pairs whose chosen reward (as the run's loss defines "
                  "it) beats the rejected one, ± its standard error √(p(1−p)/n) over the n held-out pairs",
    "margin p10/p50/p90": "quantiles of the held-out reward margin (chosen − rejected reward, the loss's own scale)",
    "chosen / rejected log-ratio": "mean log π − log π_ref per token of the held-out chosen / rejected completions; "
                                   "rejected falling far faster than chosen rises, or chosen below 0, is likelihood "
                                   "displacement (— for reference-free losses: their reward is no log-ratio)",
    "length R²": "R² of the held-out margin against the chosen − rejected length gap (high: the margin is length)",
    "KL/token": "exact KL(π‖π_ref) per token, from both next-token distributions at the held-out completions' "
                "positions (π_ref: the base model)",
    "flags": "diagnostics flags raised during training (name@step; see diagnostics.json in the run's folder)",
    "time": "wall time of the run (training, saving; the held-out pass is shared)",
    "win-rate": "share of held-out prompt samples where the run's reward_fn score beats the base model's sample of the "
                "same prompt and index (ties ½)",
    "reward": "mean reward_fn score of the samples (base model → this run)",
    "fluency": "base model's per-token log-likelihood of the run's samples (base's own samples in the header)",
    "sample KL": "Monte-Carlo KL(π‖π_base) in nats per completion, from the run's own samples",
}


ADAPTER_WORDS = {"lora": "LoRA adapters", "qlora": "QLoRA adapters"}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def _with_error(accuracy: float | None, pairs: int | None) -> str:
    """An accuracy with its standard error over `pairs` held-out pairs, `√(p(1−p)/n)`: 0.52 ± 0.03 and 0.54 ± 0.03
    on 294 pairs are not a ranking."""
    if accuracy is None or not pairs or not math.isfinite(accuracy):
        return _fmt(accuracy)
    return f"{accuracy:.2f} ± {math.sqrt(accuracy * (1 - accuracy) / pairs):.2f}"


def markdown_table(comparison: Comparison) -> str:
    generation = bool(comparison.base_generation)
    header = ["run", "reward acc", "margin p10/p50/p90", "chosen / rejected log-ratio", "length R²", "KL/token"]
    if generation:
        header += ["win-rate", "reward", "fluency", "sample KL"]
    header += ["flags", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = comparison.base_generation
    for r in comparison.runs:
        name = f"{r.name}" + (" (reference-free)" if r.reference_free else "")
        if r.status != "ok":
            cells = [name, f"**failed**: {r.error}"] + [""] * (len(header) - 3) + [f"{r.seconds:.0f} s"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            continue
        h = r.held_out
        q = h.get("margin_quantiles") or [None] * 3
        ratios = "—" if h.get("chosen_logratio_per_token") is None else (
            f"{h['chosen_logratio_per_token']:+.3f} / {h['rejected_logratio_per_token']:+.3f}")
        cells = [name, _with_error(h.get("reward_accuracy"), h.get("pairs")), " / ".join(_fmt(v) for v in q), ratios,
                 _fmt(h.get("length_r2")), _fmt(h.get("kl_per_token"), 4)]
        if generation:
            g = r.generation
            cells += [_fmt(g.get("win_rate")), f"{_fmt(base.get('mean_reward'))} → {_fmt(g.get('mean_reward'))}",
                      _fmt(g.get("fluency")), _fmt(g.get("sample_kl"), 1)]
        cells += [", ".join(r.flags) or "none", f"{r.seconds:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(comparison: Comparison, out_dir: Path) -> dict[str, str]:
    files = {"json": "comparison.json", "markdown": "comparison.md"}
    setup, ref = comparison.setup, comparison.reference
    scored = next((r.held_out["pairs"] for r in comparison.runs if r.held_out), setup["held_out_pairs"])
    held_out = (f"{setup['held_out_pairs']} held-out pairs" if scored == setup["held_out_pairs"] else
                f"{setup['held_out_pairs']} held-out pairs ({scored} fit max_length and are scored)")
    text = [
        "# Loss comparison", "",
        f"{setup['model']}, {ADAPTER_WORDS.get(setup['adapters'], setup['adapters'])}; {setup['train_pairs']} train pairs, {held_out}; lr {setup['learning_rate']:g}, batch {setup['batch_size']}, "
        + (f"{setup['max_steps']} steps" if setup["max_steps"] and setup["max_steps"] > 0 else f"{setup['epochs']:g} epochs")
        + f", seed {setup['seed']}, max_length {setup['max_length']}. Every run: same data, seed and schedule.", "",
        markdown_table(comparison), "",
    ]
    if ref["reference_based_runs"]:
        text.append(f"Reference log-probs: the reference forward ran on {ref['forward_rows']} rows for "
                    f"{ref['reference_based_runs']} reference-based runs, whose own passes would cover "
                    f"{ref['forward_rows_unshared']} rows"
                    + (f" (shared through `{ref['cache_dir']}`)." if ref["shared"] else " (not shared)."))
        text.append("")
    if comparison.base_generation:
        b = comparison.base_generation
        text.append(f"Samples: {b['prompts']} held-out prompts × {b['samples_per_prompt']}, up to {b['max_new_tokens']} "
                    f"new tokens, temperature 1. Base model: mean reward {b['mean_reward']:.2f}, fluency "
                    f"{b['fluency']:.2f} nats/token.")
        text.append("")
    text += ["Columns:", ""] + [f"- **{k}**: {v}" for k, v in COLUMNS.items()
                                if comparison.base_generation or k not in ("win-rate", "reward", "fluency", "sample KL")]
    text += ["", "Each run's folder holds its adapter (or model), model card (README.md) and diagnostics.json/.png."]
    values, replaced = strict_json_value(comparison.to_dict())
    if replaced:  # a diverged run's NaN: strict JSON has no such token
        values["notes"].append(f"{replaced} non-finite values (NaN or ±Infinity, e.g. a diverged run's) are written "
                               "as null")
    if values["notes"]:
        text += ["", "Notes:", ""] + [f"- {note}" for note in values["notes"]]
    (out_dir / "comparison.md").write_text("\n".join(text) + "\n")
    (out_dir / "comparison.json").write_text(json.dumps(values, indent=2, allow_nan=False))
    if best_effort("the comparison plot", out_dir / "comparison.png",
                   lambda: plot_comparison(comparison, out_dir / "comparison.png")) is not None:
        files["plot"] = "comparison.png"
    return files


def plot_comparison(comparison: Comparison, path: Path) -> Path | None:
    """Four panels, one bar group per run: held-out reward accuracy, the margin's p10–p90 range with its median,
    chosen and rejected log-ratios per token, and KL per token (plus win-rate with a `reward_fn`)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    runs = [r for r in comparison.runs if r.status == "ok"]
    if not runs:
        return None
    names = [r.name for r in runs]
    x = list(range(len(runs)))
    panels = 5 if comparison.base_generation else 4
    fig = Figure(figsize=(3.2 * panels, 3.4))
    axes = fig.subplots(1, panels)
    axes[0].bar(x, [r.held_out["reward_accuracy"] for r in runs], color="tab:blue")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out reward accuracy", fontsize=9)
    for i, r in enumerate(runs):
        lo, mid, hi = r.held_out["margin_quantiles"]
        axes[1].plot([i, i], [lo, hi], color="tab:purple", lw=4, alpha=0.5)
        axes[1].plot(i, mid, "o", color="tab:purple")
    axes[1].axhline(0, color="grey", lw=0.8, ls="--")
    axes[1].set_title("margin p10–p90, median (own scale)", fontsize=9)
    chosen = [r.held_out["chosen_logratio_per_token"] or 0.0 for r in runs]
    rejected = [r.held_out["rejected_logratio_per_token"] or 0.0 for r in runs]
    axes[2].bar([i - 0.2 for i in x], chosen, width=0.4, color="tab:green", label="chosen")
    axes[2].bar([i + 0.2 for i in x], rejected, width=0.4, color="tab:red", label="rejected")
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].legend(fontsize=7)
    axes[2].set_title("log-ratio / token (0: reference-free)", fontsize=9)
    axes[3].bar(x, [r.held_out["kl_per_token"] for r in runs], color="tab:orange")
    axes[3].set_title("KL(π‖π_ref) / token, held-out", fontsize=9)
    if comparison.base_generation:
        axes[4].bar(x, [r.generation.get("win_rate", 0.0) for r in runs], color="tab:cyan")
        axes[4].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[4].set_ylim(0, 1)
        axes[4].set_title("win-rate vs base (reward_fn)", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"trl-dpo-plus compare: {comparison.setup['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
