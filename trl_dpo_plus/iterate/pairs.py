"""A round's training rows from its scored samples: best-vs-worst pairs for paired losses, labelled completions for
unpaired ones. Ties (no score difference to learn from) are dropped and counted."""

from __future__ import annotations

from datasets import Dataset


def _completion(prompt, text: str):
    """A sampled completion as the data kind wants it: text, or an assistant turn after a conversational prompt."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def best_vs_worst(prompts: list, samples: list[list[str]], scores: list[list[float]],
                  pairs_per_prompt: int = 1) -> tuple[Dataset, int]:
    """Per prompt, the best-scored sample against the worst, then the second best against the second worst, ...;
    a pair whose two scores tie is dropped. Returns the pairs (with both scores) and the ties dropped."""
    rows, ties = [], 0
    for prompt, texts, values in zip(prompts, samples, scores):
        order = sorted(range(len(texts)), key=lambda i: values[i], reverse=True)
        for k in range(min(pairs_per_prompt, len(order) // 2)):
            best, worst = order[k], order[-1 - k]
            if values[best] == values[worst]:
                ties += 1
                continue
            rows.append({"prompt": prompt, "chosen": _completion(prompt, texts[best]),
                         "rejected": _completion(prompt, texts[worst]),
                         "chosen_score": values[best], "rejected_score": values[worst]})
    return _dataset(rows, ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")), ties


def labelled(prompts: list, samples: list[list[str]], scores: list[list[float]],
             threshold: float | None = None) -> tuple[Dataset, int]:
    """Each sample desirable when its score is above `threshold` (default: its prompt's mean score), undesirable when
    below; a sample exactly at the line is dropped as a tie. Returns the rows and the ties dropped."""
    rows, ties = [], 0
    for prompt, texts, values in zip(prompts, samples, scores):
        line = sum(values) / len(values) if threshold is None else threshold
        for text, value in zip(texts, values):
            if value == line:
                ties += 1
                continue
            rows.append({"prompt": prompt, "completion": _completion(prompt, text), "label": value > line,
                         "score": value})
    return _dataset(rows, ("prompt", "completion", "label", "score")), ties


def _dataset(rows: list[dict], columns: tuple[str, ...]) -> Dataset:
    return Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in columns})
