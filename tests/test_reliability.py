"""A run that goes wrong says so: non-finite values are flagged at the step they appear, `stop` keeps the weights
finite, and the report is strict JSON."""

import json

import pytest
import torch

from trl_dpo_plus import DPOConfig, DPOTrainer
from conftest import make_pairs


def strict_json(path):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def run(model_path, tokenizer, tmp_path, **config):
    config = {"per_device_train_batch_size": 4, "max_steps": 8, "logging_steps": 4, "report_to": [],
              "save_strategy": "no", "seed": 0, **config}
    trainer = DPOTrainer(model_path, args=DPOConfig(output_dir=str(tmp_path), **config),
                         train_dataset=make_pairs(32), processing_class=tokenizer)
    trainer.train()
    return trainer


def nonfinite_flags(report):
    return [f for f in report["train"]["flags"] if f["flag"] == "nonfinite"]


@pytest.mark.slow
def test_a_diverging_run_is_flagged_where_it_breaks_and_stop_keeps_the_weights_finite(tiny_models, tokenizer, tmp_path):
    warn = run(tiny_models["llama"], tokenizer, tmp_path / "warn", learning_rate=1e3)
    report = strict_json(tmp_path / "warn" / "diagnostics.json")
    flags = nonfinite_flags(report)
    assert len(flags) == 1 and not report["train"]["healthy"]
    first = flags[0]["step"]
    logged = {h["step"]: h for h in warn.state.log_history if "diagnostics/nonfinite/gradients" in h}
    assert first in logged and logged[first]["diagnostics/flag/nonfinite"] == 1.0  # logged at the step it happened
    assert first < 4  # earlier than the next regular log
    assert "written as null" in report["note"]
    assert warn.state.global_step == 8  # warn trains on

    stop = run(tiny_models["llama"], tokenizer, tmp_path / "stop", learning_rate=1e3, diagnostics_action="stop")
    assert stop.state.global_step == first  # stopped at that step ...
    assert all(torch.isfinite(p).all() for p in stop.model.parameters())  # ... before the update reached the weights
    stop.save_model()
    assert "nonfinite" in (tmp_path / "stop" / "README.md").read_text()


def test_a_nan_weight_is_flagged_at_step_one_naming_loss_and_log_probs(tiny_models, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=10,
                     report_to=[], save_strategy="no", loss_type="simpo")
    trainer = DPOTrainer(model, args=args, train_dataset=make_pairs(16), processing_class=tokenizer)
    trainer.train()
    first = next(h for h in trainer.state.log_history if "diagnostics/nonfinite/loss" in h)
    assert first["step"] == 1
    assert first["diagnostics/nonfinite/loss"] == 1.0 and first["diagnostics/nonfinite/policy_logps"] == 1.0
    assert first["diagnostics/nonfinite/reference_logps"] == 0.0  # simpo has no reference
    report = strict_json(tmp_path / "diagnostics.json")
    assert nonfinite_flags(report)[0]["step"] == 1 and not report["train"]["healthy"]


def test_a_healthy_run_raises_no_nonfinite_flag(tiny_models, tokenizer, tmp_path):
    trainer = run(tiny_models["llama"], tokenizer, tmp_path, learning_rate=1e-4, max_steps=4)
    checked = [h for h in trainer.state.log_history if "diagnostics/nonfinite/gradients" in h]
    assert checked and all(h["diagnostics/nonfinite/gradients"] == 0.0 for h in checked)  # checked, and clean
    assert not nonfinite_flags(strict_json(tmp_path / "diagnostics.json"))


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 1.0], [0.0, 0.0]])
def test_loss_weights_must_be_finite_non_negative_and_not_all_zero(weights):
    with pytest.raises(ValueError, match="loss_weights"):
        DPOConfig(output_dir="x", loss_type=["sigmoid", "sft"], loss_weights=weights)


def test_each_loss_in_a_mix_takes_its_own_beta_unless_one_is_set(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="trl_dpo_plus.config"):
        args = DPOConfig(output_dir="x", loss_type=["simpo", "sigmoid"])
    assert args.loss_kwargs_for("simpo")["beta"] == 2.0 and args.loss_kwargs_for("sigmoid")["beta"] == 0.1
    assert "simpo=2.0, sigmoid=0.1" in caplog.text
    args = DPOConfig(output_dir="x", loss_type=["simpo", "sigmoid"], beta=0.3)
    assert args.loss_kwargs_for("simpo")["beta"] == args.loss_kwargs_for("sigmoid")["beta"] == 0.3


def test_a_mix_trains_each_loss_at_its_own_beta(tiny_models, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type=["simpo", "sigmoid"], max_steps=1, report_to=[],
                     per_device_train_batch_size=4, save_strategy="no")
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(8), processing_class=tokenizer)
    assert [kw["beta"] for kw in trainer.loss_kwargs] == [2.0, 0.1]


def test_label_smoothing_for_a_loss_that_ignores_it_warns(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus.config"):
        DPOConfig(output_dir="x", loss_type="sigmoid", label_smoothing=0.1)
    assert "label_smoothing=0.1 has no effect" in caplog.text and "robust" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus.config"):
        DPOConfig(output_dir="x", loss_type=["sigmoid", "robust"], label_smoothing=0.1)
    assert "has no effect" not in caplog.text


@pytest.mark.slow
def test_checkpoint_action_saves_finite_weights_and_stops(tiny_models, tokenizer, tmp_path):
    trainer = run(tiny_models["llama"], tokenizer, tmp_path, learning_rate=1e3, diagnostics_action="checkpoint")
    saved = sorted(tmp_path.glob("last-healthy-checkpoint-step-*"))
    assert trainer.state.global_step < 8 and saved
    from safetensors.torch import load_file

    weights = load_file(str(saved[0] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
