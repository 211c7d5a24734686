"""Attention that computes only what the shared-prefix mask keeps: per-segment attention, no `L × L` mask.

A packed row holds, per pair, `[shared | chosen branch | rejected branch]`. Its attention is two segments:

- the chosen segment: queries `shared + chosen` over the same keys, causal (an ordinary causal sequence);
- the rejected segment: queries `rejected` over the keys `shared ++ rejected`, causal within the branch (aligned to
  the bottom right: query j sees every shared key and the branch keys up to j).

The collator writes one row of `segments` per segment, `(row, query_start, query_length, prefix_start,
prefix_length)` (the prefix is the shared part the queries see in front of themselves; 0 for a chosen segment), and
the flat indices a varlen kernel reads (`segment_q_index`, `segment_k_index`, `segment_cu_q`, `segment_cu_k`).
`SegmentPlan` carries them to the attention function as a model keyword argument (Transformers hands the model's
keyword arguments to every attention call), and the attention function runs one of three kernels:

- `sdpa`: `scaled_dot_product_attention` per segment (causal segments with `is_causal`, the rest with the segment's
  own small mask); any device;
- `eager`: the explicit softmax of Transformers' eager attention, per segment (float32 softmax, softcapping);
- `varlen`: on CUDA, one varlen flash call over all segments (`flash_attn_varlen_func` when installed, else PyTorch's
  `varlen_attn`), the shared prefix's keys and values copied in front of each rejected branch (the
  `segment_k_index`), causal aligned to the bottom right as flash attention aligns it.

The model keeps its attention implementation for every other call: `install` renames it `dpo_plus_<name>`,
registered in Transformers' `AttentionInterface` (and its mask in `AttentionMaskInterface`) as a function that hands
any call without a plan to the original implementation, so padded batches and generation are unchanged.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PLAN_KEY = "dpo_plus_segments"
PREFIX = "dpo_plus_"
# The attention implementations the segment path stands in for, and the kernel it runs for each
KERNELS = {"sdpa": "sdpa", "eager": "eager", "flex_attention": "sdpa", "flash_attention_2": "varlen",
           "flash_attention_3": "varlen"}
SEGMENT_KEYS = ("segments", "segment_q_index", "segment_k_index", "segment_cu_q", "segment_cu_k")


@dataclass
class SegmentPlan:
    """The attention segments of one packed batch (see the module docstring), for one forward.

    Attributes:
        segments: `(row, query_start, query_length, prefix_start, prefix_length)` per segment, as Python ints.
        width: the rows' length; columns past the last segment of a row are padding.
        q_index, k_index, cu_q, cu_k, max_q, max_k: the varlen kernel's flat indices into the `(rows · width)` tokens
            and cumulative lengths, on the batch's device.
        kernel: `"sdpa"`, `"eager"` or `"varlen"`; `None` means the kernel of the model's attention implementation.
    """

    segments: list[tuple[int, int, int, int, int]]
    rows: int
    width: int
    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    kernel: str | None = None

    @classmethod
    def from_batch(cls, inputs: dict[str, torch.Tensor], kernel: str | None = None) -> SegmentPlan:
        segments = [tuple(s) for s in inputs["segments"].tolist()]  # one host read per forward
        rows, width = inputs["input_ids"].shape
        return cls(segments, rows, width, inputs["segment_q_index"], inputs["segment_k_index"],
                   inputs["segment_cu_q"], inputs["segment_cu_k"], max(s[2] for s in segments),
                   max(s[2] + s[4] for s in segments), kernel)


def segment_mask(query_length: int, prefix_length: int, window: int | None, device) -> torch.Tensor | None:
    """`(query_length, prefix_length + query_length)` bool, True = attend: every prefix key, causal within the
    queries (bottom-right aligned), and, with a sliding window, only keys less than `window` positions back. `None`
    where plain causal attention is exactly that (no prefix, no window that bites)."""
    if prefix_length == 0 and (window is None or window >= query_length):
        return None
    q_pos = torch.arange(query_length, device=device)[:, None] + prefix_length
    k_pos = torch.arange(prefix_length + query_length, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _sdpa(q, k, v, mask, scaling, dropout, softcap):
    if softcap is not None:
        raise ValueError("sdpa attention does not support softcap; the model's eager attention does")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                          scale=scaling)


def _eager(q, k, v, mask, scaling, dropout, softcap):
    """Transformers' eager attention on one segment: float32 softmax, optional softcapping."""
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.size(-1) ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    rows, heads, length, dim = states.shape
    return states[:, :, None].expand(rows, heads, groups, length, dim).reshape(rows, heads * groups, length, dim)


def loop_attention(plan: SegmentPlan, query, key, value, *, kernel: str, scaling=None, dropout: float = 0.0,
                   window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """`(rows, width, heads, dim)` attention output, one kernel call per segment; padding columns are 0."""
    key = _repeat_kv(key, query.size(1) // key.size(1))
    value = _repeat_kv(value, query.size(1) // value.size(1))
    attend = _eager if kernel == "eager" else _sdpa
    pieces: list[list[torch.Tensor]] = [[] for _ in range(plan.rows)]
    ends = [0] * plan.rows
    for row, q0, lq, p0, np_ in plan.segments:  # segments are in column order within each row
        q = query[row: row + 1, :, q0: q0 + lq]
        k, v = key[row: row + 1, :, q0: q0 + lq], value[row: row + 1, :, q0: q0 + lq]
        if np_:
            k = torch.cat([key[row: row + 1, :, p0: p0 + np_], k], dim=2)
            v = torch.cat([value[row: row + 1, :, p0: p0 + np_], v], dim=2)
        mask = segment_mask(lq, np_, window, query.device)
        pieces[row].append(attend(q, k, v, mask, scaling, dropout, softcap))
        ends[row] = q0 + lq
    out = []
    for row, parts in enumerate(pieces):
        if ends[row] < plan.width:
            parts.append(query.new_zeros((1, query.size(1), plan.width - ends[row], value.size(-1))))
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out, dim=0).transpose(1, 2).contiguous()


def varlen_reference(q, k, v, cu_q: list[int], cu_k: list[int], *, scaling=None, window: int | None = None):
    """What the varlen kernel computes on flat `(T, heads, dim)` tensors, segment by segment with SDPA: the bottom-right
    causal attention of each segment's queries over its keys (any device; the CUDA kernels' semantics)."""
    groups = q.size(1) // k.size(1)
    out = []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[cu_q[s]: cu_q[s + 1]], k[cu_k[s]: cu_k[s + 1]],
                                                         v[cu_k[s]: cu_k[s + 1]]))
        ks, vs = _repeat_kv(ks, groups), _repeat_kv(vs, groups)
        mask = segment_mask(qs.size(2), ks.size(2) - qs.size(2), window, q.device)
        out.append(_sdpa(qs, ks, vs, mask, scaling, 0.0, None)[0].transpose(0, 1))
    return torch.cat(out, dim=0)


def _varlen_kernel(q, k, v, plan: SegmentPlan, scaling, dropout, window):
    window_size = (-1, 0) if window is None else (window - 1, 0)
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, dropout_p=dropout,
                                      softmax_scale=scaling, causal=True, window_size=window_size)
    if dropout:
        raise ValueError("PyTorch's varlen_attn has no dropout: install flash-attn, or set attention dropout to 0")
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale=scaling, window_size=window_size,
                       enable_gqa=q.size(1) != k.size(1))


def varlen_attention(plan: SegmentPlan, query, key, value, *, scaling=None, dropout: float = 0.0,
                     window: int | None = None) -> torch.Tensor:
    """One varlen call over every segment (CUDA), or its reference loop elsewhere: `(rows, width, heads, dim)`."""
    rows, heads, width, dim = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(rows * width, t.size(1), t.size(-1))  # noqa: E731
    q, k, v = flat(query)[plan.q_index], flat(key)[plan.k_index], flat(value)[plan.k_index]
    if query.device.type == "cuda":
        out = _varlen_kernel(q, k, v, plan, scaling, dropout, window)
    else:
        out = varlen_reference(q, k, v, plan.cu_q.tolist(), plan.cu_k.tolist(), scaling=scaling, window=window)
    full = out.new_zeros((rows * width, heads, value.size(-1))).index_copy(0, plan.q_index, out)
    return full.view(rows, width, heads, value.size(-1))


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, *, base: str,
                      **kwargs):
    """The attention function registered as `dpo_plus_<base>`: per-segment attention when the call carries a plan,
    else the `base` implementation unchanged."""
    plan = kwargs.pop(PLAN_KEY, None)
    if plan is None:
        return _base_function(module, base)(module, query, key, value, attention_mask, scaling=scaling,
                                            dropout=dropout, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the segment attention")
    kernel = plan.kernel or KERNELS[base]
    window = kwargs.get("sliding_window")
    if kernel == "varlen":
        out = varlen_attention(plan, query, key, value, scaling=scaling, dropout=dropout, window=window)
    else:
        out = loop_attention(plan, query, key, value, kernel=kernel, scaling=scaling, dropout=dropout, window=window,
                             softcap=kwargs.get("softcap"))
    return out, None


def _base_function(module, base: str):
    """The original attention function: the interface's, or for eager the model's own module-level one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


@functools.cache
def register(base: str) -> str:
    """Register `dpo_plus_<base>` in Transformers' attention and mask interfaces (once); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = PREFIX + base
    AttentionInterface.register(name, functools.partial(segment_attention, base=base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def install(model: torch.nn.Module) -> str | None:
    """Route `model`'s attention through the segment path (idempotent); returns the original implementation, or
    `None` when the segment path cannot stand in for it (an implementation it has no kernel for, or attention modules
    that do not look their function up in Transformers' `AttentionInterface`)."""
    config = model.config
    base = config._attn_implementation
    if base.startswith(PREFIX):
        return base[len(PREFIX):]
    if base not in KERNELS or not uses_interface(model):
        return None
    config._attn_implementation = register(base)
    return base


def uses_interface(model: torch.nn.Module) -> bool:
    """Whether the model's attention modules look their function up in Transformers' `AttentionInterface` (and, for
    eager, have the module-level eager function to hand other calls to)."""
    for module in model.modules():
        home = sys.modules[type(module).__module__]
        if type(module).__name__.endswith("Attention") and hasattr(home, "ALL_ATTENTION_FUNCTIONS"):
            return model.config._attn_implementation.removeprefix(PREFIX) != "eager" or hasattr(
                home, "eager_attention_forward")
    return False
