"""TRL's layout: one right-padded batch of prompt+chosen and prompt+rejected sequences, each prompt computed twice.

The batch is built by `trl.trainer.dpo_trainer.DataCollatorForPreference` (or `PaddedPairCollator` for
`keep_completions`, which TRL's collator does not have), and the forward is TRL's fused LM head over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .forward import NON_MODEL_KEYS, TOKEN_FIELDS, ForwardContext, PolicyForward, ld_weighted_sum
from .truncation import truncate_sequences


class PaddedPairLayout:
    """TRL's padded `[chosen; rejected]` batch, as built by `trl.trainer.dpo_trainer.DataCollatorForPreference`."""

    name = "padded"

    def policy_forward(self, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor]) -> PolicyForward:
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if ctx.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        mask = completion_mask[..., 1:]
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        seq_len = mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        fields = {k: None if getattr(outputs, k) is None else getattr(outputs, k)[:, -seq_len:] for k in TOKEN_FIELDS}
        return PolicyForward(
            per_token_logps=per_token_logps,
            mask=mask,
            logps=ld_weighted_sum(per_token_logps, mask, ctx.ld_alpha),
            aux_loss=getattr(outputs, "aux_loss", None),
            num_tokens=inputs["attention_mask"].sum(),
            **fields,
        )

    def reference_logps(self, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor]):
        """`(ref_chosen_logps, ref_rejected_logps)` of a padded batch: TRL's own `compute_ref_log_probs`."""
        return ctx.padded_reference(model, inputs)


def unpack_to_padded(inputs: dict[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The padded `[chosen; rejected]` batch (TRL's collator output) of the pairs of a packed batch, on its device."""
    index = inputs["unpack_index"]
    valid = index >= 0
    input_ids = inputs["input_ids"].reshape(-1)[index.clamp(min=0)].masked_fill(~valid, pad_token_id)
    padded = {"input_ids": input_ids, "attention_mask": valid.long(), "completion_mask": inputs["unpack_completion"]}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in inputs:
            padded[key] = inputs[key]
    return padded


def padded_outputs(model, inputs: dict[str, torch.Tensor], pad_token_id: int):
    """The model's ordinary outputs (with logits) on the padded batch of `inputs`, collated in either layout, without
    gradient: what TRL's deprecated `return_outputs=True` hands back."""
    padded = unpack_to_padded(inputs, pad_token_id) if "pair_ids" in inputs else inputs
    with torch.no_grad():
        return model(**{k: v for k, v in padded.items() if k not in NON_MODEL_KEYS})


def padded_tokens(forward: PolicyForward) -> torch.Tensor:
    """A padded forward's per-token log-probs left-aligned like the shared-prefix layout's: `(2B, T)` completion
    tokens in order (the padded layout keeps them at their sequence positions)."""
    mask = forward.mask.bool()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # completion positions first, in order
    return forward.per_token_logps.gather(1, order) * mask.gather(1, order)


class UnpackedPaddedLayout(PaddedPairLayout):
    """The padded layout, run on batches collated for the shared-prefix layout (after its first-batch check failed)."""

    def policy_forward(self, ctx, model, inputs):
        return super().policy_forward(ctx, model, unpack_to_padded(inputs, ctx.pad_token_id))

    def reference_logps(self, ctx, model, inputs):
        return super().reference_logps(ctx, model, unpack_to_padded(inputs, ctx.pad_token_id))


@dataclass
class PaddedPairCollator:
    """TRL's padded collator after `truncation_mode="keep_completions"`, which TRL's collator does not have."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self._collate = DataCollatorForPreference(pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        truncated = []
        for e in examples:
            (prompt, chosen), (_, rejected) = truncate_sequences(
                e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length, "keep_completions")
            truncated.append({**e, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        return self._collate(truncated)
