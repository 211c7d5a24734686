"""Diagnostics: each detector on synthetic statistics (fires when it should, silent when it should not), the actions,
the report, and on the real stories260K model an over-driven run that must flag and a sensible one that must not."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState

from trl_dpo_plus import DPOConfig, DPOTrainer, default_model_path
from trl_dpo_plus.diagnostics import (
    LengthBiasCallback,
    LikelihoodDisplacementCallback,
    RewardMarginCallback,
    rebuild_report,
)
from conftest import make_pairs


def stats(chosen_lr, rejected_lr, margin, n=8, chosen_len=10.0, rejected_len=10.0):
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return {
        "margin": full(margin), "chosen_logratio_per_token": full(chosen_lr), "rejected_logratio_per_token": full(rejected_lr),
        "chosen_len": full(chosen_len), "rejected_len": full(rejected_len),
    }


def feed(callback, rows):
    flags = []
    for step, row in enumerate(rows, 1):
        metrics = callback.observe(step, row, is_main=True)
        flags.append(sorted(k.rsplit("/", 1)[1] for k in metrics if "/flag/" in k))
    return flags


def test_displacement_both_falling_and_rejected_driven():
    cb = LikelihoodDisplacementCallback(window=4)
    # chosen falls below the reference, rejected falls 5× faster, margin grows: textbook likelihood displacement
    rows = [stats(-0.05 * t, -0.25 * t, 0.2 * t) for t in range(1, 8)]
    flags = feed(cb, rows)
    assert flags[:3] == [[], [], []]  # the window is not full yet
    assert "both_falling" in flags[3] and "rejected_driven" in flags[3]
    assert "rejected_collapse" in flags[-1] and "rejected_collapse" not in flags[-2]  # −1.75 < −1.5 only at t = 7


def test_displacement_silent_on_a_healthy_trajectory():
    cb = LikelihoodDisplacementCallback(window=4)
    rows = [stats(0.02 * t, -0.03 * t, 0.05 * t) for t in range(1, 20)]  # chosen up, rejected down, similar pace
    assert all(f == [] for f in feed(cb, rows))


def test_rejected_collapse_threshold_and_episode_warns_once(caplog):
    cb = LikelihoodDisplacementCallback(window=2, rejected_collapse=1.0)
    rows = [stats(0.0, -0.5, 1), stats(0.0, -1.2, 1), stats(0.0, -1.3, 1), stats(0.0, -0.2, 1), stats(0.0, -1.4, 1)]
    state, control = TrainerState(), TrainerControl()
    args = SimpleNamespace(output_dir="/tmp")
    with caplog.at_level(logging.WARNING):
        for step, row in enumerate(rows, 1):
            cb.observe(step, row, is_main=True)
            cb.on_log(args, state, control)
    warnings = [r for r in caplog.records if "rejected_collapse" in r.getMessage()]
    assert len(warnings) == 2  # episode 1 (steps 2–3), episode 2 (step 5)
    assert "Remedies: lower the learning rate" in warnings[0].getMessage()
    assert not control.should_training_stop  # action="warn" never stops


def test_stop_action_stops_training():
    cb = LikelihoodDisplacementCallback(window=2, action="stop")
    control = TrainerControl()
    cb.observe(1, stats(0.0, -3.0, 1), is_main=True)
    cb.on_log(SimpleNamespace(output_dir="/tmp"), TrainerState(), control)
    assert control.should_training_stop


def test_reward_margin_quantiles_and_trend():
    cb = RewardMarginCallback(window=3)
    for step, shift in enumerate([0.0, 1.0, 2.0], 1):
        m = cb.observe(step, {"margin": torch.arange(-4.0, 6.0) + shift}, is_main=True)
    assert m["diagnostics/margin/mean"] == pytest.approx(2.5)
    assert m["diagnostics/margin/p50"] == pytest.approx(2.5)
    assert m["diagnostics/margin/p10"] == pytest.approx(-1.1)
    assert m["diagnostics/margin/accuracy"] == pytest.approx(0.7)
    assert m["diagnostics/margin/trend"] == pytest.approx(1.0)


def test_length_bias_flags_margin_explained_by_length():
    g = torch.Generator().manual_seed(0)
    gap = torch.randint(-20, 20, (64,), generator=g).float()
    cb = LengthBiasCallback(window=2, max_r2=0.5, min_pairs=32)
    row = {"margin": 0.1 * gap + 0.05 * torch.randn(64, generator=g), "chosen_len": 30 + gap, "rejected_len": torch.full((64,), 30.0)}
    m = cb.observe(1, row, is_main=True)
    assert m["diagnostics/length/r2"] > 0.9 and "diagnostics/flag/length_exploitation" in m
    noise = {"margin": torch.randn(64, generator=g), "chosen_len": 30 + gap, "rejected_len": torch.full((64,), 30.0)}
    assert "diagnostics/flag/length_exploitation" not in LengthBiasCallback().observe(1, noise, is_main=True)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: LikelihoodDisplacementCallback(rejected_collapse=-1.0), "rejected_collapse must be a finite positive"),
        (lambda: LikelihoodDisplacementCallback(rejected_ratio=0), "rejected_ratio must be a finite positive"),
        (lambda: LikelihoodDisplacementCallback(window=1), "window must be an integer ≥ 2"),
        (lambda: RewardMarginCallback(action="explode"), r"unknown action 'explode'; choose one of \('warn', 'stop', 'checkpoint'\)"),
        (lambda: LengthBiasCallback(max_r2=1.5), r"max_r2 must lie in \(0, 1\)"),
    ],
)
def test_bad_thresholds_fail_at_construction(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_window_longer_than_the_run_is_an_error(tiny_models, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), max_steps=4, logging_steps=1, report_to=[], per_device_train_batch_size=2)
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(8), processing_class=tokenizer,
                         callbacks=[LikelihoodDisplacementCallback(window=10)])
    with pytest.raises(ValueError, match="window=10 logging steps is longer than the run, which logs 4 times"):
        trainer.train()


def test_reference_free_switches_the_displacement_detector_off(tiny_models, tokenizer, tmp_path, caplog):
    args = DPOConfig(output_dir=str(tmp_path), loss_type="simpo", max_steps=3, logging_steps=1, report_to=[],
                     per_device_train_batch_size=4)
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(12), processing_class=tokenizer)
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        trainer.train()
    notices = [r for r in caplog.records if "LikelihoodDisplacementCallback switched off" in r.getMessage()]
    assert [r.levelname for r in notices] == ["INFO"]  # expected for a reference-free loss: a notice, not a warning
    log = trainer.state.log_history[0]
    assert "diagnostics/margin/p50" in log and "diagnostics/length/r2" in log  # the others keep working
    assert not any(k.startswith("diagnostics/displacement") for k in log)


def train_stories(tmp_path, *, lr, beta, epochs, action="warn", pairs=16):
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(default_model_path())
    args = DPOConfig(output_dir=str(tmp_path), learning_rate=lr, beta=beta, num_train_epochs=epochs, seed=0,
                     per_device_train_batch_size=8, logging_steps=2, report_to=[], save_strategy="no",
                     lr_scheduler_type="constant", gradient_checkpointing=False, diagnostics_action=action)
    trainer = DPOTrainer(default_model_path(), args=args, train_dataset=make_pairs(pairs, seed=3), processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_overdriven_run_on_stories260k_flags_displacement(tmp_path):
    """High learning rate, small β, many epochs on 16 pairs: the rejected side collapses (measured: −6.9 nats/token
    by step 4, rejected-driven from step 10, the rejected side moving 11.4× as much as the chosen by the end)."""
    trainer = train_stories(tmp_path, lr=3e-3, beta=0.05, epochs=12)
    report = json.loads((tmp_path / "diagnostics.json").read_text())["train"]
    raised = {f["flag"]: f for f in report["flags"]}
    assert {"rejected_collapse", "rejected_driven"} <= raised.keys()
    assert raised["rejected_collapse"]["step"] <= 6
    assert raised["rejected_collapse"]["numbers"]["displacement/rejected_logratio"] < -1.5
    assert report["summary"]["rejected_logratio"]["last"] < -5.0
    assert (tmp_path / "diagnostics.png").stat().st_size > 10_000
    # the report rebuilds from the log history alone
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trainer_state.json").write_text(json.dumps({"log_history": trainer.state.log_history}))
    assert rebuild_report(tmp_path / "state" / "trainer_state.json")["train"]["flags"] == report["flags"]


@pytest.mark.slow
def test_sensible_run_on_stories260k_raises_no_flag(tmp_path):
    trainer = train_stories(tmp_path, lr=5e-5, beta=0.1, epochs=3)
    report = json.loads((tmp_path / "diagnostics.json").read_text())["train"]
    assert report["flags"] == [] and report["healthy"]
    summary = report["summary"]
    assert summary["margin_mean"]["last"] > summary["margin_mean"]["first"] + 0.5  # it did learn
    assert summary["chosen_logratio"]["last"] > 0  # chosen went up, not down


@pytest.mark.slow
def test_checkpoint_action_saves_the_last_healthy_model_and_stops(tmp_path):
    trainer = train_stories(tmp_path, lr=3e-3, beta=0.05, epochs=12, action="checkpoint")
    saved = sorted(tmp_path.glob("last-healthy-checkpoint-step-*"))
    assert len(saved) == 1 and (saved[0] / "model.safetensors").exists()
    assert trainer.state.global_step < 24  # stopped early
    healthy_step = int(saved[0].name.rsplit("-", 1)[1])
    assert healthy_step < trainer.state.global_step


def test_a_lora_run_at_trls_full_finetuning_rate_is_flagged_as_not_learning(tmp_path, caplog):
    """TRL's default learning rate (1e-6) with an adapter: margins stay within noise, and the detector says so."""
    import logging

    from trl_dpo_plus import DPOConfig, DPOTrainer, default_model_path

    args = DPOConfig(output_dir=str(tmp_path), learning_rate=1e-7, lora=True, max_steps=6, logging_steps=1,
                     per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True,
                     gradient_checkpointing=False, max_length=64)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        DPOTrainer(default_model_path(), args=args, train_dataset=make_pairs(24)).train()
    assert "not_learning" in caplog.text and "learning_rate=1e-07" in caplog.text and "1e-5 to 1e-4" in caplog.text
    flags = json.loads((tmp_path / "diagnostics.json").read_text())["train"]["flags"]
    assert [f["flag"] for f in flags if f["flag"] == "not_learning"] == ["not_learning"]


def test_the_adapter_presets_train_at_an_adapter_rate_unless_one_is_set(caplog):
    import logging

    from trl_dpo_plus import DPOConfig

    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        preset = DPOConfig(output_dir="x", lora=True, report_to=[])
    assert preset.learning_rate == 5e-5 and "learning_rate=5e-05" in caplog.text
    assert DPOConfig(output_dir="x", lora=True, learning_rate=2e-4, report_to=[]).learning_rate == 2e-4
    assert DPOConfig(output_dir="x", report_to=[]).learning_rate == 1e-6  # full fine-tuning: TRL's own default


def test_the_report_series_do_not_repeat_the_last_step(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), max_steps=3, logging_steps=1, per_device_train_batch_size=4,
                     report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=False, max_length=64)
    DPOTrainer(default_model_path(), args=args, train_dataset=make_pairs(12)).train()
    series = json.loads((tmp_path / "diagnostics.json").read_text())["train"]["series"]
    assert [step for step, _ in series["margin_mean"]] == [1, 2, 3]
