"""Unpaired KTO data (prompt, completion, label) in DPOPlusTrainer: one step equals trl.KTOTrainer's, the data checks,
and the paired <-> unpaired helper."""

import pytest
import trl
from datasets import Dataset
from peft import LoraConfig

from trl_dpo_plus import DPOConfig, DPOTrainer, unpair_preference_dataset
from conftest import make_pairs, make_unpaired


def run_one_step(trainer_cls, config_cls, model_path, tokenizer, tmp_path, peft, dataset=None, **overrides):
    args = config_cls(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, beta=0.1,
        use_cpu=True, bf16=False, seed=7, report_to=[], save_strategy="no", logging_steps=1,
        dataloader_drop_last=True, **overrides,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0) if peft else None
    trainer = trainer_cls(model_path, args=args, train_dataset=dataset or make_unpaired(8, seed=1),
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return trainer.state.log_history[:2], trainer


# apo_zero_unpaired has no KL term, so our default order is random; TRL's KTOConfig reads in order for every loss
SEQUENTIAL = {"train_sampling_strategy": "sequential"}
CASES = [
    pytest.param({"loss_type": "kto"}, id="kto"),
    pytest.param({"loss_type": "apo_zero_unpaired", **SEQUENTIAL}, id="apo_zero_unpaired"),
    pytest.param({"loss_type": "kto", "desirable_weight": 1.3, "undesirable_weight": 0.7}, id="kto-weights"),
    pytest.param({"loss_type": "kto", "precompute_ref_log_probs": True}, id="kto-precompute"),
    pytest.param({"loss_type": "apo_zero_unpaired", "precompute_ref_log_probs": True, **SEQUENTIAL}, id="apo-precompute"),
]


@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("overrides", CASES)
def test_one_step_matches_trl_kto(overrides, peft, layout, tiny_models, tokenizer, tmp_path):
    model = tiny_models["llama"]
    theirs, _ = run_one_step(trl.KTOTrainer, trl.KTOConfig, model, tokenizer, tmp_path / "trl", peft, **overrides)
    ours, trainer = run_one_step(DPOTrainer, DPOConfig, model, tokenizer, tmp_path / "ours", peft, pair_layout=layout,
                                 **overrides)
    assert trainer.layout.name == layout
    # Step 1 starts at the reference (every loss 0.5); step 2, after an update, has real log-ratios and KL baseline
    assert theirs[1]["loss"] != pytest.approx(0.5, abs=1e-4)
    if overrides["loss_type"] == "kto":
        assert theirs[1]["kl"] > 0  # the baseline z0 is not clamped away: step 2 depends on it
    # The padded layout is TRL's own arithmetic; the shared-prefix one sums the same terms in another order (the
    # tolerances of the paired shared-prefix tests in test_trainer_parity.py)
    tol = 1e-6 if layout == "padded" else 1e-5
    for step, (mine, trl_log) in enumerate(zip(ours, theirs, strict=True)):
        assert mine["loss"] == pytest.approx(trl_log["loss"], rel=tol, abs=tol), step
        assert mine["grad_norm"] == pytest.approx(trl_log["grad_norm"], rel=10 * tol, abs=tol), step
        assert mine["grad_norm"] > 0
        keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "entropy", "num_tokens"]
        for key in keys + (["kl"] if overrides["loss_type"] == "kto" else []):
            assert mine[key] == pytest.approx(trl_log[key], rel=1e-5, abs=10 * tol), (step, key)


# -- the data kind: recognised at preparation, refused with the fix ---------------------------------------------
def test_kto_on_pairs_is_refused_before_the_model_loads(tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type="kto", report_to=[])
    with pytest.raises(ValueError) as err:
        DPOTrainer("/no/such/model", args=args, train_dataset=make_pairs(4), processing_class=tokenizer)
    for words in ("holds pairs", "trains on unpaired completions", "unpair_preference_dataset", "--unpair", "kto_pair"):
        assert words in str(err.value)


def test_paired_loss_on_unpaired_rows_is_refused(tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type="sigmoid", report_to=[])
    with pytest.raises(ValueError, match="holds unpaired completions.*trains on pairs.*loss_type='kto'"):
        DPOTrainer("/no/such/model", args=args, train_dataset=make_unpaired(4), processing_class=tokenizer)


@pytest.mark.parametrize("labels, words", [
    (["good", "bad", "good", "bad"], "Row 0, column 'label': 'good' is not a bool"),
    ([True, False, None, True], "Row 2, column 'label': None is not a bool"),
    ([1, 0, 2, 1], "Row 2, column 'label': 2 is not a bool"),  # 0/1 are taken as False/True
])
def test_a_label_that_is_not_a_bool_names_the_row(labels, words, tokenizer, tmp_path):
    rows = make_unpaired(4).remove_columns("label").add_column("label", labels)
    args = DPOConfig(output_dir=str(tmp_path), loss_type="kto", report_to=[])
    with pytest.raises(TypeError, match=words):
        DPOTrainer("/no/such/model", args=args, train_dataset=rows, processing_class=tokenizer)


def test_unpaired_rows_need_a_prompt_column(tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type="kto", report_to=[])
    with pytest.raises(ValueError, match="no 'prompt' column.*needs 'prompt', 'completion' and 'label'"):
        DPOTrainer("/no/such/model", args=args, train_dataset=make_unpaired(4).remove_columns("prompt"),
                   processing_class=tokenizer)


@pytest.mark.parametrize("overrides, match", [
    ({"loss_type": ["kto", "sigmoid"]}, r"mixes losses for pairs .*\['sigmoid'\].*unpaired completions .*\['kto'\]"),
    ({"loss_type": "kto", "per_device_train_batch_size": 1}, "per_device_train_batch_size must be > 1"),
    ({"loss_type": "kto", "train_sampling_strategy": "random"}, "train_sampling_strategy='random' would break"),
    ({"loss_type": "kto", "ld_alpha": 0.5}, "ld_alpha weights the tokens or pairs of paired data"),
    ({"loss_type": "kto", "loss_kwargs": {"kto": {"desirable_weight": 0}}}, r"desirable_weight=0 is out of range"),
])
def test_config_errors(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        DPOConfig(output_dir=str(tmp_path), report_to=[], **overrides)


def test_sampling_defaults_follow_the_kl_term(tmp_path):
    make = lambda **kw: DPOConfig(output_dir=str(tmp_path), report_to=[], **kw)  # noqa: E731
    assert make(loss_type="kto").train_sampling_strategy == "sequential"
    assert make(loss_type="sigmoid").train_sampling_strategy == "random"
    no_kl = make(loss_type="apo_zero_unpaired", per_device_train_batch_size=1)  # no KL term: batch of 1 is fine
    assert no_kl.train_sampling_strategy == "random"
    # TRL's KTOConfig field names reach the loss
    assert make(loss_type="kto", desirable_weight=1.33).loss_kwargs_for("kto")["desirable_weight"] == 1.33


def test_trl_kto_config_is_accepted(tiny_models, tokenizer, tmp_path):
    """A TRL KTO script switches with one import: trl.KTOConfig's fields (weights included) carry over."""
    args = trl.KTOConfig(output_dir=str(tmp_path), desirable_weight=1.2, per_device_train_batch_size=4, max_steps=1,
                         use_cpu=True, bf16=False, report_to=[], save_strategy="no")
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_unpaired(8), processing_class=tokenizer)
    assert trainer.loss_kwargs == [{"beta": 0.1, "desirable_weight": 1.2, "undesirable_weight": 1.0}]
    assert trainer.args.train_sampling_strategy == "sequential" and trainer.data_kind == "unpaired"


# -- paired <-> unpaired ---------------------------------------------------------------------------------------
def test_unpair_turns_each_pair_into_a_desirable_and_an_undesirable_row():
    pairs = make_pairs(10, seed=3)
    rows = unpair_preference_dataset(pairs)
    assert set(rows.column_names) == {"prompt", "completion", "label"}
    expected = sorted([(p["prompt"], p["chosen"], True) for p in pairs] + [(p["prompt"], p["rejected"], False)
                                                                          for p in pairs])
    assert sorted(zip(rows["prompt"], rows["completion"], rows["label"])) == expected
    trl_order = unpair_preference_dataset(pairs, seed=None)
    assert trl_order["label"] == [True] * 10 + [False] * 10  # TRL's block order
    assert rows["label"] != trl_order["label"]  # shuffled: batches hold both labels


def test_unpair_extracts_an_implicit_prompt_and_keeps_conversations():
    user = [{"role": "user", "content": "Tell a story."}]
    pairs = Dataset.from_list([{"chosen": user + [{"role": "assistant", "content": "A kind one."}],
                                "rejected": user + [{"role": "assistant", "content": "A mean one."}]}])
    rows = unpair_preference_dataset(pairs, seed=None)
    assert rows[0] == {"prompt": user, "completion": [{"role": "assistant", "content": "A kind one."}], "label": True}
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected' columns"):
        unpair_preference_dataset(rows)


def test_cli_unpair_trains_kto_on_a_paired_file(tiny_models, tmp_path):
    """`--loss_type kto --unpair` on a prompt/chosen/rejected file: both splits unpaired, evaluated, carded."""
    import json

    from huggingface_hub import ModelCard

    from trl_dpo_plus.cli import main

    data = tmp_path / "data"
    data.mkdir()
    make_pairs(16, seed=2).to_json(data / "train.jsonl")
    make_pairs(8, seed=5).to_json(data / "test.jsonl")
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", tiny_models["llama"], "--dataset_name", str(data), "--output_dir",
                 str(out), "--loss_type", "kto", "--unpair", "--max_steps", "4", "--per_device_train_batch_size", "4",
                 "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "4", "--report_to", "none",
                 "--learning_rate", "1e-3"]) == 0
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 4 and all("kl" in h and "dpo_plus/desirable_logratio_per_token" in h for h in train_logs)
    assert any("eval_kl" in h for h in history)
    card = ModelCard.load(out / "README.md")
    assert card.data.trl_dpo_plus["data"] == "unpaired"
    assert card.data.trl_dpo_plus["label_counts"] == {"desirable": 16, "undesirable": 16}
    assert "unpaired completions (prompt, completion, label): 16 desirable, 16 undesirable" in card.text
    assert "desirable_weight=1.0" in card.text


@pytest.mark.slow
def test_diagnostics_read_the_labels(tiny_models, tokenizer, tmp_path):
    """Per-label reward trends and the displacement detector on KTO: a high learning rate drives the desirable
    completions' log-ratio down (the KTO analogue of chosen falling); the report labels the sides."""
    import json

    args = DPOConfig(output_dir=str(tmp_path), loss_type="kto", per_device_train_batch_size=8, max_steps=12,
                     learning_rate=3e-2, logging_steps=1, report_to=[], save_strategy="no", seed=0)
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_unpaired(96, seed=4),
                         processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("dpo_plus/desirable_logratio_per_token" in h and "dpo_plus/undesirable_logratio_per_token" in h
               for h in logs)
    assert all("diagnostics/displacement/chosen_logratio" in h for h in logs[1:])  # the detector runs on the labels
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert report["data"] == "unpaired"
    length = next(cb for cb in trainer.diagnostics if cb.name == "length_bias")
    assert "unpaired data has no pairs" in length.disabled_reason
    displacement = [f for f in report["train"]["flags"] if f["flag"] in ("both_falling", "rejected_collapse",
                                                                         "rejected_driven")]
    assert displacement, report["train"]["summary"]
