"""The compact console line and the diagnostics plot: what a person looks at."""

import json

import matplotlib
import pytest

from trl_dpo_plus.console import compact_logs
from trl_dpo_plus.diagnostics.report import write_report

TRAIN_LOG = {"loss": 0.69, "grad_norm": 3.1, "learning_rate": 1e-6, "rewards/chosen": 0.01, "rewards/rejected": 0.0,
             "rewards/accuracies": 0.5, "rewards/margins": 0.01, "logps/chosen": -211.0, "logps/rejected": -189.0,
             "logits/chosen": -5.6, "entropy": 2.0, "num_tokens": 1497.0, "dpo_plus/chosen_len": 60.0,
             "diagnostics/margin/mean": 0.01, "diagnostics/margin/p10": -0.1, "diagnostics/margin/p50": 0.01,
             "diagnostics/margin/p90": 0.1, "diagnostics/length/corr": -0.3, "dpo_plus/chosen_logratio_per_token": -0.01,
             "dpo_plus/rejected_logratio_per_token": -0.02, "diagnostics/flag/likelihood_displacement": 1.0,
             "epoch": 0.01}


def test_compact_line_keeps_the_headline_metrics_and_names_the_flags():
    line = compact_logs(TRAIN_LOG)
    assert list(line) == ["loss", "grad_norm", "learning_rate", "rewards/accuracies", "rewards/margins",
                          "logps/chosen", "logps/rejected", "epoch", "flags"]
    assert line["flags"] == "likelihood_displacement"
    assert compact_logs({"eval_loss": 0.7, "eval_rewards/margins": 0.1, "eval_runtime": 2.0, "eval_entropy": 1.0,
                         "epoch": 1.0}) == {"eval_loss": 0.7, "eval_rewards/margins": 0.1, "eval_runtime": 2.0,
                                            "epoch": 1.0}


def history(steps, eval_steps=()):
    logs = [{**TRAIN_LOG, "loss": 0.7 - 0.01 * s, "step": s} for s in steps]
    logs += [{"eval_loss": 0.68, "eval_rewards/margins": 0.2, "eval_diagnostics/length/corr": -0.2, "step": s}
             for s in eval_steps]
    return logs


def test_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's choice, e.g. a notebook's inline backend
    try:
        report = write_report(history(range(1, 11), eval_steps=(5, 10)), tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert report["plot"] == "diagnostics.png" and (tmp_path / "diagnostics.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert [s for s, _ in saved["eval"]["series"]["loss"]] == [5, 10]  # the eval points the plot draws


@pytest.mark.parametrize("steps", [[1], []])
def test_one_log_still_gives_a_plot_and_none_gives_a_clear_message(tmp_path, steps, caplog):
    caplog.set_level("INFO", logger="trl_dpo_plus")
    report = write_report(history(steps), tmp_path)
    if steps:
        assert report["plot"] == "diagnostics.png"
    else:
        assert report["plot"] is None and "logged no training step" in caplog.text
