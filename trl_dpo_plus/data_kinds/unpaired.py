"""Unpaired thumbs-up/down rows (prompt, completion, label), as TRL's `KTOTrainer` trains them.

TRL's KTO preparation (run by the trainer on itself) tokenizes each row and, when a loss has a KL term, adds
`KL_completion_ids`: the completion of the row's neighbour within a block of `per_device_train_batch_size` rows. The
rows then ride the pair layouts (`UnpairedCollator`): the completion takes the chosen branch and the KL completion the
rejected one, so one forward gives both and the prompt is computed once. The losses' math is in `losses/kto.py` and
`losses/apo.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset

from ..layout import PolicyForward
from ..losses import UnpairedBatch
from ..losses._common import per_token
from ..metrics import METRIC_PREFIX, token_metrics
from ..prepared import without_filter
from .base import DataKind, global_means

LABELS = ("desirable", "undesirable")

logger = logging.getLogger(__name__)


@dataclass
class UnpairedCollator:
    """Unpaired rows (`prompt_ids`, `completion_ids`, optional `KL_completion_ids`, `label`) collated by a pair
    collator: the completion is the chosen branch and the KL completion the rejected one (empty when the loss has no KL
    term), so `PolicyForward` rows are `[completion_1..B; KL_completion_1..B]`. Adds `label`, a `(B,)` bool tensor.
    """

    pair_collator: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [{**e, "chosen_ids": e["completion_ids"], "rejected_ids": e.get("KL_completion_ids", [])}
                 for e in examples]
        batch = self.pair_collator(pairs)
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        return batch


class UnpairedKind(DataKind):
    """KTO rows. `calculate_KL`, `desirable_weight` and `undesirable_weight` are what TRL's KTO preparation reads (its
    KL completions, and its warning when λD·nD / λU·nU is off)."""

    name = "unpaired"
    unit = "rows"
    sides = LABELS
    extra_columns = ("completion_ids", "KL_completion_ids", "label")

    def __init__(self, calculate_KL: bool = True, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.calculate_KL, self.desirable_weight, self.undesirable_weight = calculate_KL, desirable_weight, undesirable_weight
        columns = ("prompt_ids", "completion_ids", "KL_completion_ids")
        self.token_columns = columns if calculate_KL else columns[:2]

    def wrap_collator(self, collator):
        return UnpairedCollator(collator)

    def preparation_args(self, args):
        # TRL's KTO preparation drops rows whose prompt fills max_length under any mode; the other modes keep them
        return args if args.truncation_mode == "keep_start" else without_filter(args)

    def longest_completion(self, lengths):
        return lengths[1]  # the completion itself decides, not the KL completion

    def label_counts(self, dataset) -> dict[str, int] | None:
        if not isinstance(dataset, Dataset):  # streamed rows are not known up front
            return None
        labels = dataset.with_format("arrow")["label"]
        desirable = int(pc.sum(labels.cast("int64")).as_py() or 0)
        counts = {"desirable": desirable, "undesirable": len(labels) - desirable}
        empty = [side for side, n in counts.items() if n == 0]
        if len(labels) and empty:
            logger.warning("Every train row is labelled %s: the %s side of the loss is empty, so KTO learns only "
                           "to push the %s completions one way. Check the label column (True = desirable).",
                           "desirable" if empty == ["undesirable"] else "undesirable", empty[0],
                           "desirable" if empty == ["undesirable"] else "undesirable")
        return counts

    def build_batch(self, forward: PolicyForward, reference, inputs, accelerator) -> UnpairedBatch:
        """B completions; the layout's second branch holds each row's KL completion."""
        logps, kl_logps = forward.logps.chunk(2, dim=0)
        ref_logps = kl = None
        if reference is not None:
            ref_logps, ref_kl_logps = reference
            if self.calculate_KL:  # z0: the mismatched pairs' mean log-ratio over every process's rows
                (kl,) = global_means([kl_logps - ref_kl_logps], accelerator.reduce)
        return UnpairedBatch(logps=logps, lengths=forward.lengths.chunk(2, dim=0)[0], labels=inputs["label"].bool(),
                             ref_logps=ref_logps, kl=kl)

    def metrics(self, forward: PolicyForward, batch: UnpairedBatch, outputs, inputs, accelerator):
        """TRL's KTO metrics (`rewards/chosen` is the desirable completions' mean reward, `rewards/rejected` the
        undesirable ones', `kl` the baseline z0), plus per-label statistics under `dpo_plus/`. `rewards/accuracies` is
        the share of completions whose reward has their label's sign (above the reference when desirable, below when
        undesirable); the diagnostics read that signed reward as the per-row margin, and a label's statistics as the
        `chosen_*` / `rejected_*` of pairs."""
        gather = accelerator.gather
        labels, padding = batch.labels, torch.zeros_like(batch.labels)
        # The completion rows' tokens, as TRL's KTO counts them (the KL completions are not counted)
        if "unpack_index" in inputs:
            local_tokens = (inputs["unpack_index"][: labels.numel()] >= 0).sum()
        else:
            local_tokens = inputs["attention_mask"][: labels.numel()].sum()
        num_tokens = gather(local_tokens.reshape(1)).sum().item()
        metrics = token_metrics(forward, torch.cat([labels, padding]), torch.cat([~labels, padding]), num_tokens,
                                accelerator.gather_for_metrics, always_logits=False)

        labels = gather(labels)
        rewards = gather(outputs[0].rewards).float()
        logps = gather(batch.logps.detach()).float()
        lengths = gather(batch.lengths.float())
        signed = torch.where(labels, rewards, -rewards)
        for side, rows in (("chosen", labels), ("rejected", ~labels)):
            if rows.any():
                metrics[f"rewards/{side}"] = rewards[rows].mean().item()
                metrics[f"logps/{side}"] = logps[rows].mean().item()
        if labels.any() and not labels.all():
            metrics["rewards/margins"] = rewards[labels].mean().item() - rewards[~labels].mean().item()
        metrics["rewards/accuracies"] = (signed > 0).float().mean().item()
        kl = next((out.metrics["kl"] for out in outputs if "kl" in out.metrics), None)
        if kl is not None:
            metrics["kl"] = kl.item()

        values = {"{}_logp_per_token": per_token(logps, lengths)}
        if batch.has_reference:
            values["ref_{}_logp_per_token"] = per_token(gather(batch.ref_logps.detach()).float(), lengths)
            values["{}_logratio_per_token"] = values["{}_logp_per_token"] - values["ref_{}_logp_per_token"]
        rows = {"margin": signed}
        for key, value in values.items():
            for side, label, mask in (("chosen", LABELS[0], labels), ("rejected", LABELS[1], ~labels)):
                rows[key.format(side)] = value[mask]
                if mask.any():
                    metrics[f"{METRIC_PREFIX}/{key.format(label)}"] = value[mask].mean().item()
        return metrics, rows
