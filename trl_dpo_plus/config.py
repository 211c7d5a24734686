"""`DPOPlusConfig`: TRL's `DPOConfig`, with `loss_type` checked against the registry when the config is built."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig

from .layout.truncation import TRUNCATION_MODES
from .losses import DATA_KINDS, get_loss, list_losses, validate_loss_kwargs

logger = logging.getLogger(__name__)

# TRL config fields that feed a loss hyperparameter of the same meaning: config field -> loss keyword.
SHARED_LOSS_FIELDS = {
    "label_smoothing": "label_smoothing",
    "discopop_tau": "tau",
    "desirable_weight": "desirable_weight",  # as in TRL's KTOConfig
    "undesirable_weight": "undesirable_weight",
}


PAIR_LAYOUTS = ("auto", "shared_prefix", "packed", "padded")
PREFIX_ATTENTION = ("auto", "segments", "dense_mask")

_cpu_notice_given = False


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available()) or torch.backends.mps.is_available()


@dataclass
class DPOPlusConfig(DPOConfig):
    r"""
    Configuration for [`DPOPlusTrainer`]: every field of TRL's [`~trl.DPOConfig`] works as there, plus the ones below.

    `loss_type` takes any name in the trl_dpo_plus loss registry (`trl_dpo_plus.list_losses()`), or a list of names
    combined with `loss_weights`. Unknown names, unknown or out-of-range hyperparameters and mismatched lengths raise
    here, before any model is loaded.

    Differences from TRL's defaults:
    - `beta`: `None` means each loss's recommended β (0.1 for DPO, 2.0 for SimPO, 5.0 for LN-DPO), also in a mix;
      `beta` then holds the first loss's.
    - On a machine without a GPU the config selects the CPU (`use_cpu=True`) and float32 unless `bf16` was set
      explicitly, and says so once in the log (TRL's `DPOConfig()` refuses to start there).

    Parameters:
        loss_kwargs (`dict[str, dict]` or `str`, *optional*):
            Per-loss hyperparameters, e.g. `{"simpo": {"gamma": 0.5}, "dpop": {"lambda_": 50}}`; a JSON string on the
            command line. Each is checked against the loss's signature and allowed range. They take precedence over
            `beta`, `label_smoothing` and `discopop_tau` for that loss.
        qlora (`bool`, *optional*, defaults to `False`):
            Load the model in 4-bit NF4 with LoRA on all linear layers (`trl_dpo_plus.qlora_defaults()`); the
            reference model is the adapter-disabled base. `peft_config`/`quantization_config` override the preset.
            With TRL's default `learning_rate` (1e-6, a full fine-tuning rate) the preset trains at 5e-5 instead.
        lora (`bool`, *optional*, defaults to `False`):
            LoRA without quantisation, same preset (and the same learning rate).
        diagnostics (`bool`, *optional*, defaults to `True`):
            Add the diagnostics callbacks (reward margins, likelihood displacement, length bias, non-finite values,
            no learning) and write
            `diagnostics.json` and `diagnostics.png` into `output_dir`.
        diagnostics_action (`str`, *optional*, defaults to `"warn"`):
            What a diagnostics flag does: `"warn"`, `"stop"` or `"checkpoint"`.
        base_model (`str` or `None`, *optional*, defaults to `None`):
            The Hub id of the base model for the model card's `base_model` metadata. By default it is the model's Hub
            id, also recognised from a local Hub-cache snapshot (`.../models--org--name/snapshots/...`).
        license (`str` or `None`, *optional*, defaults to `None`):
            The model card's licence. By default the base's, read from a local base's README metadata or LICENSE file.
        console_log (`str`, *optional*, defaults to `"compact"`):
            The per-step console line: `"compact"` (loss, grad norm, learning rate, reward accuracy and margin,
            log-probs, epoch, and the name of any raised diagnostics flag) or `"full"` (every metric, as TRL prints).
            Trackers and `trainer_state.json` always get every metric.
        drop_degenerate_pairs (`bool`, *optional*, defaults to `False`):
            Drop pairs with an empty completion or with chosen == rejected at dataset preparation. They are always
            counted and reported.
        pair_layout (`str`, *optional*, defaults to `"auto"`):
            How pairs are laid out for the forward. `"shared_prefix"`: each prompt computed once for both completions,
            pairs packed without padding, the LM head run only where a completion token is predicted (equal to the
            padded layout to float rounding). `"packed"`: padding-free packing of the two whole sequences of each pair
            (the prompt not shared), for where sharing cannot be exact. `"padded"`: TRL's layout, for exact parity
            with `trl.DPOTrainer`. `"auto"`: `"shared_prefix"` where it is exact (checked against the padded forward
            on the first batch), else `"packed"` (a MoE load-balancing loss) or `"padded"` with one log line saying
            why (prompt-learning PEFT, a user's data_collator or compute_metrics, vision data, and, without the
            segment attention, attention other than sdpa/eager or a sliding window shorter than max_length).
        shared_prefix_attention (`str`, *optional*, defaults to `"auto"`):
            The attention of the shared-prefix and packed layouts. `"segments"`: per-segment attention registered in
            Transformers' `AttentionInterface` (`trl_dpo_plus.layout.segments`): no `L × L` mask is built, sdpa or eager
            per segment on any device, one varlen flash call on CUDA, sliding windows too. `"dense_mask"`: a
            `(rows, 1, L, L)` mask, for sdpa and eager models. `"auto"`: segments where the model's attention goes
            through the interface, else the dense mask.
        reference_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            Folder where each split's reference log-probs are written once, keyed by a fingerprint of the reference
            weights, tokenizer, prepared token ids, truncation settings and layout (`trl_dpo_plus.reference_cache`).
            A later run (another loss, `trl-dpo-plus compare`, a resumed sweep) with the same fingerprint reads them
            back and runs no reference forward; a changed input is recomputed with one log line. Implies
            `precompute_ref_log_probs=True`.
        packing_length (`int` or `None`, *optional*, defaults to `None`):
            Token budget of one packed row in the shared-prefix and packed layouts (a longer pair gets a row of its
            own); 0 puts one pair per row. `None`: the whole batch in one row with the segment attention (whose cost
            does not grow with the row), `max_length` (1024 when that is `None`) with the dense mask.
        desirable_weight, undesirable_weight (`float`, *optional*, default to `1.0`):
            λD and λU of the unpaired losses (`kto`, `apo_zero_unpaired`), as in TRL's `KTOConfig`: the losses of
            desirable / undesirable completions are weighted by them, to balance unequal counts.
        unpair (`bool`, *optional*, defaults to `False`):
            For the unpaired losses: turn paired datasets (prompt, chosen, rejected) into unpaired rows at preparation,
            each chosen completion desirable and each rejected one undesirable (`trl_dpo_plus.unpair_preference_dataset`,
            shuffled with `seed`), so `kto` trains on the same data as `kto_pair`.
        train_sampling_strategy (`str` or `None`, *optional*, defaults to `None`):
            Transformers' sampler choice; `None` means `"sequential"` for `kto` (its KL completions are each row's
            neighbour in a fixed-order batch, as in TRL's `KTOConfig`) and `"random"` otherwise.
        beta_per_loss, sampling_by_loss (`bool`, read-only):
            Set by the config when `beta` / `train_sampling_strategy` were left unset and chosen for the losses, so
            that a copy for another loss (`trl-dpo-plus compare`) chooses them again for that loss.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["loss_kwargs"]

    # Parameters that control the loss
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Preference loss(es) from the trl_dpo_plus registry: "
            + ", ".join(list_losses())
            + ". Several names are combined with `loss_weights`.",
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "Parameter controlling the deviation from the reference model (for IPO, the paper's τ; for SimPO, "
            "the reward scale). If unset, the first loss's recommended default is used."
        },
    )
    loss_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Per-loss hyperparameters as a mapping (JSON on the command line), e.g. \'{"simpo": {"gamma": '
            "0.5}}'. Checked against each loss's signature and ranges."
        },
    )
    qlora: bool = field(
        default=False,
        metadata={"help": "QLoRA in one switch: load the model in 4-bit NF4 (double quantisation, bf16 compute), LoRA on "
                  "all linear layers (r=16, alpha=32, dropout=0.05), gradient checkpointing; the reference is the "
                  "adapter-disabled base. A `peft_config`/`quantization_config` passed to the trainer overrides the preset."},
    )
    lora: bool = field(
        default=False,
        metadata={"help": "LoRA (no quantisation) with the same preset as `qlora`; the reference is the adapter-disabled base."},
    )
    diagnostics: bool = field(
        default=True,
        metadata={"help": "Add the reward-margin, likelihood-displacement and length-bias callbacks and write "
                  "diagnostics.json/.png into output_dir."},
    )
    diagnostics_action: str = field(
        default="warn",
        metadata={"help": "What a diagnostics flag does: 'warn' (log once per episode), 'stop', or 'checkpoint' "
                  "(save the last healthy model, then stop).", "choices": ["warn", "stop", "checkpoint"]},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "The Hub id of the model this one was trained from, for the model card's `base_model` (the "
                  "Hub links the two). Default: the model's Hub id, also read from a local Hub-cache snapshot's path."},
    )
    license: str | None = field(
        default=None,
        metadata={"help": "The model card's licence (a Hub licence id such as apache-2.0 or mit). Default: the base "
                  "model's, read from a local base's README metadata or LICENSE file."},
    )
    console_log: str = field(
        default="compact",
        metadata={"help": "The per-step console line: 'compact' (loss, grad norm, learning rate, reward accuracy and "
                  "margin, log-probs, epoch, and any raised diagnostics flag) or 'full' (every metric, as TRL prints). "
                  "Trackers and trainer_state.json always get every metric.", "choices": ["compact", "full"]},
    )
    drop_degenerate_pairs: bool = field(
        default=False,
        metadata={"help": "Drop pairs with an empty completion or chosen == rejected (they are always counted)."},
    )

    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which tokens to keep when a pair exceeds max_length: 'keep_start' (TRL's default), "
                  "'keep_end', or 'keep_completions' (cut the prompt's start, identically for chosen and rejected, so "
                  "both completions fit; no pair is dropped).", "choices": list(TRUNCATION_MODES)},
    )
    pair_layout: str = field(
        default="auto",
        metadata={"help": "How pairs are laid out for the forward: 'shared_prefix' (prompt computed once, packed, LM head "
                  "at completion tokens only), 'padded' (TRL's layout, exact parity), or 'auto' (shared_prefix where it "
                  "is exact, else packed (padding-free, prompt not shared) or padded with a log line).",
                  "choices": list(PAIR_LAYOUTS)},
    )
    desirable_weight: float = field(
        default=1.0,
        metadata={"help": "λD of the unpaired losses (kto, apo_zero_unpaired): weight of desirable completions' losses."},
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={"help": "λU of the unpaired losses (kto, apo_zero_unpaired): weight of undesirable completions' losses."},
    )
    unpair: bool = field(
        default=False,
        metadata={"help": "For kto/apo_zero_unpaired: turn paired datasets into unpaired rows (chosen → desirable, "
                  "rejected → undesirable), shuffled with the seed."},
    )
    train_sampling_strategy: str | None = field(
        default=None,
        metadata={"help": "Sampler for training: 'random', 'sequential', 'group_by_length' or 'batch_rebalance'. Default: "
                  "'sequential' for kto (its KL completions are neighbours in a fixed-order batch), else 'random'.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    reference_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for reference log-probs computed once and reused: each split's are written there keyed "
                  "by a fingerprint of the reference weights, tokenizer, prepared data, truncation settings and layout, "
                  "and read back by any later run with the same fingerprint (no reference forward). Implies "
                  "precompute_ref_log_probs=True."},
    )
    packing_length: int | None = field(
        default=None,
        metadata={"help": "Token budget of one packed row in the shared-prefix and packed layouts; default: the whole "
                  "batch in one row with the segment attention, max_length (1024 when None) with a dense mask; 0 puts "
                  "one pair per row."},
    )
    shared_prefix_attention: str = field(
        default="auto",
        metadata={"help": "Attention of the shared-prefix and packed layouts: 'segments' (per-segment attention, no "
                  "L×L mask: sdpa/eager per segment, one varlen flash call on CUDA), 'dense_mask' (a 4D mask, sdpa or "
                  "eager), or 'auto' (segments where the model's attention goes through Transformers' "
                  "AttentionInterface, else the dense mask).", "choices": list(PREFIX_ATTENTION)},
    )
    # Set by the config itself (read-only): how unset fields were resolved, so that a copy for another loss (compare)
    # resolves them again for that loss
    beta_per_loss: bool = field(
        default=False, init=False,
        metadata={"help": "True when beta was left unset: each loss runs at its own recommended beta."},
    )
    sampling_by_loss: bool = field(
        default=False, init=False,
        metadata={"help": "True when train_sampling_strategy was left unset and was chosen for the losses."},
    )

    def __post_init__(self):
        self._select_device()
        check_ranges(self)
        if self.pair_layout not in PAIR_LAYOUTS:
            raise ValueError(f"pair_layout={self.pair_layout!r}: choose one of {list(PAIR_LAYOUTS)}")
        if self.shared_prefix_attention not in PREFIX_ATTENTION:
            raise ValueError(f"shared_prefix_attention={self.shared_prefix_attention!r}: choose one of "
                             f"{list(PREFIX_ATTENTION)}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode={self.truncation_mode!r}: choose 'keep_start' (TRL's default), 'keep_end', or "
                "'keep_completions' (left-truncate the prompt, identically for chosen and rejected, so both fit)"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: it must be at least 2 (a prompt token and a completion "
                             "token), or None for no truncation")
        if self.packing_length is not None and self.packing_length < 0:
            raise ValueError(f"packing_length={self.packing_length}: use a token budget > 0, 0 for one pair per row, "
                             "or None for max_length")
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.console_log not in ("compact", "full"):
            raise ValueError(f"console_log={self.console_log!r}: choose 'compact' or 'full'")
        if self.qlora and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("qlora=True needs bitsandbytes, which is an extra: pip install 'trl-dpo-plus[qlora]'. "
                             "Or use lora=True for LoRA without quantisation.")
        if self.diagnostics_action not in ("warn", "stop", "checkpoint"):
            raise ValueError(f"diagnostics_action={self.diagnostics_action!r}: choose 'warn', 'stop' or 'checkpoint'")
        if self.qlora and self.lora:
            raise ValueError("Set qlora=True or lora=True, not both (QLoRA is LoRA on a 4-bit base)")
        default_rate = type(self).__dataclass_fields__["learning_rate"].default
        if (self.qlora or self.lora) and self.learning_rate == default_rate:
            # TRL's default is a full fine-tuning rate: LoRA adapters barely move at it in tens of steps
            self.learning_rate = ADAPTER_LEARNING_RATE
            logger.info("%s=True: learning_rate=%g (TRL's default %g is a full fine-tuning rate, at which adapters "
                        "barely move); set learning_rate to choose another", "qlora" if self.qlora else "lora",
                        ADAPTER_LEARNING_RATE, default_rate)
        if (self.qlora or self.lora) and self.sync_ref_model:
            raise ValueError(
                f"{'qlora' if self.qlora else 'lora'}=True uses the adapter-disabled base as the reference, which cannot "
                "be synced: set sync_ref_model=False, or train without adapters."
            )
        if not self.loss_type:
            raise ValueError("`loss_type` is empty: name at least one loss, e.g. loss_type='sigmoid'")
        specs = [get_loss(name) for name in self.loss_type]  # unknown names raise with a suggestion
        if len(set(self.loss_type)) != len(self.loss_type):
            raise ValueError(f"`loss_type` names a loss twice: {self.loss_type}; use `loss_weights` to weight it")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"`loss_weights` has {len(self.loss_weights)} entries for {len(self.loss_type)} loss types "
                f"{self.loss_type}; give one weight per loss."
            )
        if self.loss_weights is not None:
            weights = list(self.loss_weights)
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
                       for w in weights) or not any(w > 0 for w in weights):
                raise ValueError(
                    f"`loss_weights`={weights}: each weight must be a finite number >= 0 and at least one > 0, "
                    f"e.g. loss_weights={[1.0] * len(self.loss_type)}"
                )
        self._check_data_kind(specs)
        if self.beta is None:
            # Each loss then runs at its own recommended β (a mix of simpo and sigmoid must not run sigmoid at 2.0);
            # `beta` holds the first loss's, for what TRL reads from it.
            self.beta_per_loss = True
            self.beta = specs[0].defaults["beta"]
            logger.info("beta not set: each loss uses its recommended beta (%s)",
                        ", ".join(f"{s.name}={s.defaults['beta']}" for s in specs))

        if isinstance(self.loss_kwargs, str):
            try:
                self.loss_kwargs = json.loads(self.loss_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"`loss_kwargs` is not valid JSON ({err}): write it like '{{\"simpo\": {{\"gamma\": 0.5}}}}'"
                ) from err
        example = '{"%s": {"beta": 0.2}}' % self.loss_type[0]
        if self.loss_kwargs is not None and not isinstance(self.loss_kwargs, dict):
            raise TypeError(
                f"`loss_kwargs` must be a mapping keyed by loss name, e.g. {example}; got {type(self.loss_kwargs).__name__} "
                f"{self.loss_kwargs!r:.80}"
            )
        self.loss_kwargs = dict(self.loss_kwargs or {})
        for name, kwargs in self.loss_kwargs.items():
            if name not in self.loss_type:
                flat = any(name in spec.defaults for spec in specs)
                raise ValueError(
                    f"`loss_kwargs` must be keyed by loss name, e.g. {example}: {name!r} is a hyperparameter, not a "
                    f"loss in loss_type={self.loss_type}" if flat else
                    f"`loss_kwargs` sets hyperparameters for {name!r}, which is not in loss_type={self.loss_type}"
                )
            if not isinstance(kwargs, dict):
                raise TypeError(f"`loss_kwargs[{name!r}]` must be a mapping of hyperparameters, got {kwargs!r}")
        for name in self.loss_type:
            self.loss_kwargs_for(name)  # validates names, types and ranges now, not at step 1
        for config_field, keyword in SHARED_LOSS_FIELDS.items():
            value = getattr(self, config_field)
            if value != type(self).__dataclass_fields__[config_field].default and not any(
                keyword in spec.defaults for spec in specs
            ):
                users = sorted(n for n in list_losses() if keyword in get_loss(n).defaults)
                logger.warning("%s=%s has no effect: none of %s uses it (it applies to %s)", config_field, value,
                               self.loss_type, users)

        f_div = {s.name for s in specs if not s.supports_f_divergence}
        if self.f_divergence_type != "reverse_kl" and f_div:
            raise ValueError(
                f"`f_divergence_type={self.f_divergence_type!r}` is not defined for {sorted(f_div)}; it applies to "
                f"{sorted(n for n in list_losses() if get_loss(n).supports_f_divergence)}. Use 'reverse_kl'."
            )
        whole_batch = [s.name for s in specs if s.whole_batch]
        if whole_batch and self.per_device_train_batch_size < 2:
            raise ValueError(f"{whole_batch} sort the log-ratios across the batch, which needs at least 2 pairs; at "
                             "per_device_train_batch_size=1 there is nothing to sort. Raise it (and lower "
                             "gradient_accumulation_steps to keep the effective batch).")
        if self.use_weighting and whole_batch:
            raise ValueError(f"use_weighting=True (WPO) cannot weight {', '.join(map(repr, whole_batch))}: they sort "
                             "pairs across the batch, so per-pair weights would not line up. Drop one of the two.")
        if self.reference_cache_dir is not None and any(s.requires_reference for s in specs):
            if not self.precompute_ref_log_probs:
                logger.info("reference_cache_dir is set: precompute_ref_log_probs=True (the cache holds precomputed "
                            "reference log-probs)")
            self.precompute_ref_log_probs = True
        if not any(s.requires_reference for s in specs):
            if self.precompute_ref_log_probs:
                logger.info("Every selected loss is reference-free: nothing to precompute, precompute_ref_log_probs=False")
                self.precompute_ref_log_probs = False
            if self.sync_ref_model:
                raise ValueError(f"`sync_ref_model=True` needs a reference model, but {self.loss_type} is reference-free")
        with warnings.catch_warnings():
            # TRL's own default sets `gradient_checkpointing`, which Transformers 5 renamed: nothing to act on
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
            super().__post_init__()
        if self.accelerator_config.dispatch_batches is None:
            # The packed layouts' batches hold tensors of different first sizes (rows, pairs, segments); Accelerate's
            # dispatch of an IterableDataset's batches would cut every one to the first tensor's rows
            self.accelerator_config.dispatch_batches = False

    def _check_data_kind(self, specs) -> None:
        """Paired and unpaired losses do not mix; the unpaired ones' KL term needs TRL's batch and sampling setup."""
        kinds = {spec.data for spec in specs}
        if len(kinds) > 1:
            by_kind = {k: [s.name for s in specs if s.data == k] for k in sorted(kinds)}
            raise ValueError(
                f"loss_type={self.loss_type} mixes losses for {DATA_KINDS['paired']} {by_kind['paired']} with losses for "
                f"{DATA_KINDS['unpaired']} {by_kind['unpaired']}: a run trains on one kind of data. Pick losses of one "
                "kind (kto_pair is KTO on pairs)."
            )
        kl_losses = [s.name for s in specs if s.data == "unpaired" and s.requires_kl]
        if self.train_sampling_strategy is None:
            self.sampling_by_loss = True  # chosen here, so a copy for another loss (compare) chooses again
            self.train_sampling_strategy = "sequential" if kl_losses else "random"
        if kinds != {"unpaired"}:
            if self.unpair:
                raise ValueError(f"unpair=True makes unpaired rows, but loss_type={self.loss_type} trains on pairs: use an "
                                 "unpaired loss ('kto', 'apo_zero_unpaired'), or drop unpair")
            return
        if self.ld_alpha is not None or self.use_weighting:
            option = "ld_alpha" if self.ld_alpha is not None else "use_weighting"
            raise ValueError(f"{option} weights the tokens or pairs of paired data; {self.loss_type} train on unpaired "
                             f"completions. Unset {option}.")
        if not kl_losses:
            return
        if self.per_device_train_batch_size <= 1:
            raise ValueError(
                f"{kl_losses} estimate the KL baseline from each prompt paired with another row's completion in the same "
                f"batch, so per_device_train_batch_size must be > 1 (it is {self.per_device_train_batch_size}); with 1 "
                "the baseline would equal the row's own reward. Raise it (and lower gradient_accumulation_steps to "
                "keep the effective batch), or use 'apo_zero_unpaired', which has no KL term."
            )
        if self.train_sampling_strategy != "sequential":
            raise ValueError(
                f"{kl_losses} pair each prompt with the completion of its neighbour in a fixed-order batch of "
                f"per_device_train_batch_size rows (as TRL's KTOTrainer does), so training must read the rows in order: "
                f"train_sampling_strategy={self.train_sampling_strategy!r} would break that pairing. Leave "
                "train_sampling_strategy unset (or 'sequential') and shuffle the dataset once beforehand "
                "(dataset.shuffle(seed=...)) if it is sorted."
            )

    @classmethod
    def from_trl(cls, args: DPOConfig) -> DPOPlusConfig:
        """A TRL `DPOConfig` as a `DPOPlusConfig` with the same field values (and the registry's checks)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})

    @property
    def data_kind(self) -> str:
        """`"paired"` or `"unpaired"`: the kind of rows the selected losses train on."""
        return get_loss(self.loss_type[0]).data

    def _select_device(self) -> None:
        global _cpu_notice_given
        if self.use_cpu or _has_accelerator():
            return
        self.use_cpu = True
        if self.bf16 is None and not self.fp16:  # float32, unless `accelerate launch` (its config) asked for bf16
            self.bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"
        if _cpu_notice_given:
            return
        _cpu_notice_given = True
        logger.info(
            "No GPU found: training on the CPU (use_cpu=True) in %s.", "bfloat16 mixed precision" if self.bf16 else "float32"
        )

    @property
    def requires_reference(self) -> bool:
        """Whether any selected loss reads reference log-probs."""
        return any(get_loss(name).requires_reference for name in self.loss_type)

    def loss_kwargs_for(self, name: str) -> dict[str, Any]:
        """The validated hyperparameters loss `name` runs with: its defaults < beta & shared fields < loss_kwargs."""
        accepted = get_loss(name).defaults
        kwargs = {} if self.beta_per_loss else {"beta": self.beta}
        for config_field, keyword in SHARED_LOSS_FIELDS.items():
            value = getattr(self, config_field)
            if keyword in accepted and value != type(self).__dataclass_fields__[config_field].default:
                kwargs[keyword] = value
        kwargs.update(self.loss_kwargs.get(name, {}))
        return validate_loss_kwargs(name, kwargs)


# The `lora`/`qlora` presets' learning rate when none is set (LoRA DPO recipes train at 5e-6 to 1e-4)
ADAPTER_LEARNING_RATE = 5e-5

# What Transformers and TRL leave unchecked until deep in training (a ZeroDivisionError for
# gradient_accumulation_steps=0): field -> (smallest allowed, whether the smallest is allowed, what it means)
RANGES = {
    "gradient_accumulation_steps": (1, True, "batches summed per optimizer step"),
    "per_device_train_batch_size": (1, True, "rows per device and step"),
    "per_device_eval_batch_size": (1, True, "rows per device and evaluation step"),
    "learning_rate": (0, True, "the optimizer's step size"),
    "num_train_epochs": (0, False, "passes over the train split (or set max_steps)"),
    "max_grad_norm": (0, True, "the gradient clipping norm (0 or None: no clipping)"),
    "weight_decay": (0, True, "AdamW's decoupled weight decay"),
    "adam_epsilon": (0, False, "Adam's denominator term"),
    "warmup_steps": (0, True, "the warm-up length (a fraction < 1 of the run, or steps)"),
    "logging_steps": (0, False, "steps between logs (a fraction < 1 of the run, or steps)"),
    "eval_steps": (0, False, "steps between evaluations"),
    "save_steps": (0, False, "steps between checkpoints"),
}


def check_ranges(args) -> None:
    """Numbers out of range fail at config time, naming the field, the value and what it means."""
    for name, (low, inclusive, meaning) in RANGES.items():
        value = getattr(args, name, None)
        if value is None or (name == "num_train_epochs" and isinstance(args.max_steps, int) and args.max_steps > 0):
            continue  # max_steps > 0 overrides the epochs
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value < low if inclusive else value <= low)
        if bad:
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ValueError(f"{name}={value!r}: it must be a finite number {bound} ({meaning}).")
    if not isinstance(args.max_steps, int) or isinstance(args.max_steps, bool) or args.max_steps < -1:
        raise ValueError(f"max_steps={args.max_steps!r}: give a number of steps > 0, or -1 to train num_train_epochs")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name}={value!r}: Adam's decay rates lie in [0, 1) (defaults 0.9 and 0.999)")


def release_unused_reference(ref_model, loss_specs):
    """`None` for a reference model no selected loss reads (reference-free losses), with a log line: it would sit in
    memory unused for the whole run; else `ref_model`."""
    if ref_model is None or any(spec.requires_reference for spec in loss_specs):
        return ref_model
    logger.info("Reference-free loss %s: the ref_model passed in is not used and is released",
                [spec.name for spec in loss_specs])
    return None


def check_processes(loss_specs, num_processes: int) -> None:
    """Losses that sort across the whole batch (`whole_batch` in the registry) refuse several processes, where each
    would sort only its own pairs."""
    whole_batch = [spec.name for spec in loss_specs if spec.whole_batch]
    if whole_batch and num_processes > 1:
        raise ValueError(
            f"{whole_batch} sort the log-ratios across the batch, and with {num_processes} processes each would sort "
            "only its own pairs, which is a different loss than on one process. Train them on one process (raise "
            "per_device_train_batch_size or gradient_accumulation_steps for the same batch), or choose a per-pair "
            "loss such as 'sigmoid'."
        )
