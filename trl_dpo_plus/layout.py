"""How chosen and rejected sequences are laid out for the forward: the one seam between data layout and loss.

Two layouts hand the loss path the same `PolicyForward` (per-sequence tensors, rows `[chosen_1..B; rejected_1..B]`):

- `PaddedPairLayout` is TRL's: one right-padded batch of prompt+chosen and prompt+rejected sequences, built by
  `trl.trainer.dpo_trainer.DataCollatorForPreference`. The prompt is computed twice and padding is computed too.
- `SharedPrefixLayout` computes each prompt once. A pair becomes one token run

      [ prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected ]
        shared        chosen branch      rejected branch

  with position ids that restart for the rejected branch where the prompt ends, and a 4D attention mask under which a
  token sees its own pair's shared tokens and the earlier tokens of its own branch only. The last prompt token is
  repeated at the head of the rejected branch, with the same position and context as the original, so its hidden
  state is the same and every completion token is predicted by the token before it: the ordinary shifted labels of
  a causal LM (and TRL's fused LM head) apply unchanged. Several pairs share a row up to a token budget
  (padding-free packing, block-diagonal mask). Only completion positions go through the LM head.

Unpaired rows (KTO: prompt, completion, label) use the same layouts through `UnpairedCollator`: the completion takes
the chosen branch and the KL completion (another row's completion, for KTO's baseline) the rejected branch, so one
forward gives both, the prompt computed once.

The packed batch also carries, for each of the 2B sequences, where its tokens lie in the packed rows
(`unpack_index`), so the padded batch of the same pairs can be rebuilt on the device: that is how the trainer checks
the packed forward against the padded one on the first batch, and how it falls back when the check fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "label"}
TOKEN_FIELDS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

# Truncation modes: TRL's two, and one that keeps the pair's prompt identical for both completions
TRUNCATION_MODES = ("keep_start", "keep_end", "keep_completions")


@dataclass
class PolicyForward:
    """The policy forward of a batch of B pairs, rows `[chosen; rejected]`, whatever the layout.

    Attributes:
        per_token_logps: `(2B, T)` log-probs of the completion tokens, in order, 0 elsewhere.
        mask: `(2B, T)` 1 where `per_token_logps` holds a completion token.
        logps: `(2B,)` summed completion log-probs, LD-DPO-weighted when `ld_alpha` is set.
        entropy, mean_logits, is_top1: `(2B, T)` per-token statistics of the fused LM head (for TRL's metrics).
        log_sum_sq_probs: `(2B, T)` `log Σ p²` for WPO weighting, or `None` when weighting is off.
        aux_loss: the MoE load-balancing loss, or `None`.
        num_tokens: tokens of the batch as TRL counts them (prompt counted once per completion), for `num_tokens`.
    """

    per_token_logps: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    log_sum_sq_probs: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None

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

    name = "padded"

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
        seq_len = mask.size(1)
        per_token_logps = outputs.log_probs[:, -seq_len:]
        fields = {k: None if getattr(outputs, k) is None else getattr(outputs, k)[:, -seq_len:] for k in TOKEN_FIELDS}
        return PolicyForward(
            per_token_logps=per_token_logps,
            mask=mask,
            logps=ld_weighted_sum(per_token_logps, mask, trainer.ld_alpha),
            aux_loss=getattr(outputs, "aux_loss", None),
            num_tokens=inputs["attention_mask"].sum(),
            **fields,
        )

    def reference_logps(self, trainer, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ref_chosen_logps, ref_rejected_logps)` of a padded batch: TRL's own `compute_ref_log_probs`."""
        return trainer.padded_reference_logps(model, inputs)


# -- the shared-prefix layout ------------------------------------------------------------------------------------------
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


def plan_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices of the pairs in each row, each row holding at most `budget` tokens (a longer pair
    gets a row of its own). Within a row the pairs keep their batch order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return [sorted(row) for row in rows]


@dataclass
class SharedPrefixCollator:
    """Collates tokenized pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) into the shared-prefix packed layout.

    Args:
        pad_token_id: token id of the padding at the end of rows.
        max_length: TRL's `max_length` (per prompt+completion sequence), or `None`.
        truncation_mode: `"keep_start"`, `"keep_end"` or `"keep_completions"` (see `truncate_pair`).
        packing_length: token budget of one packed row; 0 puts one pair per row.
        pad_to_multiple_of: pad row lengths to a multiple of this.

    Returns a dict of `(R, L)` rows: `input_ids`, `position_ids`, `pair_ids` (the pair's index in the batch, -1 on
    padding), `branch_ids` (0 shared, 1 chosen, 2 rejected), `completion_labels` (the token where it is a completion
    token with a token before it in its own sequence, else -100); for the `N` scored tokens, `gather_index` (flat index
    into the `(R, L-1)` shifted outputs), `scatter_seq` (0..2B-1, chosen first) and `scatter_pos` (its index within
    the completion); `unpack_index`/`unpack_completion` `(2B, T)` (flat index of each sequence's tokens, -1 past its
    end; 1 on its completion tokens); `num_tokens` as TRL counts them; and the precomputed reference log-probs if any.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    packing_length: int = 1024
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [
            truncate_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length, self.truncation_mode)
            for e in examples
        ]
        lengths = [len(shared) + len(c) + len(r) for shared, c, _, r, _ in pairs]
        rows = plan_rows(lengths, self.packing_length) if self.packing_length > 0 else [[i] for i in range(len(pairs))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        num_pairs = len(pairs)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        pair_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        branch_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        sequences: list[list[int]] = [[] for _ in range(2 * num_pairs)]  # flat packed index of each sequence's tokens
        completion_starts = [0] * (2 * num_pairs)
        gather, scatter_seq, scatter_pos = [], [], []
        num_tokens = 0

        for r, row in enumerate(rows):
            col = 0
            for i in row:
                shared, chosen_seq, chosen_start, rejected_seq, rejected_start = pairs[i]
                span = slice(col, col + lengths[i])
                input_ids[r, span] = torch.tensor(shared + chosen_seq + rejected_seq, dtype=torch.long)
                pair_ids[r, span] = i
                n = len(shared)
                position_ids[r, col : col + n] = torch.arange(n)
                branch_ids[r, col : col + n] = 0
                shared_flat = list(range(r * width + col, r * width + col + n))
                start = col + n
                for branch, seq, comp_start, s in ((1, chosen_seq, chosen_start, i), (2, rejected_seq, rejected_start,
                                                                                         num_pairs + i)):
                    position_ids[r, start : start + len(seq)] = torch.arange(n, n + len(seq))
                    branch_ids[r, start : start + len(seq)] = branch
                    sequences[s] = shared_flat + list(range(r * width + start, r * width + start + len(seq)))
                    completion_starts[s] = n + comp_start
                    # Completion tokens with a token before them in their own sequence (a sequence's first token is
                    # predicted by nothing, as in TRL); each is predicted by the output at the position before it
                    first = max(comp_start, 1 - n)
                    k = torch.arange(first, len(seq))
                    labels[r, start + k] = torch.tensor(seq, dtype=torch.long)[k]
                    gather.append(r * (width - 1) + start + k - 1)
                    scatter_seq.append(torch.full_like(k, s))
                    scatter_pos.append(k - first)
                    num_tokens += n + len(seq)
                    start += len(seq)
                col += lengths[i]

        longest = max(len(s) for s in sequences)
        unpack_index = torch.full((2 * num_pairs, longest), -1, dtype=torch.long)
        unpack_completion = torch.zeros((2 * num_pairs, longest), dtype=torch.long)
        for s, flat in enumerate(sequences):
            unpack_index[s, : len(flat)] = torch.tensor(flat, dtype=torch.long)
            unpack_completion[s, completion_starts[s] : len(flat)] = 1

        output = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "pair_ids": pair_ids,
            "branch_ids": branch_ids,
            "completion_labels": labels,
            "gather_index": torch.cat(gather),
            "scatter_seq": torch.cat(scatter_seq),
            "scatter_pos": torch.cat(scatter_pos),
            "unpack_index": unpack_index,
            "unpack_completion": unpack_completion,
            "num_tokens": torch.tensor([num_tokens], dtype=torch.long),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                output[key] = torch.tensor([e[key] for e in examples])
        return output


def shared_prefix_mask(pair_ids: torch.Tensor, branch_ids: torch.Tensor, attn_implementation: str,
                       dtype: torch.dtype) -> torch.Tensor:
    """The `(R, 1, L, L)` mask: a token sees the earlier tokens of its own pair that are shared or on its own branch.

    sdpa takes it as bool (True = attend). Eager attention adds the mask to the scores, so it gets an additive float
    mask (0 or the dtype's minimum): a bool or 0/1 mask there is silently wrong. Padding sees itself only, so that no
    softmax row is empty.
    """
    length = pair_ids.size(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=pair_ids.device).tril()
    same_pair = pair_ids.unsqueeze(2) == pair_ids.unsqueeze(1)
    key_branch = branch_ids.unsqueeze(1)
    branch_ok = (key_branch == 0) | (key_branch == branch_ids.unsqueeze(2))
    mask = (same_pair & branch_ok & causal) | torch.eye(length, dtype=torch.bool, device=pair_ids.device)
    mask = mask.unsqueeze(1)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def scatter_tokens(values: torch.Tensor, inputs: dict[str, torch.Tensor], num_sequences: int) -> torch.Tensor:
    """`(R, L-1)` per-position outputs of the packed rows -> `(2B, T)` per-sequence completion tokens, in order."""
    flat = values.reshape(-1)[inputs["gather_index"]]
    out = values.new_zeros((num_sequences, inputs["unpack_index"].size(1)))
    return out.index_put((inputs["scatter_seq"], inputs["scatter_pos"]), flat)


class SharedPrefixLayout:
    """Each prompt computed once, pairs packed without padding, the LM head run at completion positions only."""

    name = "shared_prefix"

    def _forward(self, trainer, model, inputs: dict[str, torch.Tensor], with_stats: bool):
        unwrapped = trainer.accelerator.unwrap_model(model)
        attn = unwrapped.config._attn_implementation
        dtype = unwrapped.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:  # quantised embeddings
            dtype = torch.float32
        mask = shared_prefix_mask(inputs["pair_ids"], inputs["branch_ids"], attn, dtype)
        with trainer.completion_only_lm_head():
            outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], attention_mask=mask,
                            labels=inputs["completion_labels"], use_cache=False, fused_lm_head=True)
        num_sequences = inputs["unpack_index"].size(0)
        per_token_logps = scatter_tokens(outputs.log_probs, inputs, num_sequences)
        seq_mask = scatter_tokens(torch.ones_like(outputs.log_probs, dtype=torch.long), inputs, num_sequences)
        fields = {}
        if with_stats:
            fields = {k: None if getattr(outputs, k) is None else scatter_tokens(getattr(outputs, k), inputs,
                                                                                  num_sequences) for k in TOKEN_FIELDS}
        return per_token_logps, seq_mask, fields

    def policy_forward(self, trainer, model, inputs: dict[str, torch.Tensor]) -> PolicyForward:
        per_token_logps, mask, fields = self._forward(trainer, model, inputs, with_stats=True)
        return PolicyForward(
            per_token_logps=per_token_logps,
            mask=mask,
            logps=ld_weighted_sum(per_token_logps, mask, trainer.ld_alpha),
            num_tokens=inputs["num_tokens"].sum(),
            **fields,
        )

    def reference_logps(self, trainer, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with trainer.reference_context(model):
            per_token_logps, mask, _ = self._forward(trainer, model, inputs, with_stats=False)
        return ld_weighted_sum(per_token_logps, mask, trainer.ld_alpha).chunk(2, dim=0)


def padded_tokens(forward: PolicyForward) -> torch.Tensor:
    """A padded forward's per-token log-probs left-aligned like the shared-prefix layout's: `(2B, T)` completion
    tokens in order (the padded layout keeps them at their sequence positions)."""
    mask = forward.mask.bool()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # completion positions first, in order
    return forward.per_token_logps.gather(1, order) * mask.gather(1, order)


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


class UnpackedPaddedLayout(PaddedPairLayout):
    """The padded layout, run on batches collated for the shared-prefix layout (after its first-batch check failed)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def policy_forward(self, trainer, model, inputs):
        return super().policy_forward(trainer, model, unpack_to_padded(inputs, self.pad_token_id))

    def reference_logps(self, trainer, model, inputs):
        return super().reference_logps(trainer, model, unpack_to_padded(inputs, self.pad_token_id))


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
            shared, chosen, start, rejected, _ = truncate_pair(
                e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length, "keep_completions"
            )
            truncated.append({**e, "prompt_ids": shared + chosen[:start], "chosen_ids": chosen[start:],
                              "rejected_ids": rejected[start:]})
        return self._collate(truncated)


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
