"""`trl-dpo-plus train` reads datasets as `datasets` does (Hub snapshots, custom split names, save_to_disk folders,
TRL's `datasets:` mixtures, --streaming, --test_split_size), logs at every step, lets explicit QLoRA flags win over
the preset, and writes a card the Hub accepts."""

import json

import pytest
import yaml
from datasets import DatasetDict
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from trl_dpo_plus.cli import _peft_and_quantization, make_train_parser, main
from conftest import make_pairs

COMMON = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--report_to", "none", "--logging_steps", "1"]


def train(model, out, *args):
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(out), *COMMON, *args]) == 0
    return json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]


@pytest.fixture
def hub_snapshot(tmp_path):
    """A dataset folder as `huggingface-cli download --repo-type dataset` leaves it, UltraFeedback-style splits."""
    root = tmp_path / "ultrafeedback_snapshot"
    (root / "data").mkdir(parents=True)
    make_pairs(12).to_parquet(root / "data" / "train_prefs-00000-of-00001.parquet")
    make_pairs(6, seed=3).to_parquet(root / "data" / "test_prefs-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nlicense: mit\n---\n# pairs\n")
    return root


def test_a_hub_snapshot_with_custom_split_names_trains_and_evaluates(tiny_models, hub_snapshot, tmp_path):
    """--logging_steps 1 arrives as the float 1.0: the diagnostics take it (this crashed before)."""
    out = tmp_path / "out"
    history = train(tiny_models["llama"], out, "--dataset_name", str(hub_snapshot), "--dataset_train_split",
                    "train_prefs", "--dataset_test_split", "test_prefs", "--eval_strategy", "steps", "--eval_steps", "3")
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert any("eval_rewards/accuracies" in h for h in history)
    report = json.loads((out / "diagnostics.json").read_text())
    assert [s for s, _ in report["train"]["series"]["loss"]] == [1, 2, 3]
    card = ModelCard.load(out / "README.md")
    results = card.data.eval_results  # model-index parsed back by huggingface_hub
    assert {r.metric_type for r in results} == {"accuracy", "reward_margin", "loss"}
    assert results[0].dataset_name == "ultrafeedback_snapshot"


def test_save_to_disk_folder_and_test_split_size(tiny_models, tmp_path):
    DatasetDict({"train": make_pairs(16)}).save_to_disk(tmp_path / "saved")
    out = tmp_path / "out"
    history = train(tiny_models["llama"], out, "--dataset_name", str(tmp_path / "saved"), "--test_split_size", "0.25",
                    "--eval_strategy", "steps", "--eval_steps", "3")
    assert any("eval_loss" in h for h in history)


def test_a_yaml_mixture_of_two_datasets(tiny_models, tmp_path):
    make_pairs(8).to_json(tmp_path / "a.jsonl")
    make_pairs(8, seed=9).to_json(tmp_path / "b.jsonl")
    out = tmp_path / "out"
    recipe = {"model_name_or_path": tiny_models["llama"], "output_dir": str(out), "max_steps": 3,
              "per_device_train_batch_size": 2, "report_to": "none", "logging_steps": 1, "test_split_size": 0.25,
              "eval_strategy": "steps", "eval_steps": 3,
              "datasets": [{"path": "json", "data_files": str(tmp_path / "a.jsonl")},
                           {"path": "json", "data_files": str(tmp_path / "b.jsonl"), "columns": ["prompt", "chosen", "rejected"]}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(tmp_path / "recipe.yaml")]) == 0
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets is None  # the builder name "json" is not a Hub dataset
    assert "on `a.jsonl, b.jsonl`" in card.text


def test_streaming_trains_for_max_steps(tiny_models, tmp_path):
    make_pairs(16).to_json(tmp_path / "pairs.jsonl")
    history = train(tiny_models["llama"], tmp_path / "out", "--dataset_name", str(tmp_path / "pairs.jsonl"),
                    "--streaming", "true")
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]


def test_explicit_qlora_flags_override_the_preset():
    parser = make_train_parser()
    argv = ["--qlora", "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "false", "--bnb_4bit_quant_storage",
            "bfloat16", "--lora_r", "4", "--output_dir", "x"]
    _, training_args, model_args, _ = parser.parse_args_and_config(argv)
    peft, bnb = _peft_and_quantization(argv, training_args, model_args)
    assert (bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant, str(bnb.bnb_4bit_quant_storage)) == (
        "fp4", False, "torch.bfloat16")
    assert peft.r == 4 and peft.lora_alpha == 32  # unset flags keep the preset
    argv = ["--qlora", "--output_dir", "x"]
    _, training_args, model_args, _ = parser.parse_args_and_config(argv)
    _, bnb = _peft_and_quantization(argv, training_args, model_args)
    assert (bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == ("nf4", True)  # the preset


@pytest.mark.slow
def test_qlora_cli_card_says_the_flags_that_were_used(tiny_models, tmp_path):
    make_pairs(8).to_json(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    train(tiny_models["llama64"], out, "--dataset_name", str(tmp_path / "pairs.jsonl"), "--qlora",
          "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant", "false", "--base_model", "org/tiny-llama",
          "--license", "apache-2.0")
    data = ModelCard.load(out / "README.md").data
    quantization = data.to_dict()["trl_dpo_plus"]["quantization"]
    assert quantization["bnb_4bit_quant_type"] == "fp4" and quantization["bnb_4bit_use_double_quant"] is False
    assert data.base_model == "org/tiny-llama" and data.license == "apache-2.0"
    validate_repo_id(data.base_model)
