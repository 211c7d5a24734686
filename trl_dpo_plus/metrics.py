"""Every metric name the package logs, and the metrics shared by both data kinds.

TRL's own names (`rewards/margins`, `logps/rejected`, `entropy`, ...) are kept so that dashboards keep working; ours go
under `dpo_plus/` (per-pair statistics, per-loss values, truncation counts) and `diagnostics/` (the detectors' metrics
and flags). The diagnostics report and the compact console read the names from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

METRIC_PREFIX = "dpo_plus"
DIAGNOSTICS_PREFIX = "diagnostics"
FLAG_PREFIX = f"{DIAGNOSTICS_PREFIX}/flag/"

# The report's series and where each is logged: for unpaired (KTO) runs, the "chosen"/"rejected" statistics are the
# desirable/undesirable completions'; the first name that a run logged is used.
REPORT_SERIES = {
    "chosen_logratio": (f"{METRIC_PREFIX}/chosen_logratio_per_token", f"{METRIC_PREFIX}/desirable_logratio_per_token"),
    "rejected_logratio": (f"{METRIC_PREFIX}/rejected_logratio_per_token",
                          f"{METRIC_PREFIX}/undesirable_logratio_per_token"),
    "margin_mean": (f"{DIAGNOSTICS_PREFIX}/margin/mean", "rewards/margins"),
    "margin_p10": (f"{DIAGNOSTICS_PREFIX}/margin/p10",),
    "margin_p50": (f"{DIAGNOSTICS_PREFIX}/margin/p50",),
    "margin_p90": (f"{DIAGNOSTICS_PREFIX}/margin/p90",),
    "accuracy": (f"{DIAGNOSTICS_PREFIX}/margin/accuracy", "rewards/accuracies"),
    "length_r2": (f"{DIAGNOSTICS_PREFIX}/length/r2",),
    "length_corr": (f"{DIAGNOSTICS_PREFIX}/length/corr",),
    "loss": ("loss",),
}
UNPAIRED_MARKERS = (f"{METRIC_PREFIX}/desirable_", f"{METRIC_PREFIX}/undesirable_")
# What the compact console line shows of a log (also as eval_/train_ metrics), besides the raised flags
CONSOLE_KEYS = ("loss", "grad_norm", "learning_rate", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "runtime", "samples_per_second", "steps_per_second", "epoch")

Gather = Callable[[torch.Tensor], torch.Tensor]


def global_mean(values: torch.Tensor, mask: torch.Tensor, gather: Gather) -> float | None:
    """Mean of `values` where `mask` is set, over every process; `None` where nothing is set."""
    total = gather(values[mask].float().sum()).sum().item()
    count = gather(mask.sum()).sum().item()
    return total / count if count > 0 else None


def token_metrics(forward, first: torch.Tensor, second: torch.Tensor, num_tokens: int, gather: Gather,
                  always_logits: bool = True) -> dict[str, float]:
    """TRL's token-level metrics of a `PolicyForward`: `entropy` over the rows in `first` and `second` (`(2B,)`
    masks), `num_tokens` (this batch's, over every process), `logits/chosen|rejected` over each (0.0 for a side with
    no rows, or left out when `always_logits` is False), and `mean_token_accuracy` over the `first` rows."""
    mask = forward.mask.bool()
    rows = (first | second).unsqueeze(1)
    metrics = {"entropy": global_mean(forward.entropy.detach(), mask & rows, gather) or 0.0, "num_tokens": num_tokens}
    for side, side_rows in (("chosen", first), ("rejected", second)):
        mean = global_mean(forward.mean_logits, mask & side_rows.unsqueeze(1), gather)
        if mean is not None or always_logits:
            metrics[f"logits/{side}"] = mean or 0.0
    metrics["mean_token_accuracy"] = global_mean(forward.is_top1, mask & first.unsqueeze(1), gather) or 0.0
    return metrics


def loss_metrics(specs: list, outputs: list, gather: Gather) -> dict[str, float]:
    """Each loss's own value (when several are mixed) and its extra metrics, under `dpo_plus/<loss>/`."""
    metrics = {}
    for spec, out in zip(specs, outputs):
        if len(outputs) > 1:
            metrics[f"{METRIC_PREFIX}/loss/{spec.name}"] = gather(out.losses.detach().mean()).mean().item()
        for key, value in out.metrics.items():
            metrics[f"{METRIC_PREFIX}/{spec.name}/{key}"] = gather(value.detach().float().mean()).mean().item()
    return metrics


def truncation_logs(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """The prepared splits' dropped and truncated rows, logged once so that trackers get the data's losses too."""
    logs = {}
    for split, split_counts in counts.items():
        logs[f"{METRIC_PREFIX}/{split}_pairs_dropped"] = float(split_counts["dropped"])
        logs[f"{METRIC_PREFIX}/{split}_pairs_truncated"] = float(split_counts["truncated"])
    return logs


def last_train_log(log_history: list[dict]) -> dict:
    """The last training log that carries reward metrics (not an evaluation's), or `{}`."""
    logs = [h for h in log_history if "rewards/accuracies" in h and "eval_loss" not in h]
    return logs[-1] if logs else {}
