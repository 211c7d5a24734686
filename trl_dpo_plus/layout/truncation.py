"""The one truncation rule: what a pair keeps of its prompt and completions under `max_length`.

The shared-prefix collator, the padded collator for `keep_completions`, the truncation counts of the prepared splits
(`trl_dpo_plus.prepared`) and the held-out pass of `compare` all read it from here, so training, the counts and the
held-out scores see the same tokens.
"""

from __future__ import annotations

import numpy as np

# TRL's two modes, and one that keeps the pair's prompt identical for both completions
TRUNCATION_MODES = ("keep_start", "keep_end", "keep_completions")


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None, mode: str):
    """The pair as `(shared, chosen_seq, chosen_start, rejected_seq, rejected_start)` after truncation.

    `chosen_seq` is the chosen branch's own tokens (its prompt tail, then the completion) and `chosen_start` the index
    in it where the completion begins; likewise for rejected. Each sequence `shared + chosen_seq` is exactly the
    sequence TRL's collator builds for the same `max_length` and `truncation_mode`:

    - `keep_start` (TRL's default): prompt+completion cut at `max_length`, keeping the start; the prompt is whole.
    - `keep_end` (deprecated in TRL): prompt+completion cut keeping the end, so the two sides can keep different
      prompt tails; such a pair is laid out with no shared part.
    - `keep_completions`: the prompt loses tokens from its start, identically for both sides, until the prompt and the
      longer completion fit in `max_length` (at least its last token stays); completions longer than the rest are
      then cut at the end. Both sides always see the same prompt.
    """
    if max_length is not None:
        if mode == "keep_start":
            chosen = chosen[: max(0, max_length - len(prompt))]
            rejected = rejected[: max(0, max_length - len(prompt))]
            prompt = prompt[:max_length]
        elif mode == "keep_end":
            prompt_c = prompt[max(0, len(prompt) + len(chosen) - max_length):]
            prompt_r = prompt[max(0, len(prompt) + len(rejected) - max_length):]
            chosen, rejected = chosen[-max_length:], rejected[-max_length:]
            if prompt_c != prompt_r or not prompt_c:
                return [], prompt_c + chosen, len(prompt_c), prompt_r + rejected, len(prompt_r)
            prompt = prompt_c
        elif mode == "keep_completions":
            longest = max(len(chosen), len(rejected))
            keep = max(max_length - longest, min(1, len(prompt)))
            prompt = prompt[len(prompt) - min(keep, len(prompt)):]
            chosen = chosen[: max_length - len(prompt)]
            rejected = rejected[: max_length - len(prompt)]
        else:
            raise ValueError(f"Unsupported truncation mode {mode!r}; expected one of {TRUNCATION_MODES}")
    if not prompt:
        return [], list(chosen), 0, list(rejected), 0
    tail = prompt[-1:]
    return list(prompt[:-1]), tail + list(chosen), 1, tail + list(rejected), 1


def truncate_sequences(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None,
                       mode: str) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """The pair's two sequences as `((prompt, chosen), (prompt, rejected))` token lists after `truncate_pair`: the
    padded view of the same rule (each side's prompt as that side keeps it)."""
    shared, chosen_seq, chosen_start, rejected_seq, rejected_start = truncate_pair(prompt, chosen, rejected,
                                                                                   max_length, mode)
    return ((shared + chosen_seq[:chosen_start], chosen_seq[chosen_start:]),
            (shared + rejected_seq[:rejected_start], rejected_seq[rejected_start:]))


def is_truncated(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, max_length: int | None) -> np.ndarray:
    """Per row, whether `truncate_pair` cuts anything, from token counts alone (`completion_lengths`: the longer
    completion of each pair): under every mode that is when the prompt and that completion exceed `max_length`."""
    if max_length is None:
        return np.zeros(len(prompt_lengths), dtype=bool)
    return np.asarray(prompt_lengths) + np.asarray(completion_lengths) > max_length
