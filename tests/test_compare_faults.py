"""`compare` keeps a finished sweep: a bad scorer is found before training, a later scorer failure or a diverged run
never costs the table, and finished runs can be scored again without training."""

import json
import math

import pytest

from conftest import make_pairs
from trl_dpo_plus import DPOConfig
from trl_dpo_plus.compare import RewardFnError, RunResult, compare
from trl_dpo_plus.compare.report import Comparison, write_comparison
from trl_dpo_plus.trainer import DPOPlusTrainer


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "cmp"), lora=True, max_steps=2, per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                  gradient_checkpointing=False, seed=0, max_length=64, use_cpu=True)
    values.update(overrides)
    return DPOConfig(**values)


def _strict(path):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _count_e(prompts, completions, **kwargs):
    return [float(c.count("e")) for c in completions]


@pytest.mark.parametrize("reward_fn, message", [
    (lambda prompts, completions: 1 / 0, "raised ZeroDivisionError"),
    (lambda prompts, completions: [1.0], "must return one finite number per completion \\(4\\); it returned 1"),
    (lambda prompts, completions: [float("nan")] * len(completions), "one finite number"),
    (lambda texts: [0.0] * len(texts), "raised TypeError"),
])
def test_a_bad_scorer_stops_the_sweep_before_any_run_trains(stories_path, tmp_path, reward_fn, message):
    with pytest.raises(RewardFnError, match=message) as caught:
        compare(stories_path, make_pairs(8), make_pairs(4, seed=1), ["sigmoid", "simpo"], _args(tmp_path),
                reward_fn=reward_fn, progress=False)
    assert "before any run trained" in str(caught.value)
    assert not (tmp_path / "cmp" / "sigmoid").exists()


@pytest.mark.slow
def test_a_scorer_failing_after_training_keeps_the_table_and_rescore_adds_its_columns(stories_path, tmp_path,
                                                                                       monkeypatch):
    calls = []

    def flaky(prompts, completions, **kwargs):  # passes the check before training, fails on the samples
        calls.append(len(completions))
        if len(calls) > 1:
            raise ConnectionError("reward server went away")
        return _count_e(prompts, completions)

    train, held_out = make_pairs(16), make_pairs(8, seed=1)
    result = compare(stories_path, train, held_out, ["sigmoid", "simpo"], _args(tmp_path), reward_fn=flaky,
                     generation_prompts=2, samples_per_prompt=2, max_new_tokens=4, progress=False)
    out = tmp_path / "cmp"
    assert all(r.status == "ok" and r.held_out for r in result.runs)  # the held-out table is kept
    assert not result.base_generation and all(not r.generation for r in result.runs)
    assert "reward server went away" in result.notes[0] and "rescore" in result.notes[0]
    saved = _strict(out / "comparison.json")
    assert saved["notes"] == result.notes and "win-rate" not in (out / "comparison.md").read_text().split("Columns")[0]
    assert "Notes:" in (out / "comparison.md").read_text()

    monkeypatch.setattr(DPOPlusTrainer, "train", lambda *args, **kwargs: pytest.fail("a saved run trained again"))
    again = compare(stories_path, train, held_out, ["sigmoid", "simpo"], _args(tmp_path), reward_fn=_count_e,
                    generation_prompts=2, samples_per_prompt=2, max_new_tokens=4, progress=False, rescore=True)
    assert [r.steps for r in again.runs] == [2, 2] and not again.notes
    assert all(0.0 <= r.generation["win_rate"] <= 1.0 for r in again.runs)
    for before, after in zip(result.runs, again.runs):  # the same adapters scored on the same pairs
        assert after.held_out["reward_accuracy"] == before.held_out["reward_accuracy"]


def test_a_diverged_runs_nan_is_written_as_null_with_a_note(tmp_path):
    run = RunResult(name="sigmoid", loss="sigmoid", hyperparameters={"beta": 0.1}, reference_free=False, steps=2,
                    held_out={"pairs": 4, "reward_accuracy": float("nan"), "margin_quantiles": [math.nan] * 3,
                              "chosen_logratio_per_token": math.inf, "rejected_logratio_per_token": -math.inf,
                              "length_r2": math.nan, "kl_per_token": math.nan})
    setup = {"model": "m", "train_pairs": 8, "held_out_pairs": 4, "adapters": "lora", "learning_rate": 1e-3,
             "epochs": 1.0, "max_steps": 2, "batch_size": 8, "seed": 0, "max_length": 64, "seconds": 1.0}
    reference = {"reference_based_runs": 0}
    write_comparison(Comparison([run], {}, reference, setup, {}), tmp_path)
    saved = _strict(tmp_path / "comparison.json")
    assert saved["runs"][0]["held_out"]["reward_accuracy"] is None
    assert saved["notes"] == ["8 non-finite values (NaN or ±Infinity, e.g. a diverged run's) are written as null"]


def test_the_command_line_reports_a_bad_scorer_in_one_line_without_usage(stories_path, tmp_path, monkeypatch, capsys):
    from trl_dpo_plus.cli import main

    make_pairs(8).to_json(tmp_path / "pairs.jsonl")
    (tmp_path / "scorer.py").write_text("def score(prompts, completions):\n    raise KeyError('model')\n")
    monkeypatch.chdir(tmp_path)
    code = main(["compare", "--model_name_or_path", "trl-dpo-plus:stories260K", "--dataset_name", "pairs.jsonl",
                 "--test_split_size", "0.5", "--loss_type", "sigmoid", "simpo", "--reward_fn", "scorer.py:score",
                 "--max_steps", "1", "--report_to", "none", "--max_length", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "usage:" not in err
    assert "error: reward_fn score raised KeyError" in err and "before any run trained" in err


def test_each_accuracy_carries_its_standard_error():
    from trl_dpo_plus.compare.report import _with_error

    assert _with_error(0.52, 294) == "0.52 ± 0.03" and _with_error(None, 10) == "—"
