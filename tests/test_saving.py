"""Nothing finished is lost: reports and cards are best-effort after the weights, a full disk is named, a failed resume
keeps the finished report, and a diverged run never exits 0."""

import errno
import json
import logging
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard

from conftest import make_pairs
from trl_dpo_plus import DPOConfig, DPOTrainer
from trl_dpo_plus.cli import main
from trl_dpo_plus.saving import best_effort, disk_full_named, is_no_space

FULL = OSError(errno.ENOSPC, "No space left on device")


def _trainer(model_path, tokenizer, tmp_path, **config):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                  report_to=[], save_strategy="no", seed=0, use_cpu=True, gradient_checkpointing=False)
    values.update(config)
    return DPOTrainer(model_path, args=DPOConfig(**values), train_dataset=make_pairs(8), processing_class=tokenizer)


def _refuse(names):
    """`Path.write_text` / `write_bytes` raising a full disk for the files named."""
    write_text, write_bytes = Path.write_text, Path.write_bytes

    def text(self, *args, **kwargs):
        if self.name in names:
            raise FULL
        return write_text(self, *args, **kwargs)

    def raw(self, *args, **kwargs):
        if self.name in names:
            raise FULL
        return write_bytes(self, *args, **kwargs)

    return mock.patch.multiple(Path, write_text=text, write_bytes=raw)


def test_a_report_or_card_that_cannot_be_written_never_costs_the_weights(tiny_models, tokenizer, tmp_path, caplog):
    trainer = _trainer(tiny_models["llama"], tokenizer, tmp_path)
    with (
        _refuse({"diagnostics.json"}),
        mock.patch("matplotlib.figure.Figure.savefig", side_effect=FULL),
        mock.patch("huggingface_hub.ModelCard.save", side_effect=FULL),
        caplog.at_level(logging.WARNING, logger="trl_dpo_plus"),
    ):
        trainer.train()  # raised before save_model, with save_strategy="no": the weights were gone
        trainer.save_model()
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists()
    for what, name in (("the diagnostics report", "diagnostics.json"), ("the diagnostics plot", "diagnostics.png"),
                       ("the model card", "README.md")):
        line = next(r.message for r in caplog.records if r.message.startswith(f"Could not write {what} "))
        assert name in line and "no space left on the device" in line and "weights are not affected" in line
    assert not (out / "diagnostics.json").exists() and not (out / "README.md").exists()


def test_a_failed_resume_keeps_the_finished_runs_report(tiny_models, tokenizer, tmp_path):
    _trainer(tiny_models["llama"], tokenizer, tmp_path).train()
    report = tmp_path / "out" / "diagnostics.json"
    finished = report.read_text()
    with pytest.raises(ValueError, match="checkpoint"):
        _trainer(tiny_models["llama"], tokenizer, tmp_path).train(resume_from_checkpoint=str(tmp_path / "typo"))
    assert report.read_text() == finished and "interrupted" not in json.loads(finished)


def test_a_run_that_fails_at_its_first_step_still_reports_interrupted(tiny_models, tokenizer, tmp_path):
    trainer = _trainer(tiny_models["llama"], tokenizer, tmp_path)
    with mock.patch.object(type(trainer), "_compute_loss", side_effect=RuntimeError("boom")), pytest.raises(RuntimeError):
        trainer.train()
    assert json.loads((tmp_path / "out" / "diagnostics.json").read_text())["interrupted"] == "RuntimeError: boom"


def test_a_full_disk_during_a_checkpoint_says_no_space_left(tiny_models, tokenizer, tmp_path):
    trainer = _trainer(tiny_models["llama"], tokenizer, tmp_path, save_strategy="steps", save_steps=1)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1366")
    with mock.patch("torch.save", side_effect=torch_error), pytest.raises(OSError) as caught:
        trainer.train()
    assert caught.value.errno == errno.ENOSPC and is_no_space(caught.value.__cause__)
    assert "No space left on the device while writing" in str(caught.value) and "checkpoint-1" in str(caught.value)
    assert "--resume_from_checkpoint true" in str(caught.value)


def test_no_space_is_recognised_from_each_writer_and_nothing_else_is():
    assert is_no_space(FULL) and is_no_space(RuntimeError("PytorchStreamWriter failed writing file data/0: file write "
                                                          "failed"))
    assert is_no_space(Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    assert not is_no_space(PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(PermissionError), disk_full_named("x"):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert best_effort("x", "p", lambda: 1 / 0) is None and best_effort("x", "p", lambda: 3) == 3


def test_unwritable_output_folder_for_the_report_warns_and_trains(tiny_models, tokenizer, tmp_path, caplog):
    trainer = _trainer(tiny_models["llama"], tokenizer, tmp_path)
    with _refuse({"diagnostics.json"}), caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        trainer.train()
    assert trainer.state.global_step == 2 and "Could not write the diagnostics report" in caplog.text


@pytest.fixture
def pairs_dir(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    make_pairs(16).to_json(folder / "train.jsonl")
    return folder


def _cli(model, pairs_dir, out, *extra):
    return main(["train", "--model_name_or_path", model, "--dataset_name", str(pairs_dir), "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--output_dir", str(out), "--report_to", "none",
                 "--logging_steps", "1", "--save_steps", "1", "--gradient_checkpointing", "false", *extra])


@pytest.mark.slow
def test_a_diverged_run_exits_non_zero_with_a_card_that_says_so(tiny_models, pairs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(tiny_models["llama"], pairs_dir, out, "--learning_rate", "1e30") == 1
    assert "error: the final weights hold NaN or infinity" in capsys.readouterr().out
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["trl_dpo_plus"]["weights_finite"] is False
    assert "the saved weights are not usable" in card.text


@pytest.mark.slow
def test_resume_from_checkpoint_true_means_the_last_checkpoint(tiny_models, pairs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(tiny_models["llama"], pairs_dir, out) == 0
    with mock.patch("trl_dpo_plus.trainer.DPOPlusTrainer.train", autospec=True) as train:
        assert _cli(tiny_models["llama"], pairs_dir, out, "--max_steps", "3", "--resume_from_checkpoint", "true") == 0
    assert train.call_args.kwargs["resume_from_checkpoint"] == str(out / "checkpoint-2")


@pytest.mark.parametrize("value, message", [
    ("true", "there is no checkpoint-N folder in --output_dir"),
    ("typo/checkpoint-9", "not a checkpoint folder"),
])
def test_a_resume_target_that_does_not_exist_fails_before_loading(pairs_dir, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as exit_:
        _cli("trl-dpo-plus:stories260K", pairs_dir, tmp_path / "new", "--resume_from_checkpoint", value)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
