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


def test_unpaired_rows_are_labelled_by_the_rule_alone():
    samples = [["happy happy", "sad", "plain"], ["the end", "happy", "cried"]]
    rows = demo.build_unpaired(["p1", "p2"], samples, rows=10, seed=0).to_list()
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in rows) == [
        ("p1", "happy happy", True), ("p1", "sad", False), ("p2", "cried", False), ("p2", "happy", True)]  # 0: no thumb
    assert demo.balance_weights([True, False, False, False]) == {"desirable_weight": 3.0, "undesirable_weight": 1.0}
    assert demo.balance_weights([True, True, False]) == {"desirable_weight": 1.0, "undesirable_weight": 2.0}


def test_win_rate_counts_ties_as_half():
    wr, ties = demo.win_rate([["happy", "plain", "sad"]], [["plain", "plain", "happy"]])
    assert wr == pytest.approx((1 + 0.5 + 0) / 3) and ties == pytest.approx(1 / 3)


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
    results = demo.main(["--losses", "sigmoid", "simpo", "kto", "--train_prompts", "16", "--eval_prompts", "4",
                         "--samples_per_prompt", "6", "--epochs", "1", "--output_dir", str(tmp_path)])
    assert [r.loss for r in results] == ["sigmoid", "simpo", "kto"]
    for r in results:
        assert 0 <= r.win_rate <= 1 and r.seconds > 0 and r.kl == r.kl
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[0]["loss"] == "sigmoid" and (tmp_path / "demo.png").stat().st_size > 10_000
    card = ModelCard.load(tmp_path / "simpo" / "README.md")
    assert card.data.to_dict()["library_name"] == "peft" and (tmp_path / "simpo" / "adapter_model.safetensors").exists()
    assert (tmp_path / "sigmoid" / "diagnostics.png").exists()
    unpaired = [json.loads(line) for line in (tmp_path / "unpaired.jsonl").read_text().splitlines()]
    assert unpaired and {"prompt", "completion", "label"} == set(unpaired[0])
    assert ModelCard.load(tmp_path / "kto" / "README.md").data.to_dict()["trl_dpo_plus"]["data"] == "unpaired"
