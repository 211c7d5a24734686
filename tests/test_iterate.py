"""`iterate`: on-policy rounds. Round r's rows come from round r − 1's policy, the reference is the one asked for, a
failing round keeps what finished, and `resume` goes on from there."""

import json

import pytest
import torch

from trl_dpo_plus import DPOConfig
from trl_dpo_plus.assets import default_model_path
from trl_dpo_plus.cli import main
from trl_dpo_plus.compare import sample
from trl_dpo_plus.demo import lexicon_rewards, story_prompts
from trl_dpo_plus.iterate import RewardModelScorer, best_vs_worst, iterate, labelled

TRAIN, HELD_OUT = story_prompts(False, 12, 0), story_prompts(True, 3, 1)


def _args(out, **overrides):
    values = dict(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=False, seed=0,
                  max_length=96, use_cpu=True)
    values.update(overrides)
    return DPOConfig(**values)


def _tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _iterate(out, reward_fn=lexicon_rewards, train_prompts=TRAIN, **kwargs):
    settings = dict(reward_fn=reward_fn, rounds=2, samples_per_prompt=4, max_new_tokens=24,
                    processing_class=_tokenizer(), progress=False)
    settings.update(kwargs)
    return iterate(default_model_path(), train_prompts, HELD_OUT, _args(out), **settings)


def _rows(folder):
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]


# -- rows from scored samples -------------------------------------------------------------------------------------
def test_best_vs_worst_pairs_the_ends_and_counts_ties():
    pairs, ties = best_vs_worst(["p", "q"], [["a", "b", "c", "d"], ["x", "y"]], [[1, 3, 2, 0], [5, 5]],
                                pairs_per_prompt=2)
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("b", "d"), ("c", "a")]
    assert ties == 1  # q's only pair tied
    conversational, _ = best_vs_worst([[{"role": "user", "content": "hi"}]], [["a", "b"]], [[0, 1]])
    assert conversational[0]["chosen"] == [{"role": "assistant", "content": "b"}]


def test_labelled_splits_at_the_prompt_mean_or_a_threshold():
    rows, ties = labelled(["p"], [["a", "b", "c"]], [[0.0, 1.0, 2.0]])
    assert [(r["completion"], r["label"]) for r in rows] == [("a", False), ("c", True)] and ties == 1
    rows, ties = labelled(["p"], [["a", "b", "c"]], [[0.0, 1.0, 2.0]], threshold=0.5)
    assert [r["label"] for r in rows] == [False, True, True] and ties == 0


def test_reward_model_scores_in_batches_as_one_by_one(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, completions = ["Tom had a ball.", "Sue"], [" He was happy and played all day long.", " cried."]
    batched = RewardModelScorer(str(tmp_path / "rm"), batch_size=4)(prompts=prompts, completions=completions)
    alone = RewardModelScorer(str(tmp_path / "rm"), batch_size=1)(prompts=prompts, completions=completions)
    assert len(batched) == 2 and batched[0] != batched[1]
    assert batched == pytest.approx(alone, abs=1e-5)  # padding does not change a score
    with pytest.raises(FileNotFoundError, match="no such folder"):
        RewardModelScorer(str(tmp_path / "missing"))


@pytest.mark.parametrize("kwargs, message", [
    ({"reward_fn": None}, "exactly one scorer"),
    ({"reward_model": "rm"}, "exactly one scorer"),
    ({"reference": "prev"}, "'base'"),
    ({"samples_per_prompt": 2, "pairs_per_prompt": 2}, "samples_per_prompt ≥ 4"),
    ({"rounds": 0}, "rounds=0"),
    ({"top_p": 0}, "top_p"),
    ({"reward_fn": lambda prompts, completions: [1.0]}, "one finite number per completion"),
    ({"train_prompts": [[{"role": "user", "content": "Tell a story."}]]}, "no chat template"),
])
def test_bad_settings_fail_before_anything_samples(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _iterate(tmp_path / "it", **kwargs)
    assert not (tmp_path / "it" / "round-1").exists()


# -- real rounds on the embedded model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """The same two rounds with the reference fixed to the base and updated to the previous policy."""
    root = tmp_path_factory.mktemp("iterate")
    return {mode: (_iterate(root / mode, reference=mode), root / mode) for mode in ("base", "previous")}


@pytest.mark.slow
def test_round_two_trains_on_samples_of_round_ones_policy(two_rounds):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report, out = two_rounds["base"]
    assert [row["status"] for row in report.rounds] == ["ok"] * 3
    tokenizer = _tokenizer()
    sampled = [json.loads(line) for line in (out / "round-2" / "samples.jsonl").read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_path()),
                                       out / "round-1").eval()
    again = sample(policy, tokenizer, TRAIN, 4, 24, seed=2)  # round 2 samples with seed + 2
    from_base = sample(base, tokenizer, TRAIN, 4, 24, seed=2)
    assert [row["samples"] for row in sampled] == again  # round 1's policy drew them
    assert again != from_base  # and the base would have drawn others
    round_1, round_2 = _rows(out / "round-1"), _rows(out / "round-2")
    assert {(r["chosen"], r["rejected"]) for r in round_1} != {(r["chosen"], r["rejected"]) for r in round_2}
    for r in round_2:  # best vs worst of round 2's own samples
        row = next(s for s in sampled if s["prompt"] == r["prompt"])
        assert r["chosen"] in row["samples"] and r["rejected"] in row["samples"]
        assert r["chosen_score"] == max(row["scores"]) > r["rejected_score"] == min(row["scores"])
    assert report.rounds[2]["pairs"] == len(round_2) and report.rounds[2]["pairs"] + report.rounds[2]["ties"] == 12
    held_out = report.rounds
    assert held_out[1]["samples"] != held_out[0]["samples"] and held_out[1]["sample_kl"] > 0
    assert 0 <= held_out[2]["win_rate_vs_base"] <= 1 and "win_rate_vs_previous" in held_out[2]
    assert {"iterate.md", "iterate.json", "iterate.png"} <= {p.name for p in out.iterdir()}


def _reference_of_base(rows, out):
    """The base model's reference log-probs of `rows`, from a fresh trainer (no cache)."""
    from datasets import Dataset

    from trl_dpo_plus import DPOTrainer

    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(default_model_path(), args=_args(out, lora=True, precompute_ref_log_probs=True),
                         train_dataset=data, processing_class=_tokenizer())
    return torch.tensor(trainer.train_dataset["ref_chosen_logps"])


@pytest.mark.slow
def test_the_fixed_reference_stays_the_base_and_the_updated_one_moves(two_rounds, tmp_path):
    fixed, updated = _rows(two_rounds["base"][1] / "round-2"), _rows(two_rounds["previous"][1] / "round-2")
    assert [r["chosen"] for r in fixed] == [r["chosen"] for r in updated]  # round 1 is the same in both modes
    base = _reference_of_base(fixed, tmp_path / "fresh")
    assert torch.allclose(torch.tensor([r["ref_chosen_logps"] for r in fixed]), base, atol=1e-4)
    moved = torch.tensor([r["ref_chosen_logps"] for r in updated]) - base
    assert moved.abs().max() > 1e-2  # the previous round's policy
    for mode, words in (("base", "fixed: the round-0 base"), ("previous", "updated: the previous round")):
        folder = two_rounds[mode][1] / "round-2"
        card = (folder / "README.md").read_text()
        assert words in card and "round 2 of 2" in card
        assert not (folder / "ref").exists()  # TRL's frozen reference copy is not saved


@pytest.mark.slow
def test_a_failing_round_keeps_the_finished_ones_and_resume_goes_on(tmp_path):
    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(len(completions))
        if len(calls) == 5:  # the check, round 0's held-out, round 1's samples and held-out, then round 2's samples
            raise RuntimeError("scorer service down")
        return lexicon_rewards(prompts, completions)

    out = tmp_path / "it"
    report = _iterate(out, reward_fn=flaky)
    assert [row["status"] for row in report.rounds] == ["ok", "ok", "failed"]
    assert "scorer service down" in report.rounds[2]["error"]
    assert (out / "round-1" / "adapter_model.safetensors").exists() and (out / "round-2" / "error.txt").exists()
    assert "failed: RewardFnError" in (out / "iterate.md").read_text()
    saved = json.loads((out / "iterate.json").read_text())
    assert [row["status"] for row in saved["rounds"]] == ["ok", "ok", "failed"]
    first = (out / "round-1" / "adapter_model.safetensors").stat().st_mtime_ns

    resumed = _iterate(out, resume=True)
    assert [(row["round"], row["status"]) for row in resumed.rounds] == [(0, "ok"), (1, "ok"), (2, "ok")]
    assert (out / "round-1" / "adapter_model.safetensors").stat().st_mtime_ns == first  # not trained again
    assert (out / "round-2" / "adapter_model.safetensors").exists() and not (out / "round-2" / "error.txt").exists()
    assert resumed.rounds[1]["samples"] == report.rounds[1]["samples"]  # round 2's win-rate vs round 1 reads these
    with pytest.raises(ValueError, match="other settings"):
        _iterate(out, resume=True, reference="previous")


@pytest.mark.slow
def test_an_unpaired_loss_trains_on_labelled_samples(tmp_path):
    out = tmp_path / "kto"
    report = iterate(default_model_path(), TRAIN, HELD_OUT, _args(out, loss_type="kto", per_device_train_batch_size=16),
                     reward_fn=lexicon_rewards, rounds=1, samples_per_prompt=4, max_new_tokens=24,
                     processing_class=_tokenizer(), progress=False)
    assert report.rounds[1]["status"] == "ok", report.rounds[1].get("error")
    rows = _rows(out / "round-1")
    assert {"completion", "label", "score"} <= set(rows[0]) and {r["label"] for r in rows} == {True, False}
    assert report.rounds[1]["pairs"] + report.rounds[1]["ties"] == 12 * 4


@pytest.mark.slow
def test_full_fine_tuning_rounds_save_whole_models(tmp_path):
    report = _iterate(tmp_path / "full", full_finetune=True, rounds=2)
    assert [row["status"] for row in report.rounds] == ["ok"] * 3
    assert (tmp_path / "full" / "round-2" / "model.safetensors").exists()


# -- the command --------------------------------------------------------------------------------------------------
def _prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TRAIN))
    return str(path)


@pytest.mark.parametrize("args, message", [
    ([], "needs one scorer"),
    (["--reward_fn", "nope:f"], "cannot import 'nope'"),
    (["--reward_fn", "trl_dpo_plus.demo:lexicon_rewards", "--eval_prompts", "40"], "leave none to train on"),
    (["--reward_fn", "trl_dpo_plus.demo:lexicon_rewards", "--reference", "prev"], "invalid choice: 'prev'"),
])
def test_command_errors_are_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["iterate", "--model_name_or_path", "trl-dpo-plus:stories260K", "--dataset_name",
              _prompts_file(tmp_path), "--output_dir", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "usage:" not in err


@pytest.mark.slow
def test_command_runs_rounds_and_prints_the_table(tmp_path, capsys):
    code = main(["iterate", "--model_name_or_path", "trl-dpo-plus:stories260K", "--dataset_name",
                 _prompts_file(tmp_path), "--reward_fn", "trl_dpo_plus.demo:lexicon_rewards", "--rounds", "1",
                 "--eval_prompts", "2", "--max_new_tokens", "16", "--output_dir", str(tmp_path / "out"),
                 "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "4", "--save_strategy", "no"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| round | rows |" in out and "iterate.md" in out
    saved = json.loads((tmp_path / "out" / "iterate.json").read_text())
    assert saved["setup"]["adapters"] == "lora" and saved["setup"]["eval_prompts"] == 2


@pytest.mark.slow
def test_conversational_prompts_train_on_assistant_turns(tmp_path):
    tokenizer = _tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                               "{{ eos_token }}{% endif %}{% endfor %}")
    seen = []

    def rewards(prompts, completions, **kwargs):
        seen.append(prompts[0])
        return lexicon_rewards(prompts, completions)

    conversation = lambda prompts: [[{"role": "user", "content": p}] for p in prompts]  # noqa: E731
    report = iterate(default_model_path(), conversation(TRAIN), conversation(HELD_OUT), _args(tmp_path / "chat"),
                     reward_fn=rewards, rounds=1, samples_per_prompt=4, max_new_tokens=16, processing_class=tokenizer,
                     progress=False)
    assert report.rounds[1]["status"] == "ok", report.rounds[1].get("error")
    assert all(isinstance(prompt, list) for prompt in seen)  # the scorer sees the conversation, as in TRL
    row = _rows(tmp_path / "chat" / "round-1")[0]
    assert row["chosen"][0]["role"] == "assistant" and "ref_chosen_logps" in row
