"""Reference-free losses load no reference model and run no reference forward; others still do."""

import pytest
from peft import LoraConfig
from trl.trainer import dpo_trainer

from trl_dpo_plus import DPOConfig, DPOTrainer
from conftest import make_pairs


def build(loss_type, model_path, tokenizer, tmp_path, peft=False, **kw):
    args = DPOConfig(
        output_dir=str(tmp_path), loss_type=loss_type, per_device_train_batch_size=4, max_steps=2,
        report_to=[], save_strategy="no", logging_steps=1, **kw,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if peft else None
    return DPOTrainer(model_path, args=args, train_dataset=make_pairs(8), processing_class=tokenizer, peft_config=peft_config)


@pytest.mark.parametrize("loss_type,loads", [("simpo", 1), ("orpo", 1), ("cpo", 1), ("sft", 1), ("sigmoid", 2)])
def test_reference_model_loaded_only_when_needed(loss_type, loads, tiny_models, tokenizer, tmp_path, monkeypatch):
    real = dpo_trainer.create_model_from_path
    calls = []
    monkeypatch.setattr(dpo_trainer, "create_model_from_path", lambda *a, **k: calls.append(a) or real(*a, **k))
    trainer = build(loss_type, tiny_models["llama"], tokenizer, tmp_path)
    assert len(calls) == loads  # the policy, plus the reference only when the loss needs it
    assert (trainer.ref_model is None) == (loads == 1)
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type,forwards_per_step", [("simpo", 1), (["orpo"], 1), ("sigmoid", 2)])
def test_forward_calls_per_step(loss_type, forwards_per_step, peft, tiny_models, tokenizer, tmp_path):
    trainer = build(loss_type, tiny_models["llama"], tokenizer, tmp_path, peft=peft)
    counted = []
    modules = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    hooks = [m.register_forward_pre_hook(lambda *_: counted.append(1)) for m in modules]
    trainer.train()
    for hook in hooks:
        hook.remove()
    checks = 2 if trainer.layout_check is not None else 0  # the shared-prefix layout's first-batch check
    assert len(counted) == forwards_per_step * trainer.state.global_step + checks


def test_precompute_is_skipped_for_reference_free(tiny_models, tokenizer, tmp_path):
    trainer = build("simpo", tiny_models["llama"], tokenizer, tmp_path, precompute_ref_log_probs=True)
    assert not trainer.args.precompute_ref_log_probs
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names


def test_reference_free_loss_trains_and_logs_its_own_reward(tiny_models, tokenizer, tmp_path):
    trainer = build("simpo", tiny_models["llama"], tokenizer, tmp_path, learning_rate=1e-3)
    trainer.train()
    log = trainer.state.log_history[-2]
    # SimPO's reward is β·mean token log-prob: check it against the logged per-token log-probs
    assert log["rewards/chosen"] == pytest.approx(2.0 * log["dpo_plus/chosen_logp_per_token"], rel=1e-4)
    assert "dpo_plus/chosen_logratio_per_token" not in log  # no reference, no log-ratio
