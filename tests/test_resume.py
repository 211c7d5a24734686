"""Diagnostics survive resume and crashes: a resumed run raises the same flags at the same steps as an uninterrupted
one, and a run that raises still writes its report, marked interrupted."""

import json

import pytest
from transformers import AutoTokenizer, TrainerCallback

from trl_dpo_plus import DPOConfig, DPOTrainer, default_model_path
from conftest import make_pairs


def overdriven(tmp_path, **config):
    """The issue's over-driven run on the real stories260K model: lr 5e-3, β 0.01, 12 steps."""
    config = {"learning_rate": 5e-3, "beta": 0.01, "max_steps": 12, "per_device_train_batch_size": 8, "seed": 0,
              "logging_steps": 1, "report_to": [], "save_strategy": "steps", "save_steps": 6,
              "lr_scheduler_type": "constant", "gradient_checkpointing": False, **config}
    args = DPOConfig(output_dir=str(tmp_path), **config)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    return DPOTrainer(default_model_path(), args=args, train_dataset=make_pairs(32, seed=3), processing_class=tokenizer)


def flags(path):
    return [(f["flag"], f["step"]) for f in json.loads((path / "diagnostics.json").read_text())["train"]["flags"]]


def resume(path, **config):
    trainer = overdriven(path, **config)
    trainer.train(resume_from_checkpoint=str(path / "checkpoint-6"))
    assert trainer.state.global_step == 12
    return flags(path)


@pytest.mark.slow
def test_resumed_run_raises_the_same_flags_at_the_same_steps(tmp_path, monkeypatch):
    overdriven(tmp_path).train()  # uninterrupted; also writes checkpoint-6
    uninterrupted = flags(tmp_path)
    assert ("rejected_driven", 5) in uninterrupted  # an episode open across the resume point
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert "LikelihoodDisplacementCallback" in state["stateful_callbacks"]

    assert resume(tmp_path) == uninterrupted
    assert resume(tmp_path, restore_callback_states_from_checkpoint=True) == uninterrupted  # Transformers' own path
    # Without the restore the detectors start from an empty window, and the flags differ: the test can tell
    monkeypatch.setattr(DPOTrainer, "_load_callback_state", lambda self: None)
    assert resume(tmp_path) != uninterrupted


def test_a_run_that_raises_still_writes_its_report_marked_interrupted(tiny_models, tokenizer, tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("disk full")

    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                     report_to=[], save_strategy="no")
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(24), processing_class=tokenizer,
                         callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.train()
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert report["interrupted"] == "RuntimeError: disk full"
    assert report["train"]["healthy"] is False
    assert [step for step, _ in report["train"]["series"]["loss"]] == [1, 2]  # what was logged before the error
    assert (tmp_path / "diagnostics.png").exists()
