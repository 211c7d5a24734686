"""Real preference data: the Anthropic HH-RLHF harmless subset in ../shared/data (skipped when absent)."""

import json

import pytest

from trl_dpo_plus import DPOConfig, DPOTrainer, default_model_path, load_preference_dataset


@pytest.mark.slow
def test_hh_rlhf_trains_and_reports(hh_rlhf_dir, tmp_path):
    data = load_preference_dataset(str(hh_rlhf_dir))
    assert len(data["train"]) == 1803 and len(data["test"]) == 500
    train = data["train"].select(range(64))
    args = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid"], max_length=256, per_device_train_batch_size=8,
                     num_train_epochs=2, learning_rate=5e-4, logging_steps=2, eval_strategy="steps", eval_steps=8,
                     per_device_eval_batch_size=8, report_to=[], save_strategy="no", seed=0)
    trainer = DPOTrainer(default_model_path(), args=args, train_dataset=train,
                         eval_dataset=data["test"].select(range(32)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    evals = [h for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    assert evals and "eval_diagnostics/margin/p50" in evals[-1]
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert "train" in report and "eval" in report
    assert report["train"]["summary"]["chosen_logratio"]["steps"][1] == trainer.state.global_step
