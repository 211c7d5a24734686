"""What trl-dpo-plus checks for you: malformed configs, datasets and runs, each failing where it is first knowable
(config, dataset check before any model is loaded, or preparation) with a message that names the problem and the fix;
accepted-with-warning cases are counted. docs/checks.md documents this table."""

import logging

import pytest
from datasets import Dataset, IterableDataset
from trl.trainer import dpo_trainer

from trl_dpo_plus import DPOConfig, DPOTrainer
from conftest import make_pairs

NAN, INF = float("nan"), float("inf")

# -- config: raised by DPOConfig(...), before anything else ----------------------------------------------------------
CONFIG = {  # id: (config kwargs, words the message must contain: the problem, then the fix)
    "unknown loss": ({"loss_type": "sigmod"}, ["Unknown loss 'sigmod'", "Did you mean 'sigmoid'"]),
    "empty loss_type": ({"loss_type": []}, ["empty", "loss_type='sigmoid'"]),
    "loss named twice": ({"loss_type": ["ipo", "ipo"]}, ["twice", "loss_weights"]),
    "weights count": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, ["1 entries", "one weight per loss"]),
    "weight nan": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [NAN, 1.0]}, ["finite", "loss_weights=[1.0, 1.0]"]),
    "weight inf": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [INF, 1.0]}, ["finite", "at least one > 0"]),
    "weight negative": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [-1.0, 1.0]}, [">= 0", "loss_weights="]),
    "weights all zero": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 0.0]}, ["at least one > 0"]),
    "loss_kwargs flat": ({"loss_type": "simpo", "loss_kwargs": {"gamma": 0.5}}, ["keyed by loss name",
                                                                                 '{"simpo": {"beta": 0.2}}']),
    "loss_kwargs list": ({"loss_type": "simpo", "loss_kwargs": "[0.5]"}, ["mapping keyed by loss name", "simpo"]),
    "loss_kwargs bad json": ({"loss_type": "simpo", "loss_kwargs": "{gamma: 1"}, ["not valid JSON", "write it like"]),
    "loss_kwargs other loss": ({"loss_kwargs": {"ipo": {"beta": 0.1}}}, ["'ipo'", "not in loss_type"]),
    "hyperparameter typo": ({"loss_type": "simpo", "loss_kwargs": {"simpo": {"gama": 1}}}, ["'gama'", "'gamma'"]),
    "hyperparameter range": ({"loss_type": "simpo", "loss_kwargs": {"simpo": {"beta": -1}}}, ["beta=-1", "(0, inf)"]),
    "negative beta": ({"beta": -0.1}, ["beta=-0.1", "(0, inf)"]),
    "label smoothing range": ({"loss_type": "robust", "label_smoothing": 0.6}, ["label_smoothing=0.6", "[0, 0.5)"]),
    "exo smoothing zero": ({"loss_type": "exo_pair", "loss_kwargs": {"exo_pair": {"label_smoothing": 0.0}}},
                           ["label_smoothing=0.0", "(0, 1)"]),
    "f-divergence unsupported": ({"loss_type": "simpo", "f_divergence_type": "alpha_divergence"},
                                 ["not defined for ['simpo']", "reverse_kl"]),
    "WPO with aot": ({"loss_type": "aot", "use_weighting": True}, ["cannot weight", "Drop one"]),
    "sync ref, reference-free": ({"loss_type": "simpo", "sync_ref_model": True}, ["needs a reference model"]),
    "sync ref with lora": ({"lora": True, "sync_ref_model": True}, ["cannot be synced", "sync_ref_model=False"]),
    "qlora and lora": ({"qlora": True, "lora": True}, ["not both"]),
    "diagnostics action": ({"diagnostics_action": "explode"}, ["'explode'", "'warn', 'stop' or 'checkpoint'"]),
    "pair layout": ({"pair_layout": "unpadded"}, ["pair_layout='unpadded'", "'shared_prefix'", "'packed'"]),
    "prefix attention": ({"shared_prefix_attention": "flash"}, ["shared_prefix_attention='flash'", "'segments'",
                                                               "'dense_mask'"]),
    "truncation mode": ({"truncation_mode": "keep_middle"}, ["'keep_middle'", "keep_completions"]),
    "max_length zero": ({"max_length": 0}, ["max_length=0", "at least 2", "None"]),
    "max_length negative": ({"max_length": -5}, ["max_length=-5", "at least 2"]),
    "packing_length negative": ({"packing_length": -1}, ["packing_length=-1", "0 for one pair per row"]),
    "gradient accumulation zero": ({"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps=0", ">= 1",
                                                                         "batches summed"]),
    "batch size zero": ({"per_device_train_batch_size": 0}, ["per_device_train_batch_size=0", ">= 1"]),
    "eval batch size zero": ({"per_device_eval_batch_size": 0}, ["per_device_eval_batch_size=0", ">= 1"]),
    "learning rate nan": ({"learning_rate": NAN}, ["learning_rate=nan", "finite number >= 0"]),
    "learning rate negative": ({"learning_rate": -1e-5}, ["learning_rate=-1e-05", ">= 0"]),
    "epochs zero": ({"num_train_epochs": 0}, ["num_train_epochs=0", "> 0", "max_steps"]),
    "max_steps below -1": ({"max_steps": -3}, ["max_steps=-3", "-1 to train num_train_epochs"]),
    "grad norm negative": ({"max_grad_norm": -1.0}, ["max_grad_norm=-1.0", "no clipping"]),
    "weight decay inf": ({"weight_decay": INF}, ["weight_decay=inf", "finite"]),
    "adam beta one": ({"adam_beta2": 1.0}, ["adam_beta2=1.0", "[0, 1)"]),
    "adam epsilon zero": ({"adam_epsilon": 0.0}, ["adam_epsilon=0.0", "> 0"]),
    "save steps zero": ({"save_steps": 0}, ["save_steps=0", "> 0"]),
    "aot at batch one": ({"loss_type": "aot", "per_device_train_batch_size": 1}, ["at least 2 pairs",
                                                                                 "Raise it"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG))
def test_config_errors(case):
    kwargs, words = CONFIG[case]
    with pytest.raises((ValueError, TypeError)) as err:
        DPOConfig(output_dir="out", **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


# -- datasets: raised by DPOTrainer(...) before any model is loaded ---------------------------------------------------
def rows(**override):
    base = [{"prompt": "Once upon a time", "chosen": " a kind end.", "rejected": " a mean end."} for _ in range(4)]
    for key, (i, value) in override.items():
        base[i] = {**base[i], key: value}
    return Dataset.from_list(base)


def chat(prompt, chosen, rejected):
    return Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 3)


USER = [{"role": "user", "content": "Hi"}]
DATASET = {  # id: (train_dataset factory, words)
    "empty dataset": (lambda: Dataset.from_list([]), ["empty", "0 rows", "split"]),
    "empty stream": (lambda: IterableDataset.from_generator(lambda: iter([])), ["empty", "yields no rows"]),
    "missing column": (lambda: Dataset.from_list([{"prompt": "p", "chosen": "c"}]), ["no 'rejected' column",
                                                                                     "needs 'prompt'"]),
    "unpaired KTO data": (lambda: Dataset.from_list([{"prompt": "p", "completion": "c", "label": True}]),
                          ["holds unpaired completions", "trains on pairs", "loss_type='kto'"]),
    "number for text": (lambda: Dataset.from_list([{"prompt": "p", "chosen": 7, "rejected": "r"}]),
                        ["Row 0, column 'chosen'", "int", "Convert the column"]),
    "None for text": (lambda: rows(rejected=(2, None)), ["Row 2, column 'rejected'", "NoneType"]),
    "message without role": (lambda: chat(USER, [{"content": "x"}], [{"role": "assistant", "content": "y"}]),
                             ["Row 0, column 'chosen'", "message 0", "needs a 'role'"]),
    "unknown role": (lambda: chat(USER, [{"role": "bot", "content": "x"}], [{"role": "assistant", "content": "y"}]),
                     ["unknown role 'bot'", "'assistant'"]),
    "content None": (lambda: chat(USER, [{"role": "assistant", "content": None}], [{"role": "assistant", "content": "y"}]),
                     ["message 0 (assistant) has no content", "'tool_calls'"]),
    "content missing": (lambda: chat(USER, [{"role": "assistant"}], [{"role": "assistant", "content": "y"}]),
                        ["has no content"]),
    "content not text": (lambda: chat(USER, [{"role": "assistant", "content": 5}], [{"role": "assistant", "content": "y"}]),
                         ["content of type int", "must be a string"]),
    "empty message list": (lambda: chat(USER, [], [{"role": "assistant", "content": "y"}]), ["non-empty list"]),
    "mixed formats": (lambda: chat(USER, "a string", "another"), ["Row 0 mixes formats", "message lists for all"]),
}


@pytest.fixture
def model_loads(monkeypatch):
    """Counts model loads: dataset errors must come before any."""
    calls = []
    real = dpo_trainer.create_model_from_path
    monkeypatch.setattr(dpo_trainer, "create_model_from_path", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", sorted(DATASET))
def test_dataset_errors_come_before_the_model_loads(case, tiny_models, tokenizer, tmp_path, model_loads):
    factory, words = DATASET[case]
    with pytest.raises((ValueError, TypeError)) as err:
        DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), report_to=[]),
                   train_dataset=factory(), processing_class=tokenizer)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert model_loads == []


def test_eval_dataset_errors_name_the_split(tiny_models, tokenizer, tmp_path, model_loads):
    with pytest.raises(TypeError, match=r"Row 2, column 'eval:chosen'"):
        DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), report_to=[]),
                   train_dataset=rows(), eval_dataset=rows(chosen=(2, None)), processing_class=tokenizer)
    assert model_loads == []


def test_missing_local_model_path(tokenizer, tmp_path, model_loads):
    with pytest.raises(FileNotFoundError, match="does not exist.*Hub id"):
        DPOTrainer(str(tmp_path / "no" / "model"), args=DPOConfig(output_dir=str(tmp_path), report_to=[]),
                   train_dataset=rows(), processing_class=tokenizer)
    assert model_loads == []


def test_a_streamed_row_is_checked_when_it_streams(tiny_models, tokenizer, tmp_path):
    data = [{"prompt": "Once", "chosen": " kind.", "rejected": " mean."} for _ in range(8)]
    data[5]["chosen"] = None
    stream = IterableDataset.from_generator(lambda: iter(data))
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_steps=4, per_device_train_batch_size=2)
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=stream, processing_class=tokenizer)
    with pytest.raises(TypeError, match=r"Row 5, column 'chosen'.*NoneType"):
        trainer.train()


# -- preparation: after tokenization, before the first step -----------------------------------------------------------
def test_max_length_that_drops_every_pair_says_so_with_prompt_lengths(tiny_models, tokenizer, tmp_path):
    with pytest.raises(ValueError) as err:
        DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), max_length=4, report_to=[]),
                   train_dataset=make_pairs(8), processing_class=tokenizer)
    for word in ("Every one of the 8 pairs", "max_length=4", "p10/p50/p90/max", "keep_completions"):
        assert word in str(err.value)


def test_an_eval_set_that_loses_every_row_is_an_error(tiny_models, tokenizer, tmp_path):
    long_prompts = make_pairs(4).map(lambda r: {"prompt": r["prompt"] * 8})
    with pytest.raises(ValueError, match="pairs of the eval dataset was dropped"):
        DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), max_length=40, report_to=[]),
                   train_dataset=make_pairs(8), eval_dataset=long_prompts, processing_class=tokenizer)


def test_token_ids_outside_the_vocabulary(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokenizer.add_tokens(["<brand-new>"])
    data = make_pairs(4).map(lambda r: {"chosen": r["chosen"] + " <brand-new>"})
    with pytest.raises(ValueError) as err:
        DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), report_to=[]), train_dataset=data,
                   processing_class=tokenizer)
    for word in ("token id 512", "brand-new", "512 rows", "resize_token_embeddings(len(tokenizer))"):
        assert word in str(err.value)


def test_forcing_the_shared_layout_where_it_cannot_be_exact(tiny_models, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], pair_layout="shared_prefix",
                     shared_prefix_attention="dense_mask", model_init_kwargs={"attn_implementation": "flex_attention"})
    with pytest.raises(ValueError, match="not exact here.*pair_layout='auto' or 'padded'"):
        DPOTrainer(tiny_models["llama"], args=args, train_dataset=make_pairs(4), processing_class=tokenizer)


# -- accepted, with a counted warning ----------------------------------------------------------------------------------
def test_degenerate_pairs_are_counted(tiny_models, tokenizer, tmp_path, caplog):
    data = rows(chosen=(1, " a mean end."), rejected=(2, "  "))
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus.data"):
        DPOTrainer(tiny_models["llama"], args=DPOConfig(output_dir=str(tmp_path), report_to=[]), train_dataset=data,
                   processing_class=tokenizer)
    assert "1 of 4 pairs have an empty completion and 1 have chosen == rejected" in caplog.text


def test_dropped_pairs_are_counted_in_the_log_the_metrics_and_the_card(tiny_models, tokenizer, tmp_path, caplog):
    data = Dataset.from_list(list(make_pairs(6)) + [{**r, "prompt": r["prompt"] * 8} for r in make_pairs(2)])
    args = DPOConfig(output_dir=str(tmp_path), max_length=40, report_to=[], max_steps=1, logging_steps=1,
                     per_device_train_batch_size=2, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus.trainer"):
        trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.truncation_counts["train"]["dropped"] == 2
    assert "2 of 8 pairs dropped" in caplog.text
    trainer.train()
    assert trainer.state.log_history[0]["dpo_plus/train_pairs_dropped"] == 2.0
    trainer.save_model()
    assert "dropped: 2" in (tmp_path / "README.md").read_text()


def test_tool_call_turns_in_trls_format_are_accepted_and_train(tiny_models, tmp_path):
    """TRL's own tool-use preference data: an assistant turn with `tool_calls` and no `content`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m.get('content') %}{{ m['content'] }}{% endif %}"
        "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    data = Dataset.from_list([{
        "prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "chosen": [{"role": "assistant", "tool_calls": [call]}],
        "rejected": [{"role": "assistant", "content": "I cannot know that."}],
    }] * 4)
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=2,
                     save_strategy="no", logging_steps=1)
    trainer = DPOTrainer(tiny_models["llama"], args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.log_history[0]["dpo_plus/chosen_len"] > 5  # the tool call was rendered and scored
    assert "get_weather" in tokenizer.decode(trainer.train_dataset[0]["chosen_ids"])


# -- accepted with a log line, or silently right: the cases that were silent or unclear ---------------------------
def _train(model_path, tokenizer, tmp_path, data, callbacks=None, ref_model=None, **config):
    values = dict(output_dir=str(tmp_path), report_to=[], max_steps=1, per_device_train_batch_size=4,
                  save_strategy="no", logging_steps=1, use_cpu=True, gradient_checkpointing=False, max_length=64)
    values.update(config)
    trainer = DPOTrainer(model_path, ref_model=ref_model, args=DPOConfig(**values), train_dataset=data,
                         processing_class=tokenizer, callbacks=callbacks)
    trainer.train()
    return trainer


def test_detector_thresholds_that_can_never_fire_are_refused():
    from trl_dpo_plus.diagnostics import LikelihoodDisplacementCallback

    for value in (NAN, INF):
        with pytest.raises(ValueError, match="finite positive number.*can never fire"):
            LikelihoodDisplacementCallback(rejected_collapse=value)


def test_a_detector_passed_in_keeps_its_own_action_and_the_log_says_so(tiny_models, tokenizer, tmp_path, caplog):
    from trl_dpo_plus.diagnostics import LikelihoodDisplacementCallback

    mine = LikelihoodDisplacementCallback(action="warn")
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        trainer = _train(tiny_models["llama"], tokenizer, tmp_path, make_pairs(8), callbacks=[mine],
                         diagnostics_action="stop")
    assert mine.action == "warn" and mine in trainer.diagnostics
    assert "diagnostics_action='stop' applies to the default detectors" in caplog.text
    assert "LikelihoodDisplacementCallback(action='warn')" in caplog.text


def test_an_explicit_ref_model_for_a_reference_free_loss_is_released(tiny_models, tokenizer, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        trainer = _train(tiny_models["llama"], tokenizer, tmp_path, make_pairs(8), ref_model=reference,
                         loss_type="simpo")
    assert trainer.ref_model is None and "ref_model passed in is not used and is released" in caplog.text


def test_a_nan_weight_is_not_blamed_on_the_layout(tiny_models, tokenizer, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with __import__("torch").no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = NAN
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        trainer = _train(model, tokenizer, tmp_path, make_pairs(8), loss_type="simpo")
    assert trainer.layout.name == "shared_prefix" and "skipped" in trainer.layout_check
    assert "falling back" not in caplog.text


def test_paired_data_with_an_unrelated_label_column_trains_as_pairs(tiny_models, tokenizer, tmp_path):
    data = make_pairs(8).add_column("label", ["source-a"] * 8)
    trainer = _train(tiny_models["llama"], tokenizer, tmp_path, data)
    assert trainer.data_kind == "paired" and trainer.state.global_step == 1


def test_a_text_dataset_with_an_all_none_image_column_trains(tiny_models, tokenizer, tmp_path, caplog):
    data = make_pairs(8).add_column("image", [None] * 8)
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        trainer = _train(tiny_models["llama"], tokenizer, tmp_path, data)
    assert trainer.state.global_step == 1 and "Dropping the image column: every row holds None" in caplog.text


def test_kto_with_a_single_label_warns_that_one_side_is_empty(tiny_models, tokenizer, tmp_path, caplog):
    from conftest import make_unpaired

    data = make_unpaired(8).map(lambda row: {"label": True})
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        _train(tiny_models["llama"], tokenizer, tmp_path, data, loss_type="kto")
    assert "Every train row is labelled desirable: the undesirable side of the loss is empty" in caplog.text


def test_resuming_with_another_loss_says_so(tiny_models, tokenizer, tmp_path, caplog):
    _train(tiny_models["llama"], tokenizer, tmp_path, make_pairs(8), max_steps=2, save_strategy="steps", save_steps=1)
    with caplog.at_level(logging.WARNING, logger="trl_dpo_plus"):
        values = dict(output_dir=str(tmp_path), report_to=[], max_steps=2, per_device_train_batch_size=4,
                      save_strategy="no", logging_steps=1, use_cpu=True, gradient_checkpointing=False, max_length=64,
                      loss_type="ipo")
        trainer = DPOTrainer(tiny_models["llama"], args=DPOConfig(**values), train_dataset=make_pairs(8),
                             processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "Resuming a checkpoint trained with loss_type=['sigmoid'] with loss_type=['ipo']" in caplog.text
