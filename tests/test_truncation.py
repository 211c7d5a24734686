"""One truncation rule (`trl_dpo_plus.layout.truncation`): training's collators, the prepared-split counts and the
held-out pass of `compare` keep the same tokens of every pair."""

import numpy as np
import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from trl_dpo_plus.compare import pair_batch
from trl_dpo_plus.layout import (
    TRUNCATION_MODES,
    PaddedPairCollator,
    SharedPrefixCollator,
    is_truncated,
    truncate_pair,
    unpack_to_padded,
)

# The case: prompt 10 tokens, chosen 4, rejected 8, max_length 12; then pairs that fit, an empty prompt, a
# completion longer than max_length, and different lengths, so that every mode cuts something somewhere
ROWS = [
    {"prompt_ids": list(range(10)), "chosen_ids": [20, 21, 22, 23], "rejected_ids": list(range(30, 38))},
    {"prompt_ids": [1, 2], "chosen_ids": [40], "rejected_ids": [41, 42]},
    {"prompt_ids": [], "chosen_ids": list(range(50, 65)), "rejected_ids": [66]},
    {"prompt_ids": list(range(70, 79)), "chosen_ids": list(range(80, 86)), "rejected_ids": [90, 91]},
]
MAX_LENGTH = 12


def training_batches(mode):
    """The padded `[chosen; rejected]` batches each training layout trains on, as `(input_ids, completion_mask)`."""
    packed = unpack_to_padded(SharedPrefixCollator(pad_token_id=0, max_length=MAX_LENGTH, truncation_mode=mode)(ROWS), 0)
    if mode == "keep_completions":
        padded = PaddedPairCollator(pad_token_id=0, max_length=MAX_LENGTH)(ROWS)
    else:
        padded = DataCollatorForPreference(pad_token_id=0, max_length=MAX_LENGTH, truncation_mode=mode)(ROWS)
    return {"shared_prefix": packed, "padded": padded}


def trimmed(input_ids, attention, completion):
    width = int(attention.sum(dim=1).max())
    return input_ids[:, :width] * attention[:, :width], completion[:, :width].long()


@pytest.mark.parametrize("mode", TRUNCATION_MODES)
def test_held_out_pairs_are_truncated_as_training_truncates_them(mode):
    held_out = trimmed(*pair_batch(ROWS, 0, MAX_LENGTH, mode))
    for layout, batch in training_batches(mode).items():
        trained = trimmed(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        assert torch.equal(held_out[0], trained[0]), (mode, layout)
        assert torch.equal(held_out[1], trained[1]), (mode, layout)


def test_keep_completions_keeps_one_prompt_tail_for_both_sides_in_the_held_out_pass():
    """Prompt 10, chosen 4, rejected 8, max_length 12: both sides keep prompt tokens 6-9 (the longer completion
    decides), in training and held-out alike; before the one rule, the held-out chosen kept tokens 2-9."""
    input_ids, _, completion = pair_batch(ROWS[:1], 0, MAX_LENGTH, "keep_completions")
    chosen, rejected = input_ids.tolist()
    assert chosen[:4] == [6, 7, 8, 9] and chosen[4:8] == [20, 21, 22, 23]
    assert rejected[:4] == [6, 7, 8, 9] and rejected[4:] == list(range(30, 38))
    assert completion[0].tolist() == [False] * 4 + [True] * 4 + [False] * 4


@pytest.mark.parametrize("mode", TRUNCATION_MODES)
def test_the_counts_call_truncated_exactly_the_pairs_the_rule_cuts(mode):
    cut = []
    for row in ROWS:
        shared, chosen, _, rejected, _ = truncate_pair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"],
                                                       MAX_LENGTH, mode)
        whole = truncate_pair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], None, mode)
        cut.append((shared, chosen, rejected) != (whole[0], whole[1], whole[3]))
    prompt = np.array([len(r["prompt_ids"]) for r in ROWS])
    longest = np.array([max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in ROWS])
    assert is_truncated(prompt, longest, MAX_LENGTH).tolist() == cut == [True, False, True, True]
    assert not is_truncated(prompt, longest, None).any()
