"""Preference pairs (prompt, chosen, rejected): the `PreferenceBatch` of a `PolicyForward`, and the pair metrics."""

from __future__ import annotations

import torch

from ..layout import PolicyForward
from ..losses import PreferenceBatch
from ..losses._common import per_token
from ..losses.transforms import f_divergence_scores
from ..metrics import METRIC_PREFIX, token_metrics
from .base import DataKind, global_means


class PairedKind(DataKind):
    """Pairs: the layout's rows are `[chosen_1..B; rejected_1..B]`.

    Args:
        requires_kl: a loss reads the batch-level KL baselines (`kto_pair`): the mean chosen and rejected log-ratios
            over every process's pairs.
        f_divergence_type, f_alpha: f-DPO's divergence (TRL's config fields); other than `reverse_kl`, the batch
            carries `f'(π/π_ref)` of the log-ratios.
    """

    name = "paired"
    token_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, requires_kl: bool = False, f_divergence_type: str = "reverse_kl", f_alpha: float = 1.0):
        self.requires_kl, self.f_divergence_type, self.f_alpha = requires_kl, f_divergence_type, f_alpha

    def build_batch(self, forward: PolicyForward, reference, inputs, accelerator) -> PreferenceBatch:
        chosen_logps, rejected_logps = forward.logps.chunk(2, dim=0)
        chosen_lengths, rejected_lengths = forward.lengths.chunk(2, dim=0)
        ref_chosen = ref_rejected = chosen_scores = rejected_scores = chosen_kl = rejected_kl = None
        if reference is not None:
            ref_chosen, ref_rejected = reference
            chosen_ratios, rejected_ratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
            if self.f_divergence_type != "reverse_kl":
                chosen_scores = f_divergence_scores(chosen_ratios, self.f_divergence_type, self.f_alpha)
                rejected_scores = f_divergence_scores(rejected_ratios, self.f_divergence_type, self.f_alpha)
            if self.requires_kl:
                chosen_kl, rejected_kl = global_means([chosen_ratios, rejected_ratios], accelerator.reduce)
        chosen_tokens = None
        if accelerator.num_processes > 1:  # token-mean terms (sft, rpo) over the global batch
            chosen_tokens = accelerator.reduce(chosen_lengths.sum().float().detach(), reduction="mean")
        return PreferenceBatch(
            chosen_logps=chosen_logps, rejected_logps=rejected_logps,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            chosen_nll=forward.nll.chunk(2, dim=0)[0],
            chosen_scores=chosen_scores, rejected_scores=rejected_scores,
            chosen_kl=chosen_kl, rejected_kl=rejected_kl, chosen_tokens=chosen_tokens,
        )

    def metrics(self, forward: PolicyForward, batch: PreferenceBatch, outputs, inputs, accelerator):
        """TRL's DPO metrics (rewards as the first loss defines them: β·Δ for reference-based losses, like TRL), and
        per pair: margin, lengths, per-token log-probs and log-ratios."""
        gather = accelerator.gather
        chosen_rows = torch.arange(forward.mask.size(0), device=forward.mask.device) < batch.chosen_logps.numel()
        num_tokens = gather(forward.num_tokens.reshape(1)).sum().item()
        metrics = token_metrics(forward, chosen_rows, ~chosen_rows, num_tokens, accelerator.gather_for_metrics)

        chosen_rewards, rejected_rewards = gather(outputs[0].chosen_rewards), gather(outputs[0].rejected_rewards)
        margins = chosen_rewards - rejected_rewards
        chosen_logps, rejected_logps = gather(batch.chosen_logps.detach()), gather(batch.rejected_logps.detach())
        metrics.update({
            "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": margins.mean().item(),
            "logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item(),
        })

        chosen_len, rejected_len = gather(batch.chosen_lengths.float()), gather(batch.rejected_lengths.float())
        pairs = {
            "margin": margins.float(), "chosen_len": chosen_len, "rejected_len": rejected_len,
            "chosen_logp_per_token": per_token(chosen_logps.float(), chosen_len),
            "rejected_logp_per_token": per_token(rejected_logps.float(), rejected_len),
        }
        if batch.has_reference:
            pairs["ref_chosen_logp_per_token"] = per_token(gather(batch.ref_chosen_logps.detach()).float(), chosen_len)
            pairs["ref_rejected_logp_per_token"] = per_token(gather(batch.ref_rejected_logps.detach()).float(),
                                                             rejected_len)
            for side in self.sides:
                pairs[f"{side}_logratio_per_token"] = (pairs[f"{side}_logp_per_token"]
                                                       - pairs[f"ref_{side}_logp_per_token"])
        metrics.update({f"{METRIC_PREFIX}/{key}": value.mean().item() for key, value in pairs.items() if key != "margin"})
        return metrics, pairs
