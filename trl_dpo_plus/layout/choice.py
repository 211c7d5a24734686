"""Which layout runs: the shared-prefix layout where it is exact, else TRL's padded one, and why.

`choose_layout` decides once, when the trainer is built, from the model and the config; `verify_first_batch` then
checks the shared-prefix forward against the padded forward of the same pairs on the first batch and falls back
(rebuilding the padded batch from the packed one) when a model does not honour the custom mask.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from accelerate.utils import is_peft_model

from .forward import ForwardContext
from .padded import PaddedPairCollator, PaddedPairLayout, UnpackedPaddedLayout, padded_tokens, unpack_to_padded
from .segments import KERNELS, PREFIX, install, uses_interface
from .shared_prefix import PackedLayout, SharedPrefixCollator, SharedPrefixLayout

logger = logging.getLogger(__name__)

def shared_prefix_blocker(model: torch.nn.Module, args, aux_loss_enabled: bool = False,
                          segments: bool = True) -> str | None:
    """Why the shared-prefix layout cannot be exact for this (unwrapped) model under `args`, or `None` when it can.
    `segments`: whether the segment attention can serve the model (it takes any attention implementation with a
    kernel, and sliding windows); else only the dense mask can, under sdpa or eager attention."""
    config = model.config.get_text_config()
    attn = getattr(model.config, "_attn_implementation", None)
    window = getattr(config, "sliding_window", None)
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        return "prompt-learning PEFT prepends virtual tokens"
    if not segments:
        if attn not in ("sdpa", "eager"):
            return (f"attn_implementation={attn!r} cannot take a custom 4D attention mask (sdpa and eager can), and "
                    "the segment attention cannot serve it")
        if window is not None and getattr(config, "use_sliding_window", True) and (
            args.max_length is None or args.max_length > window
        ):
            return f"sliding-window attention (window {window}) with sequences up to max_length={args.max_length}"
    if aux_loss_enabled:
        return "the MoE load-balancing loss counts every token of both sequences"
    return None


def segment_base(ctx: ForwardContext, models: list, args) -> str | None:
    """The attention implementation the segment attention would stand in for, when `args` lets it serve every model
    (policy, reference); else `None`."""
    if args.shared_prefix_attention == "dense_mask":
        return None
    unwrapped = [ctx.unwrap(m) for m in models if m is not None]
    bases = {m.config._attn_implementation.removeprefix(PREFIX) for m in unwrapped}
    if len(bases) == 1 and bases <= set(KERNELS) and all(uses_interface(m) for m in unwrapped):
        return bases.pop()
    if args.shared_prefix_attention == "segments":
        raise ValueError(f"shared_prefix_attention='segments' cannot serve attn_implementation={sorted(bases)} (it "
                         f"serves {sorted(KERNELS)} in models that use Transformers' AttentionInterface). Use 'auto'.")
    return None


def choose_layout(ctx: ForwardContext, model: torch.nn.Module, args, setup_blocker: str | None = None,
                  reference_model: torch.nn.Module | None = None):
    """`(layout, reason, collator)` for `args.pair_layout`; `collator` is `None` where TRL's own collator serves.

    `setup_blocker` is a reason the run's setup (not the model) rules the packed layouts out, e.g. a user's
    `data_collator`. `pair_layout="shared_prefix"` (or `"packed"`) raises where it cannot be exact; `"auto"` falls
    back to the padding-free `packed` layout where only prompt sharing is inexact (a MoE loss), else to TRL's padded
    layout, saying why. The segment attention is installed on the model (and `reference_model`) when it is chosen.
    """
    blocker, chosen = setup_blocker, None
    if args.pair_layout != "padded" and setup_blocker is None:
        base = segment_base(ctx, [model, reference_model], args)
        blocker = shared_prefix_blocker(ctx.unwrap(model), args, ctx.aux_loss_enabled, segments=base is not None)
        packable = blocker is None or blocker.startswith("the MoE")
        if blocker is None and args.pair_layout in ("auto", "shared_prefix"):
            chosen = SharedPrefixLayout, True, "exact for this model"
        elif args.pair_layout == "shared_prefix" or (args.pair_layout == "packed" and not packable):
            raise ValueError(f"pair_layout={args.pair_layout!r} is not exact here: {blocker}. Use pair_layout='auto' "
                             "or 'padded'.")
        elif packable:
            reason = "pair_layout='packed'" if blocker is None else f"packed without sharing the prompt, because {blocker}"
            logger.info("Pair layout: packed (padding-free, the prompt not shared): %s", reason)
            chosen = PackedLayout, False, reason
    if chosen is not None:
        layout_cls, share_prompt, reason = chosen
        attention = "dense_mask" if base is None else "segments"
        if base is not None:
            for m in (model, reference_model):
                if m is not None:
                    install(ctx.unwrap(m))
        how = "a dense 4D attention mask" if base is None else f"segment attention ({KERNEL_WORDS[KERNELS[base]]})"
        return layout_cls(attention), f"{reason}: {how}", _collator(ctx, args, share_prompt, attention)
    if blocker:
        logger.info("Pair layout: padded (TRL's), because %s", blocker)
    collator = None
    if args.truncation_mode == "keep_completions":
        collator = PaddedPairCollator(pad_token_id=ctx.pad_token_id, max_length=args.max_length,
                                      pad_to_multiple_of=args.pad_to_multiple_of)
    return PaddedPairLayout(), blocker or "pair_layout='padded'", collator


KERNEL_WORDS = {"sdpa": "scaled_dot_product_attention per segment, no L×L mask",
                "eager": "eager softmax per segment, no L×L mask", "varlen": "one varlen flash call, no L×L mask"}


def _collator(ctx: ForwardContext, args, share_prompt: bool, attention: str) -> SharedPrefixCollator:
    # The segment attention's cost does not grow with the row, so the whole batch is one row (no padding); a dense
    # mask costs L² per row, so its rows stop at the budget (max_length)
    budget = args.packing_length
    if budget is None and attention == "dense_mask":
        budget = args.max_length if args.max_length is not None else 1024
    return SharedPrefixCollator(
        pad_token_id=ctx.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
        packing_length=budget, pad_to_multiple_of=args.pad_to_multiple_of, share_prompt=share_prompt,
    )


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module):
    """Dropout probabilities set to 0 for the duration (TRL's `disable_dropout` does this for the whole run)."""
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for module, _ in dropouts:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in dropouts:
            module.p = p


def check_batch_intact(inputs: dict[str, torch.Tensor]) -> None:
    """Raise when a packed batch reached the model damaged (its tensors disagree on how many sequences and scored
    tokens it holds), naming the pipeline, never the model: e.g. Accelerate's `dispatch_batches` cutting every tensor
    of an IterableDataset's batch to the first tensor's rows."""
    sequences = int(inputs["unpack_index"].shape[0])
    counts = {"sequences (unpack_index)": sequences, "sequences (unpack_completion)": int(inputs["unpack_completion"].shape[0])}
    counts.update({f"scored tokens ({key})": int(inputs[key].numel()) for key in ("gather_index", "scatter_seq", "scatter_pos")})
    counts.update({f"pairs x 2 ({key})": 2 * int(inputs[key].shape[0])
                   for key in ("ref_chosen_logps", "ref_rejected_logps") if key in inputs})
    sequence_counts = {v for k, v in counts.items() if k.startswith(("sequences", "pairs"))}
    token_counts = {v for k, v in counts.items() if k.startswith("scored")}
    beyond = inputs["scatter_seq"].numel() and int(inputs["scatter_seq"].max()) >= sequences  # a token of no sequence
    if len(sequence_counts) > 1 or len(token_counts) > 1 or sequences % 2 or beyond:
        raise RuntimeError(f"The packed batch was damaged before the model saw it ({counts}). This happens when "
                           "Accelerate dispatches batches (accelerator_config.dispatch_batches=True, e.g. for an "
                           "IterableDataset) with a packed layout: leave dispatch_batches unset (False here), or set "
                           "pair_layout='padded'.")


@contextlib.contextmanager
def autocast_off(model: torch.nn.Module, device_type: str):
    """Autocast off for the duration, also inside Accelerate's mixed-precision wrapper of `model.forward` (which
    enters autocast itself; it keeps the unwrapped forward as `_original_forward`)."""
    wrapped = vars(model).get("forward") if "_original_forward" in vars(model) else None
    if wrapped is not None:
        model.forward = model._original_forward
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if wrapped is not None:
            model.forward = wrapped


def verify_first_batch(layout, ctx: ForwardContext, model, inputs: dict[str, torch.Tensor], *,
                       required: bool) -> tuple[Any, str | None, dict]:
    """The shared-prefix forward of the first batch against the padded forward of the same pairs.

    Returns `(layout, fallback_reason, check)`: the layout to train with (the given one, or the padded layout run on
    the packed batches), the reason for a fallback (`None` when there is none), and the check's numbers. Models that
    rebuild their own attention mask or ignore `position_ids` fail it; with `required=True`
    (`pair_layout='shared_prefix'`) that raises instead of falling back.
    """
    check_batch_intact(inputs)
    unwrapped = ctx.unwrap(model)
    # Float32 weights under bf16/fp16 autocast are checked with autocast off: the check is of the mask, and float32
    # tells a wrong mask from rounding to 1e-5 where half precision rounds per-token log-probs by up to ~0.1
    half_weights = unwrapped.get_input_embeddings().weight.dtype != torch.float32
    with (
        torch.no_grad(),
        ctx.no_checkpointing(unwrapped),
        dropout_off(unwrapped),  # not eval(): bitsandbytes repacks 4-bit weights for its CPU inference kernel
        autocast_off(model, inputs["input_ids"].device.type) if not half_weights else contextlib.nullcontext(),
    ):
        # Under the compact head, as the layouts themselves run: full-vocabulary logits at every position of the
        # padded batch would be the run's peak memory at long sequence lengths
        with ctx.compact_head():
            padded = PaddedPairLayout().policy_forward(ctx, model, unpack_to_padded(inputs, ctx.pad_token_id))
        failure = None
        try:
            shared = layout.policy_forward(ctx, model, inputs)
        except Exception as err:  # a model that builds its own mask from a 2D one (e.g. Bloom's ALiBi)
            failure = f"{type(err).__name__}: {err}"
    # Half-precision weights round a log-prob of -15 by up to ~0.06, so there the bound grows with the log-prob's
    # size; a wrong mask is off by whole nats.
    device = padded.logps.device
    finite = torch.isfinite(padded.per_token_logps[padded.mask.bool()]).all().float().reshape(1, 1).to(device)
    if ctx.gather(finite).min() < 1:  # NaN weights or inputs: the non-finite check names them, not the layout
        logger.info("Pair layout: first-batch check skipped, the padded forward's log-probs are not finite")
        return layout, None, {"skipped": "the padded forward's log-probs are not finite"}
    tolerance, relative = (5e-2, 1e-2) if half_weights else (1e-4, 0.0)
    error, excess = torch.tensor(float("inf")), torch.tensor(float("inf"))
    if failure is None and torch.equal(shared.lengths, padded.lengths):
        theirs = padded_tokens(padded)
        width = min(theirs.size(1), shared.mask.size(1))
        mask = shared.mask[:, :width]
        diff = (shared.per_token_logps[:, :width] - theirs[:, :width]).abs() * mask
        error = diff.max()
        excess = (diff - relative * theirs[:, :width].abs() * mask).max()
    error, excess = ctx.gather(torch.stack([error, excess]).float().reshape(1, 2).to(device)).max(dim=0).values.tolist()
    check = {"max_abs_token_logp_error": error, "tolerance": tolerance, "relative_tolerance": relative}
    if excess <= tolerance:
        logger.info("Pair layout: shared_prefix, checked on the first batch (per-token log-prob error %.1e)", error)
        return layout, None, check
    if failure is not None:
        reason = f"the model's forward fails with a 4D attention mask ({failure[:200]})"
    else:
        reason = (f"its per-token log-probs differ from the padded forward by up to {error:.3g} on the first batch "
                  "(the model does not honour a custom 4D attention mask with position_ids)")
    if required:
        raise RuntimeError(f"pair_layout='shared_prefix' is not exact for this model: {reason}. Use pair_layout='padded'.")
    logger.warning("Pair layout: falling back to padded (TRL's), because %s", reason)
    return UnpackedPaddedLayout(), reason, check
