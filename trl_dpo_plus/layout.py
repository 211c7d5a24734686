"""How chosen and rejected sequences are laid out for the forward: the one seam between data layout and loss.

`PaddedPairLayout` is TRL's layout: one right-padded batch `[chosen_1..B; rejected_1..B]` of prompt+completion
sequences. Another layout (prompt-prefix sharing with a block attention mask, unpaired KTO data) implements the same
two methods and hands back the same `PolicyForward`, so the loss path does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass
class PolicyForward:
    """The policy forward of a batch of B pairs, rows `[chosen; rejected]`.

    Attributes:
        outputs: the model output with the fused LM head's per-token fields (`entropy`, `mean_logits`, `is_top1`,
            `log_sum_sq_probs` when WPO weighting is on) and `aux_loss` for MoE models.
        per_token_logps: `(2B, T)` log-probs of the completion tokens, 0 elsewhere.
        mask: `(2B, T)` 1 where `per_token_logps` holds a completion token.
        logps: `(2B,)` summed completion log-probs, LD-DPO-weighted when `ld_alpha` is set.
    """

    outputs: Any
    per_token_logps: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    @property
    def nll(self) -> torch.Tensor:
        """`(2B,)` summed NLL of the completion tokens, never LD-weighted."""
        return -(self.per_token_logps * self.mask).sum(dim=1)


def ld_weighted_sum(per_token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sum over completion tokens; with LD-DPO's α, tokens past the shorter completion of the pair count α times."""
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    position = mask.cumsum(dim=1)
    chosen_len, rejected_len = mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    shared_mask = (position > 0) & (position <= shared)
    tail_mask = position > shared
    return (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(dim=1)


class PaddedPairLayout:
    """TRL's padded `[chosen; rejected]` batch, as built by `trl.trainer.dpo_trainer.DataCollatorForPreference`."""

    def policy_forward(self, trainer, model, inputs: dict[str, torch.Tensor]) -> PolicyForward:
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if trainer.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        mask = completion_mask[..., 1:]
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        per_token_logps = outputs.log_probs[:, -mask.size(1) :]
        logps = ld_weighted_sum(per_token_logps, mask, trainer.ld_alpha)
        return PolicyForward(outputs=outputs, per_token_logps=per_token_logps, mask=mask, logps=logps)

    def reference_logps(self, trainer, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ref_chosen_logps, ref_rejected_logps)` from the reference model, or the adapter-disabled base for PEFT."""
        if trainer.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, inputs)
