"""The per-round report: `iterate.md` (the table), `iterate.json` (everything, held-out samples and scores included,
which `resume` reads back) and `iterate.png` (held-out reward and sample KL per round), rewritten after every round."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..saving import best_effort, strict_json_value

REPORT_JSON = "iterate.json"
COLUMNS = {
    "round": "0 is the base model; round r trains on samples of round r − 1's policy, from its weights",
    "rows": "training rows built from the round's samples (pairs, or labelled completions for unpaired losses)",
    "ties": "pairs (or samples) dropped because their scores tied",
    "train acc": "reward accuracy of the round's last training log",
    "reward": "mean score of the held-out samples",
    "win vs base": "share of held-out sample slots scoring above the base's (same prompt and slot; ties ½)",
    "win vs prev": "the same against the previous round's samples",
    "sample KL": "mean over held-out samples of log π(y|x) − log π_base(y|x), nats per sequence (≥ 0 in "
                 "expectation)",
    "fluency": "the base's log-likelihood of the held-out samples, nats per token (the base's own samples: round 0)",
    "flags": "diagnostics flags of the round's training (flag@step)",
}


@dataclasses.dataclass
class IterateReport:
    setup: dict[str, Any]
    rounds: list[dict[str, Any]]  # round 0 (the base) first
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def finished_rounds(self) -> int:
        """The last round that finished (0: only the base was sampled)."""
        return max((row["round"] for row in self.rounds if row["status"] == "ok"), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"setup": self.setup, "rounds": self.rounds, "files": self.files}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IterateReport:
        return cls(setup=values["setup"], rounds=values["rounds"], files=values.get("files", {}))


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown_table(report: IterateReport) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report.rounds:
        if row["status"] != "ok":
            lines.append(f"| {row['round']} | failed: {row.get('error', '')[:120]} |" + " |" * (len(COLUMNS) - 2))
            continue
        lines.append("| " + " | ".join([
            str(row["round"]), str(row.get("pairs", "—")), str(row.get("ties", "—")),
            _number(row.get("train_reward_accuracy"), ".2f"), _number(row.get("mean_reward"), ".2f"),
            _number(row.get("win_rate_vs_base"), ".2f"), _number(row.get("win_rate_vs_previous"), ".2f"),
            _number(row.get("sample_kl"), ".1f"), _number(row.get("fluency"), ".2f"),
            ", ".join(row.get("flags", [])) or ("—" if row["round"] == 0 else "none"),
        ]) + " |")
    return "\n".join(lines)


def write_report(report: IterateReport, out_dir: Path) -> dict[str, str]:
    setup = report.setup
    files = {"json": REPORT_JSON, "markdown": "iterate.md"}
    text = [
        "# On-policy rounds", "",
        f"{setup['model']}, {setup['adapters']}, loss {', '.join(setup['loss_type'])}; "
        f"reference: {setup['reference']}. "
        f"{setup['train_prompts']} training prompts × {setup['samples_per_prompt']} samples per round (temperature "
        f"{setup['temperature']:g}, top-p {setup['top_p']:g}, ≤ {setup['max_new_tokens']} new tokens, seed "
        f"{setup['seed']} + round), scored by {setup['scorer']}; lr {setup['learning_rate']:g}, "
        + (f"{setup['max_steps']} steps" if setup["max_steps"] and setup["max_steps"] > 0
           else f"{setup['epochs_per_round']:g} epochs") + " per round.", "",
        f"Held-out: {setup['eval_prompts']} prompts × {setup['samples_per_prompt']} samples, temperature 1, top-p 1, "
        "the same seed every round.", "",
        markdown_table(report), "",
        "Columns:", "", *[f"- **{k}**: {v}" for k, v in COLUMNS.items()], "",
        "Each round's folder (`round-<r>/`) holds its adapter (or model), model card (README.md), diagnostics and "
        "`samples.jsonl` (the previous policy's samples of the training prompts, scored) and `rows.jsonl` (the "
        "training rows built from them, with their scores and reference log-probs).",
    ]
    examples = [row for row in report.rounds if row["status"] == "ok" and row.get("example")]
    if examples:
        text += ["", "First held-out prompt, a sample per round (the base's first, a round's best):", ""]
        text += [f"- round {row['round']}: {row['example'].strip()[:200]!r}" for row in examples]
    values, _ = strict_json_value(report.to_dict())
    (out_dir / "iterate.md").write_text("\n".join(text) + "\n")
    if best_effort("the iterate plot", out_dir / "iterate.png", lambda: plot_rounds(report, out_dir / "iterate.png")):
        files["plot"] = "iterate.png"
    report.files = files
    values["files"] = files
    (out_dir / REPORT_JSON).write_text(json.dumps(values, indent=1, allow_nan=False))
    return files


def plot_rounds(report: IterateReport, path: Path) -> Path | None:
    """Held-out mean reward and win-rate vs the base, and sample KL to the base, per round."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [row for row in report.rounds if row["status"] == "ok"]
    x = [row["round"] for row in rows]
    fig = Figure(figsize=(9.6, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].plot(x, [row["mean_reward"] for row in rows], "o-", color="tab:green")
    axes[0].set_title("held-out mean reward", fontsize=9)
    axes[1].plot(x, [row.get("win_rate_vs_base", 0.5) for row in rows], "o-", color="tab:cyan")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("win-rate vs base (ties ½)", fontsize=9)
    axes[2].plot(x, [row.get("sample_kl", 0.0) for row in rows], "o-", color="tab:orange")
    axes[2].set_title("sample KL to the base, nats/sequence", fontsize=9)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xlabel("round", fontsize=8)
    fig.suptitle(f"trl-dpo-plus iterate: {report.setup['model']}, {', '.join(report.setup['loss_type'])}, "
                 f"reference {report.setup['reference']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
