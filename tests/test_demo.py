"""The demo's pieces (rule, pairs, win-rate, KL) checked exactly, and a small end-to-end run writing every artefact."""

import json

import pytest
from huggingface_hub import ModelCard

from trl_dpo_plus import demo


def test_lexicon_rule():
    assert demo.lexicon_reward("Lily smiled and hugged her friend. She was happy!") == 4
    assert demo.lexicon_reward("Tom was sad and cried, then he laughed.") == -1
    assert demo.lexicon_reward("The ball was red.") == 0


def test_pairs_are_best_vs_worst_and_skip_ties():
    samples = [["happy happy", "sad", "plain", "happy"], ["plain", "the end"]]
    pairs = demo.build_pairs(["p1", "p2"], samples, pairs_per_prompt=2).to_list()
    assert pairs == [{"prompt": "p1", "chosen": "happy happy", "rejected": "sad"},
                     {"prompt": "p1", "chosen": "happy", "rejected": "plain"}]  # p2 ties everywhere: no pair


def test_the_rule_as_a_reward_function():
    assert demo.lexicon_rewards(prompts=["p", "q"], completions=["happy and sad and happy", "plain"]) == [1, 0]


def test_held_out_prompts_share_no_names_or_things_with_training():
    def keywords(prompts):
        words = {w for p in prompts for w in p.replace(".", " ").replace(",", " ").split()}
        return words & (set(demo.NAMES) | set(demo.THINGS))

    train = keywords(demo.story_prompts(held_out=False, n=40, seed=0))
    held_out = keywords(demo.story_prompts(held_out=True, n=10, seed=1))
    assert held_out and train and not held_out & train
    assert held_out & set(demo.NAMES) and held_out & set(demo.THINGS)


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    result = demo.main(["--losses", "sigmoid", "simpo", "kto", "--train_prompts", "16", "--eval_prompts", "4",
                        "--samples_per_prompt", "6", "--epochs", "1", "--rounds", "2", "--output_dir", str(tmp_path)])
    assert [r.name for r in result.runs] == ["sigmoid", "simpo", "kto"] and all(r.status == "ok" for r in result.runs)
    for r in result.runs:
        assert 0 <= r.generation["win_rate"] <= 1 and r.seconds > 0 and r.held_out["kl_per_token"] >= 0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["runs"][0]["name"] == "sigmoid" and (tmp_path / "comparison.png").stat().st_size > 10_000
    assert "| kto |" in (tmp_path / "comparison.md").read_text()
    card = ModelCard.load(tmp_path / "simpo" / "README.md")
    assert card.data.to_dict()["library_name"] == "peft" and (tmp_path / "simpo" / "adapter_model.safetensors").exists()
    assert (tmp_path / "sigmoid" / "diagnostics.png").exists() and (tmp_path / "held_out_pairs.jsonl").exists()
    assert ModelCard.load(tmp_path / "kto" / "README.md").data.to_dict()["trl_dpo_plus"]["data"] == "unpaired"
    rounds = json.loads((tmp_path / "iterate" / "iterate.json").read_text())["rounds"]  # the on-policy row
    assert [(r["round"], r["status"]) for r in rounds] == [(0, "ok"), (1, "ok"), (2, "ok")]
    assert (tmp_path / "iterate" / "round-2" / "adapter_model.safetensors").exists()
