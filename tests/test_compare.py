"""`compare` and the reference cache: every number in the table comes from the runs, the reference is paid once."""

import json
import logging

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import make_pairs
from trl_dpo_plus import DPOConfig, DPOTrainer
from trl_dpo_plus.compare import RunSpec, compare, load_reward_fn, parse_run, run_config, win_rate


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "cmp"), lora=True, max_steps=3, per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                  gradient_checkpointing=False, seed=0, max_length=64)
    values.update(overrides)
    return DPOConfig(**values)


# -- run specs and per-run configs ---------------------------------------------------------------------------------
def test_run_specs_parse_hyperparameters_and_name_their_folder():
    assert parse_run("ipo") == RunSpec("ipo")
    spec = parse_run("simpo:beta=2.5, gamma=0.55")
    assert spec == RunSpec("simpo", {"beta": 2.5, "gamma": 0.55}) and spec.label == "simpo-beta2.5-gamma0.55"
    with pytest.raises(ValueError, match="key=value"):
        parse_run("ipo:0.5")
    with pytest.raises(ValueError, match="ipo"):  # an unknown loss names the close ones
        parse_run("ipoo")


def test_run_configs_keep_the_shared_schedule_and_set_each_loss(tmp_path):
    base = _args(tmp_path)
    from pathlib import Path

    sigmoid = run_config(base, parse_run("sigmoid"), Path("out"), "cache")
    simpo = run_config(base, parse_run("simpo:gamma=0.3"), Path("out"), "cache")
    kto = run_config(base, parse_run("kto:beta=0.2"), Path("out"), "cache")
    assert (sigmoid.beta, simpo.beta, kto.beta) == (0.1, 2.0, 0.2)  # each loss's own default unless given
    assert simpo.loss_kwargs_for("simpo")["gamma"] == 0.3
    assert sigmoid.reference_cache_dir == "cache" and sigmoid.precompute_ref_log_probs
    assert simpo.reference_cache_dir is None and not simpo.precompute_ref_log_probs  # reference-free: no reference
    assert kto.unpair and kto.train_sampling_strategy == "sequential" and sigmoid.train_sampling_strategy == "random"
    assert {c.learning_rate for c in (sigmoid, simpo, kto)} == {1e-3} and kto.output_dir == "out/kto-beta0.2"
    given = run_config(_args(tmp_path, beta=0.3), parse_run("ipo"), Path("out"), None)
    assert given.beta == 0.3  # a --beta given for the comparison applies to every run without its own


def test_win_rate_counts_ties_as_half():
    wins, ties = win_rate([[3.0, 0.0, -1.0]], [[1.0, 0.0, 2.0]])
    assert wins == pytest.approx((1 + 0.5 + 0) / 3) and ties == pytest.approx(1 / 3)


def test_reward_fn_spec_errors_name_the_problem(tmp_path):
    (tmp_path / "scores.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    assert load_reward_fn(f"{tmp_path / 'scores.py'}:score")(prompts=["a"], completions=["b"]) == [1.0]
    assert load_reward_fn("trl_dpo_plus.demo:lexicon_rewards")(prompts=["p"], completions=["happy day"]) == [1]
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("trl_dpo_plus.demo")
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_reward_fn("trl_dpo_plus.demo:nope")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_reward_fn("missing.py:score")


# -- the reference cache -------------------------------------------------------------------------------------------
def _train(path, tokenizer, args, data):
    trainer = DPOTrainer(path, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_cached_reference_trains_exactly_like_a_fresh_one_and_a_change_recomputes(
        tiny_models, tokenizer, tmp_path, caplog):
    data = make_pairs(24)
    cache = str(tmp_path / "cache")
    fresh, fresh_losses = _train(tiny_models["llama"], tokenizer, _args(tmp_path, precompute_ref_log_probs=True), data)
    first, first_losses = _train(tiny_models["llama"], tokenizer, _args(tmp_path, reference_cache_dir=cache), data)
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):
        again, again_losses = _train(tiny_models["llama"], tokenizer, _args(tmp_path, reference_cache_dir=cache), data)
    assert first.reference_forwards["rows"] == 24 and again.reference_forwards["rows"] == 0
    assert "read from" in caplog.text and "no reference forward" in caplog.text
    assert fresh_losses == first_losses == again_losses and len(again_losses) == 3  # bit-identical training

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):  # another truncation: never the stale entry
        shorter, _ = _train(tiny_models["llama"], tokenizer, _args(tmp_path, reference_cache_dir=cache, max_length=20),
                            data)
    assert shorter.reference_forwards["rows"] == len(shorter.train_dataset) > 0
    lines = [r.message for r in caplog.records if "Computing reference log-probs of the train split" in r.message]
    assert len(lines) == 1 and "another dataset, truncation" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_dpo_plus"):  # other reference weights
        other, _ = _train(tiny_models["llama64"], tokenizer, _args(tmp_path, reference_cache_dir=cache), data)
    assert other.reference_forwards["rows"] == 24 and "another reference_weights" in caplog.text


def test_a_lora_models_reference_fingerprint_is_its_base(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trl_dpo_plus.reference_cache import weights_fingerprint

    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    plain = weights_fingerprint(base)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        next(p for n, p in adapted.named_parameters() if "lora_B" in n).add_(1.0)  # a trained adapter
    assert weights_fingerprint(adapted) == plain
    assert weights_fingerprint(adapted, keep_adapters=True) != plain


# -- compare end to end --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_three_losses_numbers_come_from_the_runs(stories_path, tmp_path, clean_registry):
    from trl_dpo_plus import register_loss

    @register_loss("explodes", requires_reference=False)
    def explodes(batch, *, beta=0.1):
        raise RuntimeError("this loss fails at step 1")

    train, held_out = make_pairs(40, seed=0), make_pairs(16, seed=1)
    args = _args(tmp_path)
    scores = lambda prompts, completions, **kw: [float(c.count("e")) for c in completions]  # noqa: E731
    result = compare(stories_path, train, held_out, ["sigmoid", "ipo:beta=0.5", "explodes", "simpo"], args,
                     reward_fn=scores, generation_prompts=3, samples_per_prompt=2, max_new_tokens=8, progress=False)
    runs = {r.name: r for r in result.runs}
    assert list(runs) == ["sigmoid", "ipo-beta0.5", "explodes", "simpo"]
    assert runs["explodes"].status == "failed" and "step 1" in runs["explodes"].error
    assert all(runs[n].status == "ok" and runs[n].steps == 3 for n in ("sigmoid", "ipo-beta0.5", "simpo"))

    # One reference pass over the 24 train pairs that 3 steps × 8 read, and the held-out ones, shared by both
    # reference-based runs; none for the reference-free one
    assert runs["sigmoid"].reference_rows == 24 + 16 and runs["ipo-beta0.5"].reference_rows == 0
    assert runs["simpo"].reference_rows == 0 and result.reference["forward_rows"] == 40
    assert result.reference["forward_rows_unshared"] == 2 * 40
    assert any("reads 24 of the 40 train pairs" in note for note in result.notes)

    # The reference-free loss has no log-ratio values; the others' differ (they trained differently)
    simpo = runs["simpo"].held_out
    assert simpo["chosen_logratio_per_token"] is None and simpo["rejected_logratio_per_token"] is None
    sigmoid, ipo = runs["sigmoid"].held_out, runs["ipo-beta0.5"].held_out
    assert sigmoid["chosen_logratio_per_token"] != ipo["chosen_logratio_per_token"]
    assert all(r.held_out["kl_per_token"] > 0 and r.held_out["pairs"] == 16 for r in (runs["sigmoid"], runs["simpo"]))

    # The held-out numbers equal TRL's own evaluation of the saved adapter against the base (its reward, its accuracy)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_path), runs["sigmoid"].output_dir)
    check = DPOTrainer(policy, AutoModelForCausalLM.from_pretrained(stories_path), args=_args(tmp_path, output_dir=str(tmp_path / "check"), per_device_eval_batch_size=16,
                                          pair_layout="padded", lora=False),
                       train_dataset=train, eval_dataset=held_out, processing_class=result_tokenizer(stories_path))
    metrics = check.evaluate()
    assert metrics["eval_rewards/accuracies"] == pytest.approx(sigmoid["reward_accuracy"], abs=1e-6)
    assert metrics["eval_rewards/margins"] == pytest.approx(sigmoid["margin_mean"], abs=1e-4)

    # Generation columns, files, cards
    assert 0 <= runs["simpo"].generation["win_rate"] <= 1 and "fluency" in result.base_generation
    out = tmp_path / "cmp"
    table = (out / "comparison.md").read_text()
    assert "| simpo (reference-free) |" in table and "**failed**: RuntimeError" in table
    simpo_row = next(line for line in table.splitlines() if line.startswith("| simpo"))
    assert "| — |" in simpo_row  # no log-ratio values
    saved = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in saved["runs"]] == list(runs) and (out / "comparison.png").stat().st_size > 10_000
    assert (out / "explodes" / "error.txt").read_text().count("this loss fails at step 1")
    card = ModelCard.load(out / "ipo-beta0.5" / "README.md")
    assert card.data.to_dict()["library_name"] == "peft" and str(tmp_path) not in card.content
    assert (out / "ipo-beta0.5" / "adapter_model.safetensors").exists()


def result_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def test_compare_rejects_bad_runs_before_training_anything(stories_path, tmp_path):
    train = make_pairs(8)
    with pytest.raises(ValueError, match="same name"):
        compare(stories_path, train, train, ["ipo", "ipo"], _args(tmp_path), progress=False)
    with pytest.raises(ValueError, match="not a valid|gamma|accepts"):
        compare(stories_path, train, train, ["sigmoid", "simpo:gamma=-1,nope=2"], _args(tmp_path), progress=False)
    from trl_dpo_plus import unpair_preference_dataset

    with pytest.raises(ValueError, match="compare needs preference pairs"):
        compare(stories_path, unpair_preference_dataset(train), train, ["kto", "sigmoid"], _args(tmp_path),
                progress=False)
    assert not (tmp_path / "cmp" / "sigmoid").exists()


@pytest.mark.slow
def test_compare_command_line(stories_path, tmp_path, monkeypatch, capsys):
    from trl_dpo_plus.cli import main

    make_pairs(30).to_json(tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    common = ["--model_name_or_path", "trl-dpo-plus:stories260K", "--dataset_name", "pairs.jsonl", "--max_steps", "2",
              "--per_device_train_batch_size", "8", "--report_to", "none", "--max_length", "64"]
    for argv, message in [
        ([*common, "--test_split_size", "0.2", "--loss_type", "sigmoid"], "two or more --loss_type"),
        ([*common, "--loss_type", "sigmoid", "ipo"], "--test_split_size 0.1"),
        ([*common, "--test_split_size", "0.2", "--loss_type", "sigmoid", "ipo:tau"], "key=value"),
        ([*common, "--test_split_size", "0.2", "--loss_type", "sigmoid", "ipo", "--reward_fn", "nope.py:f"], "no file"),
    ]:
        with pytest.raises(SystemExit):
            main(["compare", *argv])
        assert message in capsys.readouterr().err
    assert main(["compare", *common, "--test_split_size", "0.2", "--loss_type", "sigmoid", "simpo:beta=2.5",
                 "--reward_fn", "trl_dpo_plus.demo:lexicon_rewards", "--generation_prompts", "2",
                 "--samples_per_prompt", "2", "--max_new_tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| sigmoid |" in printed and "| simpo-beta2.5 (reference-free) |" in printed
    saved = json.loads((tmp_path / "comparison" / "comparison.json").read_text())
    assert saved["setup"]["adapters"] == "lora" and saved["setup"]["held_out_pairs"] == 6
    # the 16 train pairs 2 steps × 8 read, and the held-out ones
    assert saved["reference"]["forward_rows"] == 16 + 6 and saved["runs"][1]["hyperparameters"]["beta"] == 2.5
