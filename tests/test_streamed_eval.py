"""Streamed evaluation in the default (packed) layout: TRL's `test_evaluate_with_eval_dataset[iterable_dataset]`."""

import pytest
import torch
from datasets import IterableDataset

from conftest import make_pairs
from trl_dpo_plus import DPOConfig, DPOTrainer
from trl_dpo_plus.layout.choice import check_batch_intact


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
                  eval_strategy="steps", eval_steps=1, logging_steps=1, report_to=[], save_strategy="no",
                  use_cpu=True, gradient_checkpointing=False, max_length=64)
    values.update(overrides)
    return DPOConfig(**values)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_streamed_eval_dataset_evaluates_in_the_packed_layout(tiny_models, tokenizer, tmp_path, as_dict):
    rows = make_pairs(8, seed=3).to_list()
    streamed = IterableDataset.from_generator(lambda: iter(rows))
    eval_dataset = {"held": streamed, "more": make_pairs(4, seed=4)} if as_dict else streamed
    trainer = DPOTrainer(tiny_models["llama"], args=_args(tmp_path), train_dataset=make_pairs(8),
                         eval_dataset=eval_dataset, processing_class=tokenizer)
    assert trainer.args.accelerator_config.dispatch_batches is False
    trainer.train()
    assert trainer.layout.name == "shared_prefix" and trainer.layout_check["max_abs_token_logp_error"] < 1e-4
    key = "eval_held_loss" if as_dict else "eval_loss"
    assert any(key in h for h in trainer.state.log_history)


def test_a_damaged_packed_batch_blames_the_pipeline_not_the_model(tiny_models, tokenizer, tmp_path):
    trainer = DPOTrainer(tiny_models["llama"], args=_args(tmp_path, eval_strategy="no"), train_dataset=make_pairs(8),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    check_batch_intact(batch)
    cut = {k: v[:1] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}  # what dispatch did
    with pytest.raises(RuntimeError, match="damaged before the model saw it.*dispatch_batches"):
        check_batch_intact(cut)
