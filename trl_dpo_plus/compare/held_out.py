"""The held-out evaluation: one pass over the held-out pairs scores every trained policy against the reference.

Per batch, the reference forward runs once and then every policy on the same batch: per-pair log-probs (each run's
rewards as its loss defines them), log-ratios per token, and the exact per-token KL(π‖π_ref) from the two full
next-token distributions at the completions' positions. The pairs are truncated by the training rule
(`trl_dpo_plus.layout.truncation`), so they are scored on the tokens training saw.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import DPOPlusConfig
from ..layout.truncation import truncate_sequences
from ..losses import PreferenceBatch, get_loss
from .runs import RunSpec

QUANTILES = (0.1, 0.5, 0.9)


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-padded `input_ids`, `attention_mask` and completion-token mask of `(prompt ids, completion ids)` pairs."""
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, c) in enumerate(sequences):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p): len(p) + len(c)] = True
    return input_ids, attention, completion


def pair_batch(rows: list[dict], pad_token_id: int, max_length: int | None, mode: str):
    """`2B` padded sequences (the B chosen, then the B rejected), truncated as training truncates them."""
    sides = [truncate_sequences(list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"]),
                                max_length, mode) for row in rows]
    return pad_sequences([chosen for chosen, _ in sides] + [rejected for _, rejected in sides], pad_token_id)


def per_sequence(values: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Per-completion-token `values` (in the order `completion_logprobs` returns them) summed per sequence."""
    mask = completion[:, 1:]
    owner = torch.arange(len(completion), device=values.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(len(completion), device=values.device, dtype=values.dtype).index_add_(0, owner, values).cpu()


def completion_logprobs(model, input_ids, attention, completion) -> torch.Tensor:
    """Log-softmax of the next-token distribution at each completion token's position: `(n_tokens, vocab)`."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return logits[completion[:, 1:]].float().log_softmax(-1)


class AdapterPolicies:
    """The trained policies as adapters of one PEFT model; the reference is that model with its adapters disabled."""

    def __init__(self, model, adapters: dict[str, str]):
        self.model, self.adapters = model, adapters  # run name -> adapter name (PEFT's names cannot hold ".")
        self.names = list(adapters)

    @contextlib.contextmanager
    def reference(self):
        with self.model.disable_adapter():
            yield self.model

    @contextlib.contextmanager
    def policy(self, name: str):
        self.model.set_adapter(self.adapters[name])
        yield self.model


class FullPolicy:
    """One fully fine-tuned policy and the base model as its reference."""

    def __init__(self, base, name: str, model):
        self.base, self.names, self.model = base, [name], model

    @classmethod
    def load(cls, base, name: str, path: str, init_kwargs: dict) -> FullPolicy:
        """The policy loaded from its folder."""
        from transformers import AutoModelForCausalLM

        return cls(base, name, AutoModelForCausalLM.from_pretrained(path, **init_kwargs).eval())

    @contextlib.contextmanager
    def reference(self):
        yield self.base

    @contextlib.contextmanager
    def policy(self, name: str):
        yield self.model


@torch.no_grad()
def evaluate_pairs(policies: AdapterPolicies | FullPolicy, rows: list[dict], pad_token_id: int, *, batch_size: int = 8,
                   max_length: int | None = None, truncation_mode: str = "keep_start", progress: bool = True):
    """One pass over prepared held-out pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`): per batch, the reference
    forward once, then every policy on the same batch.

    Returns the reference's per-pair `chosen_logps`, `rejected_logps`, `chosen_lengths`, `rejected_lengths`, and per
    policy its `chosen_logps`, `rejected_logps`, `kl` (KL(π‖π_ref) summed over the pair's completion tokens, both
    completions) and `tokens` (their count).
    """
    reference = {k: [] for k in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")}
    per_policy = {name: {k: [] for k in ("chosen_logps", "rejected_logps", "kl", "tokens")} for name in policies.names}
    for start in tqdm(range(0, len(rows), batch_size), desc="  held-out pass", leave=False, disable=not progress):
        chunk = rows[start: start + batch_size]
        with policies.reference() as model:
            device = next(model.parameters()).device
            input_ids, attention, completion = (
                t.to(device) for t in pair_batch(chunk, pad_token_id, max_length, truncation_mode))
            ref_logprobs = completion_logprobs(model.eval(), input_ids, attention, completion)
        labels = input_ids[:, 1:][completion[:, 1:]]

        def per_pair(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sums = per_sequence(values, completion)
            return sums[: len(chunk)], sums[len(chunk):]

        chosen, rejected = per_pair(ref_logprobs.gather(1, labels[:, None]).squeeze(1))
        lengths = per_pair(torch.ones_like(labels, dtype=torch.float32))
        for key, value in zip(reference, (chosen, rejected, *lengths)):
            reference[key].append(value)
        for name in policies.names:
            with policies.policy(name) as model:
                logprobs = completion_logprobs(model.eval(), input_ids, attention, completion)
            chosen, rejected = per_pair(logprobs.gather(1, labels[:, None]).squeeze(1))
            kl_chosen, kl_rejected = per_pair((logprobs.exp() * (logprobs - ref_logprobs)).sum(-1))
            for key, value in zip(per_policy[name], (chosen, rejected, kl_chosen + kl_rejected, lengths[0] + lengths[1])):
                per_policy[name][key].append(value)
    joined = lambda parts: {k: torch.cat(v) for k, v in parts.items()}  # noqa: E731
    return joined(reference), {name: joined(parts) for name, parts in per_policy.items()}


def _quantiles(values: torch.Tensor) -> list[float]:
    return [float(v) for v in torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))]


def held_out_metrics(run: RunSpec, config: DPOPlusConfig, reference: dict, policy: dict) -> dict[str, Any]:
    """The table's held-out columns for one run: its rewards as its loss defines them, and what the log-probs say."""
    spec = get_loss(run.loss)
    kwargs = config.loss_kwargs_for(run.loss)
    chosen_ratio = policy["chosen_logps"] - reference["chosen_logps"]
    rejected_ratio = policy["rejected_logps"] - reference["rejected_logps"]
    if spec.data == "unpaired":  # KTO's reward, as its training logs it: β·log-ratio
        chosen_rewards, rejected_rewards = kwargs["beta"] * chosen_ratio, kwargs["beta"] * rejected_ratio
    else:
        batch = PreferenceBatch(
            chosen_logps=policy["chosen_logps"], rejected_logps=policy["rejected_logps"],
            chosen_lengths=reference["chosen_lengths"], rejected_lengths=reference["rejected_lengths"],
            ref_chosen_logps=reference["chosen_logps"] if spec.requires_reference else None,
            ref_rejected_logps=reference["rejected_logps"] if spec.requires_reference else None,
        )
        out = spec(batch, **kwargs)
        chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    margin = (chosen_rewards - rejected_rewards).double()
    gap = (reference["chosen_lengths"] - reference["rejected_lengths"]).double()
    r2 = None
    if len(margin) > 2 and margin.std() > 0 and gap.std() > 0:
        r2 = float(torch.corrcoef(torch.stack([margin, gap]))[0, 1] ** 2)
    metrics = {
        "pairs": len(margin),
        "reward_accuracy": float((margin > 0).double().mean()),
        "margin_mean": float(margin.mean()),
        "margin_quantiles": _quantiles(margin),
        "chosen_logratio_per_token": None,
        "rejected_logratio_per_token": None,
        "length_r2": r2,
        "kl_per_token": float(policy["kl"].sum() / policy["tokens"].sum().clamp(min=1)),
    }
    if spec.requires_reference:  # a reference-free loss's reward is not a log-ratio: nothing to show there
        metrics["chosen_logratio_per_token"] = float((chosen_ratio / reference["chosen_lengths"].clamp(min=1)).mean())
        metrics["rejected_logratio_per_token"] = float(
            (rejected_ratio / reference["rejected_lengths"].clamp(min=1)).mean())
    return metrics
