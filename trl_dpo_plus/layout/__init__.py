"""How chosen and rejected sequences are laid out for the forward: the one seam between data layout and loss.

Two layouts hand the loss path the same `PolicyForward` (per-sequence tensors, rows `[chosen_1..B; rejected_1..B]`):

- `padded.PaddedPairLayout` is TRL's: one right-padded batch of prompt+chosen and prompt+rejected sequences. The
  prompt is computed twice and padding is computed too.
- `shared_prefix.SharedPrefixLayout` computes each prompt once, packs pairs without padding, and runs the LM head at
  completion positions only (its module docstring draws the token run).

`choice` picks one when the trainer is built and checks it on the first batch; `truncation` holds the one truncation
rule every collator, count and held-out pass uses. Layouts receive a `ForwardContext` (what they need from the run),
never the trainer. Unpaired rows (KTO) use the same layouts through `trl_dpo_plus.data_kinds.unpaired`.
"""

from .choice import choose_layout, dropout_off, shared_prefix_blocker, verify_first_batch
from .forward import NON_MODEL_KEYS, TOKEN_FIELDS, ForwardContext, PolicyForward, ld_weighted_sum
from .padded import (
    PaddedPairCollator,
    PaddedPairLayout,
    UnpackedPaddedLayout,
    padded_outputs,
    padded_tokens,
    unpack_to_padded,
)
from .segments import SegmentPlan
from .shared_prefix import (
    PackedLayout,
    SharedPrefixCollator,
    SharedPrefixLayout,
    plan_rows,
    scatter_tokens,
    shared_prefix_mask,
)
from .truncation import TRUNCATION_MODES, is_truncated, truncate_pair, truncate_sequences

__all__ = [
    "NON_MODEL_KEYS",
    "TOKEN_FIELDS",
    "TRUNCATION_MODES",
    "ForwardContext",
    "PackedLayout",
    "PaddedPairCollator",
    "PaddedPairLayout",
    "PolicyForward",
    "SegmentPlan",
    "SharedPrefixCollator",
    "SharedPrefixLayout",
    "UnpackedPaddedLayout",
    "choose_layout",
    "dropout_off",
    "is_truncated",
    "ld_weighted_sum",
    "padded_outputs",
    "padded_tokens",
    "plan_rows",
    "scatter_tokens",
    "shared_prefix_mask",
    "shared_prefix_blocker",
    "truncate_pair",
    "truncate_sequences",
    "unpack_to_padded",
    "verify_first_batch",
]
