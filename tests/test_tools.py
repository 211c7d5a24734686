"""After training: `report`, `sample` and `merge` on a run of the embedded model."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_pairs
from trl_dpo_plus import DPOConfig, DPOTrainer, default_model_path
from trl_dpo_plus.cli import main


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = DPOConfig(output_dir=str(out), lora=True, max_steps=2, logging_steps=1, per_device_train_batch_size=4,
                     report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=False, max_length=64,
                     learning_rate=1e-2)
    trainer = DPOTrainer(default_model_path(), args=args, train_dataset=make_pairs(8))
    trainer.train()
    trainer.save_model()
    return out


def test_report_prints_the_health_flags_and_first_to_last_numbers(lora_run, capsys):
    assert main(["report", str(lora_run)]) == 0
    out = capsys.readouterr().out
    assert str(lora_run) in out.splitlines()[0] and ("healthy" in out.splitlines()[0])
    assert "reward margin (mean):" in out and "→" in out and "chosen log-ratio per token" in out


def test_sample_shows_the_adapter_beside_the_base(lora_run, capsys):
    assert main(["sample", str(lora_run), "--prompt", "Once upon a time, Lily", "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt:") == 1 and "adapter:" in out and "base:" in out


def test_merge_keeps_the_bases_dtype_and_writes_tokenizer_and_card(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["merge", str(lora_run), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base_dtype = json.loads((Path(default_model_path()) / "config.json").read_text()).get("dtype", "float32")
    assert str(merged.dtype).removeprefix("torch.") == base_dtype
    AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert "Merged: the LoRA adapter of this run merged into its base" in (tmp_path / "merged" / "README.md").read_text()
    from trl_dpo_plus.tools import load_adapter_run

    adapter, _ = load_adapter_run(lora_run)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)


def test_a_folder_that_is_no_run_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "has no diagnostics.json or trainer_state.json" in err and "Traceback" not in err
