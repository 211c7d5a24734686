"""Samples on held-out prompts, scored by the user's `reward_fn`: win-rate against the base, mean reward, fluency
(the base's per-token log-likelihood of the samples) and a Monte-Carlo sample KL."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import _text
from .held_out import completion_logprobs, pad_sequences, per_sequence

RewardFn = Callable[..., list[float]]


def prompt_text(prompt, tokenizer) -> str:
    """A plain-text prompt as it is; a conversational one through the chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int, batch: int = 64, *,
           temperature: float = 1.0, top_p: float = 1.0, progress: str | None = None):
    """`n` completions per prompt, batched and left-padded; ancestral sampling at temperature 1 and top-p 1 unless
    told otherwise (a KL estimate from samples is unbiased only then). `progress`: a bar's label, or no bar."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    flat = [p for p in prompts for _ in range(n)]
    completions = []
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(flat), batch), desc=progress, leave=False, disable=progress is None, unit="batch"):
            enc = tokenizer(flat[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=True).to(device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            completions += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [completions[i * n: (i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list[str], completions: list[str],
                     batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each completion given its prompt, and its token count."""
    sums, counts = [], []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch):
        sequences = []
        for p, c in zip(prompts[i: i + batch], completions[i: i + batch]):
            prompt_ids = tokenizer(p)["input_ids"]
            sequences.append((prompt_ids, tokenizer(p + c)["input_ids"][len(prompt_ids):]))
        input_ids, attention, completion = (t.to(device) for t in pad_sequences(sequences, tokenizer.pad_token_id))
        logprobs = completion_logprobs(model, input_ids, attention, completion)
        labels = input_ids[:, 1:][completion[:, 1:]]
        sums.append(per_sequence(logprobs.gather(1, labels[:, None]).squeeze(1), completion))
        counts.append(completion[:, 1:].sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


def load_reward_fn(spec: str) -> RewardFn:
    """`module:function` (or `path/to/file.py:function`) → the callable; errors name what is missing."""
    import importlib
    import importlib.util

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward_fn {spec!r}: write it as module:function, e.g. my_rewards:score")
    if module_name.endswith(".py"):
        if not os.path.exists(module_name):
            raise FileNotFoundError(f"--reward_fn {spec!r}: no file {module_name!r}")
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"--reward_fn {spec!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


class RewardFnError(ValueError):
    """The user's `reward_fn` raised, or returned something other than one finite number per completion."""


def score(reward_fn: RewardFn, prompts: list, samples: list[list[str]]) -> list[list[float]]:
    """`reward_fn`'s scores of `samples` (one list per prompt); a raising or malformed scorer is a `RewardFnError`."""
    flat_prompts = [p for p, cs in zip(prompts, samples) for _ in cs]
    flat = [c for cs in samples for c in cs]
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    try:
        scores = list(reward_fn(prompts=flat_prompts, completions=flat))
    except Exception as err:
        raise RewardFnError(f"reward_fn {name} raised {type(err).__name__}: {str(err)[:200]} (called as "
                            f"{name}(prompts=[...], completions=[...]) on {len(flat)} completions)") from err
    if len(scores) != len(flat) or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise RewardFnError(f"reward_fn {name} must return one finite number per completion ({len(flat)}); it "
                            f"returned {len(scores)} values, e.g. {scores[:3]!r}")
    it = iter(scores)
    return [[float(next(it)) for _ in cs] for cs in samples]


def check_reward_fn(reward_fn: RewardFn, eval_dataset, tokenizer=None, n: int = 2) -> None:
    """Score the first `n` held-out pairs' own chosen and rejected completions before any run trains, so a scorer
    that raises or returns the wrong number of scores stops the sweep at once, not after every run trained."""
    rows = eval_dataset.select(range(min(n, len(eval_dataset))))
    prompts = [p if tokenizer is None else prompt_text(p, tokenizer) for p in rows["prompt"]]
    completions = [[_text(c), _text(r)] for c, r in zip(rows["chosen"], rows["rejected"])]
    try:
        score(reward_fn, prompts, completions)
    except RewardFnError as err:
        raise RewardFnError(f"{err}. Checked on {2 * len(rows)} held-out completions before any run trained; "
                            "fix the function and run again.") from err.__cause__


def win_rate(after: list[list[float]], before: list[list[float]]) -> tuple[float, float]:
    """Share of (prompt, sample) slots where the trained model's reward beats the base's (ties count ½), and ties."""
    pairs = [(a, b) for a_list, b_list in zip(after, before) for a, b in zip(a_list, b_list)]
    wins = sum(a > b for a, b in pairs)
    ties = sum(a == b for a, b in pairs)
    return (wins + 0.5 * ties) / len(pairs), ties / len(pairs)


def scored_samples(policies, name: str | None, prompts: list, texts: list[str], tokenizer, reward_fn: RewardFn,
                   samples_per_prompt: int, max_new_tokens: int, seed: int, progress: str | None = None) -> dict:
    """Samples from policy `name` (the base when `None`) on `texts` (the prompts as the model reads them), scored by
    `reward_fn`: `samples`, `scores`, `mean_reward`, `fluency` (the base's per-token log-likelihood of the samples),
    `example` (the base's first sample, a policy's best on the first prompt) and, for a policy, `sample_kl`."""
    with (policies.reference() if name is None else policies.policy(name)) as model:
        samples = sample(model, tokenizer, texts, samples_per_prompt, max_new_tokens, seed, progress=progress)
        if name is not None:
            flat_prompts = [p for p, cs in zip(texts, samples) for _ in cs]
            policy_logps, _ = completion_logps(model, tokenizer, flat_prompts, [c for cs in samples for c in cs])
    scores = score(reward_fn, prompts, samples)
    fluency, base_logps = _fluency(policies, tokenizer, texts, samples)
    best = 0 if name is None else max(range(len(samples[0])), key=lambda i: scores[0][i])
    result = {"samples": samples, "scores": scores, "mean_reward": _mean(scores), "fluency": fluency,
              "example": samples[0][best]}
    if name is not None:
        result["sample_kl"] = float((policy_logps - base_logps).mean())
    return result


def generation(policies, by_name, eval_dataset, tokenizer, reward_fn, generation_prompts, samples_per_prompt,
               max_new_tokens, seed, progress, base: dict) -> dict[str, Any]:
    """Samples on held-out prompts from the base (once) and from each policy, scored by `reward_fn`; fills each run's
    `generation` and returns the base's."""
    if isinstance(generation_prompts, int):
        prompts = list(dict.fromkeys(eval_dataset["prompt"]))[:generation_prompts]  # the first n distinct prompts
    else:
        prompts = list(generation_prompts)
    texts = [prompt_text(p, tokenizer) for p in prompts]
    settings = (tokenizer, reward_fn, samples_per_prompt, max_new_tokens, seed + 2)
    if not base:
        base = {"prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
                **scored_samples(policies, None, prompts, texts, *settings)}
    for name in tqdm(policies.names, desc="  sampling", leave=False, disable=not progress):
        after = scored_samples(policies, name, prompts, texts, *settings)
        wins, ties = win_rate(after["scores"], base["scores"])
        by_name[name][0].generation = {
            "mean_reward": after["mean_reward"], "win_rate": wins, "ties": ties, "fluency": after["fluency"],
            "sample_kl": after["sample_kl"], "example": after["example"]}
    return base


def _fluency(policies, tokenizer, texts, samples) -> tuple[float, torch.Tensor]:
    """The base model's per-token log-likelihood of the samples, and its summed log-prob of each."""
    flat_prompts = [p for p, cs in zip(texts, samples) for _ in cs]
    with policies.reference() as model:
        logps, counts = completion_logps(model, tokenizer, flat_prompts, [c for cs in samples for c in cs])
    return float(logps.sum() / counts.sum().clamp(min=1)), logps


def _mean(scores: list[list[float]]) -> float:
    flat = [s for row in scores for s in row]
    return sum(flat) / len(flat)
