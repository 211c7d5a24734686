"""The shared-prefix layout: each prompt computed once for both completions, pairs packed without padding.

A pair becomes one token run

    [ prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected ]
      shared        chosen branch      rejected branch

with position ids that restart for the rejected branch where the prompt ends, and a 4D attention mask under which a
token sees its own pair's shared tokens and the earlier tokens of its own branch only. The last prompt token is
repeated at the head of the rejected branch, with the same position and context as the original, so its hidden state
is the same and every completion token is predicted by the token before it: the ordinary shifted labels of a causal LM
(and TRL's fused LM head) apply unchanged. Several pairs share a row up to a token budget (padding-free packing,
block-diagonal mask). Only completion positions go through the LM head.

The packed batch also carries, for each of the 2B sequences, where its tokens lie in the packed rows
(`unpack_index`), so the padded batch of the same pairs can be rebuilt on the device (`padded.unpack_to_padded`): that
is how `choice.verify_first_batch` checks the packed forward against the padded one, and how a run falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .forward import TOKEN_FIELDS, ForwardContext, PolicyForward, ld_weighted_sum
from .segments import PLAN_KEY, SegmentPlan
from .truncation import truncate_pair

ATTENTION_PATHS = ("segments", "dense_mask")


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
        packing_length: token budget of one packed row (a longer pair gets a row of its own); 0 puts one pair per
            row; `None` packs the whole batch into one row (no padding: for the segment attention, whose cost does not
            grow with the row).
        pad_to_multiple_of: pad row lengths to a multiple of this.
        share_prompt: `False` lays each pair out as two whole sequences, `[prompt + chosen | prompt + rejected]`, each
            with its own positions from 0: padding-free packing without prefix sharing (the `packed` layout).

    Returns a dict of `(R, L)` rows: `input_ids`, `position_ids`, `pair_ids` (the pair's index in the batch, -1 on
    padding), `branch_ids` (0 shared, 1 chosen, 2 rejected), `completion_labels` (the token where it is a completion
    token with a token before it in its own sequence, else -100); for the `N` scored tokens, `gather_index` (flat index
    into the `(R, L-1)` shifted outputs), `scatter_seq` (0..2B-1, chosen first) and `scatter_pos` (its index within
    the completion); `unpack_index`/`unpack_completion` `(2B, T)` (flat index of each sequence's tokens, -1 past its
    end; 1 on its completion tokens); `num_tokens` as TRL counts them; the attention segments (`segments` and the
    varlen indices, see `trl_dpo_plus.layout.segments`); and the precomputed reference log-probs if any.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    packing_length: int | None = None
    pad_to_multiple_of: int | None = None
    share_prompt: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [
            truncate_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length, self.truncation_mode)
            for e in examples
        ]
        if not self.share_prompt:  # each branch its whole sequence, nothing shared
            pairs = [([], shared + c, len(shared) + cs, shared + r, len(shared) + rs) for shared, c, cs, r, rs in pairs]
        lengths = [len(shared) + len(c) + len(r) for shared, c, _, r, _ in pairs]
        if self.packing_length is None:
            rows = [list(range(len(pairs)))]
        elif self.packing_length > 0:
            rows = plan_rows(lengths, self.packing_length)
        else:
            rows = [[i] for i in range(len(pairs))]
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
        segments, q_index, k_index = [], [], []  # per segment: (row, query start, length, prefix start, prefix length)
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
                    # Attention: the chosen segment is shared + chosen (causal); the rejected one sees the shared part
                    q0, lq = (col, n + len(seq)) if branch == 1 else (start, len(seq))
                    segments.append((r, q0, lq, col, 0 if branch == 1 else n))
                    q_index.append(torch.arange(r * width + q0, r * width + q0 + lq))
                    k_index.append(torch.arange(r * width + col, r * width + col + segments[-1][4]))
                    k_index.append(q_index[-1])
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
            "segments": torch.tensor(segments, dtype=torch.long),
            "segment_q_index": torch.cat(q_index),
            "segment_k_index": torch.cat(k_index),
            "segment_cu_q": torch.tensor([0] + [s[2] for s in segments], dtype=torch.int32).cumsum(0, dtype=torch.int32),
            "segment_cu_k": torch.tensor([0] + [s[2] + s[4] for s in segments],
                                         dtype=torch.int32).cumsum(0, dtype=torch.int32),
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
    """Each prompt computed once, pairs packed without padding, the LM head run at completion positions only.

    Args:
        attention: `"segments"` (the default: attention per segment through `layout.segments`, installed on the model
            by `layout.choice`, no `L × L` mask) or `"dense_mask"` (the `(R, 1, L, L)` mask of `shared_prefix_mask`,
            for sdpa and eager models the segment path cannot serve).
    """

    name = "shared_prefix"

    def __init__(self, attention: str = "segments"):
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention={attention!r}: choose one of {ATTENTION_PATHS}")
        self.attention = attention

    def _attention_kwargs(self, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor]) -> dict:
        """The model keyword arguments that give the packed rows their attention pattern."""
        if self.attention == "segments":
            # A 4D mask makes Transformers use it as it is (no mask is built); the segment attention ignores it
            sentinel = torch.ones((inputs["input_ids"].size(0), 1, 1, 1), dtype=torch.bool,
                                  device=inputs["input_ids"].device)
            return {"attention_mask": sentinel, PLAN_KEY: SegmentPlan.from_batch(inputs)}
        unwrapped = ctx.unwrap(model)
        dtype = unwrapped.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:  # quantised embeddings
            dtype = torch.float32
        attn = unwrapped.config._attn_implementation
        return {"attention_mask": shared_prefix_mask(inputs["pair_ids"], inputs["branch_ids"], attn, dtype)}

    def _forward(self, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor], with_stats: bool):
        with ctx.compact_head():
            outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                            labels=inputs["completion_labels"], use_cache=False, fused_lm_head=True,
                            **self._attention_kwargs(ctx, model, inputs))
        num_sequences = inputs["unpack_index"].size(0)
        per_token_logps = scatter_tokens(outputs.log_probs, inputs, num_sequences)
        seq_mask = scatter_tokens(torch.ones_like(outputs.log_probs, dtype=torch.long), inputs, num_sequences)
        fields = {}
        if with_stats:
            fields = {k: None if getattr(outputs, k) is None else scatter_tokens(getattr(outputs, k), inputs,
                                                                                  num_sequences) for k in TOKEN_FIELDS}
        return per_token_logps, seq_mask, fields, getattr(outputs, "aux_loss", None)

    def policy_forward(self, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor]) -> PolicyForward:
        per_token_logps, mask, fields, aux_loss = self._forward(ctx, model, inputs, with_stats=True)
        return PolicyForward(
            per_token_logps=per_token_logps,
            mask=mask,
            logps=ld_weighted_sum(per_token_logps, mask, ctx.ld_alpha),
            num_tokens=inputs["num_tokens"].sum(),
            aux_loss=aux_loss,
            **fields,
        )

    def reference_logps(self, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor]):
        """`(ref_chosen_logps, ref_rejected_logps)` under the run's reference context."""
        with ctx.reference(model):
            per_token_logps, mask, _, _ = self._forward(ctx, model, inputs, with_stats=False)
        return ld_weighted_sum(per_token_logps, mask, ctx.ld_alpha).chunk(2, dim=0)


class PackedLayout(SharedPrefixLayout):
    """Padding-free packing without prefix sharing: each pair as its two whole sequences, positions from 0 for each,
    several pairs a row (`SharedPrefixCollator(share_prompt=False)`), the LM head at completion positions only. For
    models where the prompt cannot be shared exactly (a MoE load-balancing loss counts every token of each sequence)
    and packing can: the MoE loss then sees exactly the tokens of TRL's padded batch, padding aside."""

    name = "packed"

    def _attention_kwargs(self, ctx, model, inputs):
        kwargs = super()._attention_kwargs(ctx, model, inputs)
        if ctx.aux_loss_enabled:
            kwargs["output_router_logits"] = True
            # TRL's MoE loss reads a 2D padding mask, which one padding-free row does not need; with no mask,
            # Transformers builds each sequence's causal mask from the restarting position ids
            kwargs["attention_mask"] = None
        return kwargs
