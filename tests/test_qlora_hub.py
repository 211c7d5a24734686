"""QLoRA/LoRA in one switch, the adapter-disabled reference, adapter output, the model card, publishing, merging."""

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from trl_dpo_plus import DPOConfig, DPOTrainer
from trl_dpo_plus.hub import merge_and_save
from trl_dpo_plus.qlora import qlora_defaults
from conftest import make_pairs


def completion_logps(model, tokenizer, rows):
    """Summed completion log-probs with a plain forward (no fused head), for comparing models."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["chosen"])["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logps = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        out.append(logps[len(prompt) - 1 :].sum())
    return torch.stack(out)


def train(model, tokenizer, tmp_path, steps=4, **config):
    args = DPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
                     report_to=[], save_strategy="no", logging_steps=1, seed=0, **config)
    trainer = DPOTrainer(model, args=args, train_dataset=make_pairs(16), processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def qlora_run(tiny_models, tokenizer, tmp_path_factory):
    path = tiny_models["llama64"]
    tmp = tmp_path_factory.mktemp("qlora")
    args = DPOConfig(output_dir=str(tmp), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                     report_to=[], save_strategy="no", logging_steps=1, seed=0, qlora=True)
    trainer = DPOTrainer(path, args=args, train_dataset=make_pairs(16), processing_class=tokenizer)
    base_before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if not v.requires_grad}
    lora_before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    return trainer, base_before, lora_before


@pytest.mark.slow
def test_qlora_trains_the_adapter_and_leaves_the_4bit_base_untouched(qlora_run):
    trainer, base_before, lora_before = qlora_run
    model = trainer.model
    assert isinstance(model, PeftModel) and model.get_base_model().is_loaded_in_4bit
    assert trainer.ref_model is None  # one model in memory: the reference is the adapter-disabled base
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    after = dict(model.named_parameters())
    for name, before in base_before.items():
        assert torch.equal(after[name].detach(), before), f"base weight {name} changed"
    changed = [n for n, before in lora_before.items() if not torch.equal(after[n].detach(), before)]
    assert changed and all("lora_" in n for n in lora_before)
    assert any("lora_B" in n for n in changed)  # B starts at zero: it moved, so the adapter trained
    config = model.peft_config["default"]
    assert config.r == 16 and config.lora_alpha == 32 and config.lora_dropout == 0.05
    adapted = {name.rsplit(".", 1)[-1] for name in config.target_modules}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    assert trainer.args.gradient_checkpointing


@pytest.mark.slow
def test_qlora_reference_equals_the_4bit_base(qlora_run, tiny_models, tokenizer):
    trainer, _, _ = qlora_run
    rows = make_pairs(4, seed=9).to_list()
    # the same 4-bit base, loaded fresh; kbit preparation keeps the non-quantised modules in fp32
    fresh = AutoModelForCausalLM.from_pretrained(tiny_models["llama64"], quantization_config=qlora_defaults()[0],
                                                 dtype=torch.float32)
    with trainer.model.disable_adapter():
        reference = completion_logps(trainer.model, tokenizer, rows)
    policy = completion_logps(trainer.model, tokenizer, rows)
    base = completion_logps(fresh, tokenizer, rows)
    # equal up to bf16 compute noise of bitsandbytes' CPU kernels (measured: ≈5e-5 relative, the same size as the
    # trainer's own model gives between train and eval mode), while training moved the policy 10× further
    torch.testing.assert_close(reference, base, rtol=2e-4, atol=0)
    assert (reference - base).abs().max() * 10 < (policy - reference).abs().max()


@pytest.mark.slow
def test_qlora_adapter_folder_reloads_with_the_same_logps_and_a_card(qlora_run, tokenizer, tmp_path):
    trainer, _, _ = qlora_run
    trainer.save_model(str(tmp_path / "adapter"))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    rows = make_pairs(4, seed=9).to_list()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", quantization_config=qlora_defaults()[0],
                                                        dtype=torch.float32)
    trained = completion_logps(trainer.model, tokenizer, rows)
    with trainer.model.disable_adapter():
        moved = (trained - completion_logps(trainer.model, tokenizer, rows)).abs().max()
    difference = (completion_logps(reloaded, tokenizer, rows) - trained).abs().max()
    assert difference < 3e-4 * trained.abs().max() and difference * 10 < moved  # bf16 noise, not a lost adapter
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    meta = card.data.to_dict()["trl_dpo_plus"]
    assert meta["quantization"]["bnb_4bit_quant_type"] == "nf4" and meta["quantization"]["bnb_4bit_use_double_quant"] is True
    assert meta["lora"]["r"] == 16 and meta["reference"] == "adapter-disabled base model (one model in memory)"
    assert "qlora" in card.data.tags
    with pytest.raises(ValueError, match="pass dequantize=True"):
        merge_and_save(trainer.model, tmp_path / "merged")


def test_lora_card_records_how_it_was_trained(tiny_models, tokenizer, tmp_path):
    trainer = train(tiny_models["llama"], tokenizer, tmp_path, lora=True, loss_type=["sigmoid", "sft"],
                    loss_weights=[1.0, 0.3], beta=0.2)
    trainer.create_model_card(dataset_name="local/pairs", tags=["story"])
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert {"trl", "dpo", "trl-dpo-plus", "sigmoid", "sft", "lora", "story"} <= set(data["tags"])
    assert data["datasets"] == ["local/pairs"]
    meta = data["trl_dpo_plus"]
    assert meta["loss_type"] == ["sigmoid", "sft"] and meta["loss_weights"] == [1.0, 0.3]
    assert meta["loss_kwargs"] == {"sigmoid": {"beta": 0.2}, "sft": {"beta": 0.2}}
    assert meta["quantization"] is None and meta["lora"]["lora_alpha"] == 32
    assert meta["steps"] == 4
    final = [h for h in trainer.state.log_history if "rewards/accuracies" in h][-1]
    assert meta["final_reward_accuracy"] == pytest.approx(final["rewards/accuracies"], abs=1e-4)
    assert meta["diagnostics_flags"] == []
    assert "| `sigmoid` | 1.0 | beta=0.2 | yes | https://arxiv.org/abs/2305.18290 |" in card.text
    assert "Reference model: **adapter-disabled base model (one model in memory)**" in card.text
    assert "![diagnostics](diagnostics.png)" in card.text


def test_full_finetune_card_and_reference_free_mode(tiny_models, tokenizer, tmp_path):
    trainer = train(tiny_models["llama"], tokenizer, tmp_path, loss_type="simpo", loss_kwargs={"simpo": {"gamma": 0.5}})
    trainer.save_model()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    assert card.data.to_dict()["trl_dpo_plus"]["loss_kwargs"] == {"simpo": {"beta": 2.0, "gamma": 0.5}}
    assert "Reference model: **none (reference-free loss)**" in card.text and "Full fine-tuning" in card.text


def test_lora_adapter_reloads_and_merges_with_the_same_logps(tiny_models, tokenizer, tmp_path):
    trainer = train(tiny_models["llama"], tokenizer, tmp_path / "run", lora=True)
    trainer.save_model(str(tmp_path / "adapter"))
    rows = make_pairs(4, seed=9).to_list()
    trained = completion_logps(trainer.model, tokenizer, rows)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(completion_logps(reloaded, tokenizer, rows), trained, rtol=0, atol=1e-5)
    merged_dir = merge_and_save(trainer.model, tmp_path / "merged", tokenizer=tokenizer, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(completion_logps(merged, tokenizer, rows), trained, rtol=0, atol=1e-4)


def test_retraining_an_existing_adapter_uses_its_frozen_copy(tiny_models, tokenizer, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], logging_steps=1)
    trainer = DPOTrainer(peft_model, args=args, train_dataset=make_pairs(8), processing_class=tokenizer)
    assert "ref" in trainer.model.peft_config
    trainer.train()
    log = trainer.state.log_history[0]
    # before the first update the policy equals its frozen copy: rewards are exactly zero
    assert log["rewards/chosen"] == 0.0 and log["rewards/rejected"] == 0.0
    trainer.create_model_card()
    assert "frozen copy of the initial adapter ('ref' adapter)" in (tmp_path / "README.md").read_text()


def test_push_to_hub_up_to_the_upload(tiny_models, tokenizer, tmp_path, monkeypatch):
    """No network here: everything up to the upload is real; the Hub API is replaced by a recorder."""
    import transformers.trainer as hf_trainer
    from huggingface_hub import CommitOperationAdd

    calls = {}

    class RecordingApi:
        def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kw):
            calls["create_repo"] = {"repo_id": repo_id, "token": token}
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, token=None, revision=None, ignore_patterns=None, **kw):
            from fnmatch import fnmatch
            from pathlib import Path

            files = [p for p in Path(folder_path).rglob("*") if p.is_file()]
            kept = [p for p in files if not any(fnmatch(str(p.relative_to(folder_path)), pat) or
                                                fnmatch(p.relative_to(folder_path).parts[0], pat) for pat in ignore_patterns or [])]
            calls["operations"] = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder_path)), path_or_fileobj=str(p)) for p in kept]
            calls["upload"] = {"repo_id": repo_id, "token": token, "message": commit_message}

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: RecordingApi())
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    trainer = train(tiny_models["llama"], tokenizer, tmp_path, lora=True, hub_model_id="me/stories-dpo",
                    hub_token="hf_test_token")
    trainer.push_to_hub(dataset_name="local/pairs")
    assert calls["create_repo"]["repo_id"] == "me/stories-dpo" and calls["upload"]["token"] == "hf_test_token"
    uploaded = {op.path_in_repo for op in calls["operations"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "diagnostics.png"} <= uploaded
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict()["datasets"] == ["local/pairs"] and 'from_pretrained("me/stories-dpo")' in card.text


@pytest.mark.parametrize(
    "make_model,config,match",
    [
        (lambda p: get_peft_model(AutoModelForCausalLM.from_pretrained(p), LoraConfig(target_modules="all-linear")),
         {"qlora": True}, "already has adapters"),
        (lambda p: AutoModelForCausalLM.from_pretrained(p), {"qlora": True}, "needs the model as a path"),
        (lambda p: AutoModelForCausalLM.from_pretrained(p, quantization_config=qlora_defaults()[0]), {"qlora": True},
         "already quantised"),
    ],
)
def test_bad_qlora_input(make_model, config, match, tiny_models, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], **config)
    with pytest.raises(ValueError, match=match):
        DPOTrainer(make_model(tiny_models["llama"]), args=args, train_dataset=make_pairs(4), processing_class=tokenizer)


def test_lm_head_target_and_sync_ref_are_refused(tiny_models, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], lora=True)
    with pytest.raises(ValueError, match="lm_head in lora_target_modules"):
        DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(4), processing_class=tokenizer,
                   peft_config=LoraConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="cannot be synced"):
        DPOConfig(output_dir=str(tmp_path), report_to=[], qlora=True, sync_ref_model=True)
    with pytest.raises(ValueError, match="not both"):
        DPOConfig(output_dir=str(tmp_path), report_to=[], qlora=True, lora=True)


def test_a_saved_adapter_names_its_base_by_hub_id_and_loads_from_another_path(tiny_models, tokenizer, tmp_path):
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = train(tiny_models["llama"], tokenizer, tmp_path / "run", lora=True, base_model="my-org/tiny-llama")
    trainer.save_model()
    moved = shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "adapter")
    config = json.loads((moved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/tiny-llama"  # not this machine's path
    assert ModelCard.load(moved / "README.md").data.base_model == "my-org/tiny-llama"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), str(moved))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trainer.model.cpu()(ids).logits, atol=1e-5)


def test_a_local_base_without_a_hub_id_warns_at_save_and_refuses_push(tiny_models, tokenizer, tmp_path, caplog):
    import logging
    from unittest import mock

    trainer = train(tiny_models["llama"], tokenizer, tmp_path, lora=True)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        trainer.save_model()
    assert "has no Hub id" in caplog.text and "--base_model" in caplog.text
    with mock.patch.object(trainer.args, "push_to_hub", True), pytest.raises(ValueError, match="push_to_hub.*base_model"):
        trainer.save_model()
