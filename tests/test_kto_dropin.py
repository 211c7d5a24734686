"""Drop-in for `trl.KTOTrainer`: TRL's own KTO tests' behaviours, on this project's stand-in data and tiny models.

Each test mirrors what huggingface/trl's `tests/test_kto_trainer.py` checks (trained weights change, paired data is
unpaired, no-config defaults, evaluation, PEFT, the model tag), written here for `trl_dpo_plus.KTOTrainer`.
"""

import logging

import pytest
import torch
import trl
from datasets import IterableDataset
from huggingface_hub import ModelCard
from peft import LoraConfig

from conftest import make_pairs, make_unpaired
from trl_dpo_plus import KTOConfig, KTOTrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=9e-1,
                  logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, gradient_checkpointing=False,
                  max_length=64)
    values.update(overrides)
    return KTOConfig(**values)


def _changed(before, model):
    return [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p.detach())]


@pytest.mark.parametrize("data", ["unpaired", "paired"])
def test_train_changes_the_weights_and_unpairs_paired_rows_as_trl_does(tiny_models, tokenizer, tmp_path, caplog, data):
    dataset = make_unpaired(16) if data == "unpaired" else make_pairs(8)
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        trainer = KTOTrainer(tiny_models["llama"], args=_config(tmp_path), train_dataset=dataset,
                             processing_class=tokenizer)
    assert trainer.loss_specs[0].name == "kto" and trainer.data_kind == "unpaired"
    if data == "paired":  # TRL's order: within the block, the chosen rows first, then the rejected
        assert trainer.label_counts == {"desirable": 8, "undesirable": 8}
        assert caplog.text.count("each pair turned into a desirable (chosen) and an undesirable (rejected) row") == 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert _changed(before, trainer.model)


def test_a_trl_kto_config_and_no_config_both_give_kto(tiny_models, tokenizer, tmp_path, monkeypatch):
    trl_args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), desirable_weight=2.0, beta=0.3, use_cpu=True,
                             report_to=[])
    trainer = KTOTrainer(tiny_models["llama"], args=trl_args, train_dataset=make_unpaired(8),
                         processing_class=tokenizer)
    assert isinstance(trainer.args, KTOConfig) and trainer.loss_kwargs[0]["desirable_weight"] == 2.0
    assert trainer.loss_kwargs[0]["beta"] == 0.3
    monkeypatch.chdir(tmp_path)
    default = KTOTrainer(tiny_models["llama"], train_dataset=make_unpaired(8), processing_class=tokenizer)
    assert default.args.output_dir.endswith("llama-KTO") and default.loss_specs[0].name == "kto"


def test_evaluate_with_a_streamed_eval_dataset(tiny_models, tokenizer, tmp_path):
    rows = make_unpaired(8).to_list()
    streamed = IterableDataset.from_generator(lambda: iter(rows))
    trainer = KTOTrainer(tiny_models["llama"], args=_config(tmp_path, eval_strategy="steps", eval_steps=2,
                                                               per_device_eval_batch_size=4),
                         train_dataset=make_unpaired(16), eval_dataset={"a": streamed, "b": make_unpaired(8)},
                         processing_class=tokenizer)
    trainer.train()
    assert any("eval_a_loss" in h for h in trainer.state.log_history)
    assert any("eval_b_loss" in h for h in trainer.state.log_history)


def test_peft_trains_only_the_adapter_and_the_card_is_tagged_kto(tiny_models, tokenizer, tmp_path):
    trainer = KTOTrainer(tiny_models["llama"], args=_config(tmp_path), train_dataset=make_unpaired(16),
                         processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = _changed(before, trainer.model)
    assert changed and all("lora_" in n for n in changed)
    trainer.save_model()
    tags = ModelCard.load(tmp_path / "out" / "README.md").data.tags
    assert "kto" in tags and "dpo" not in tags
