"""`DPOPlusTrainer`: TRL's `DPOTrainer` with the loss taken from the trl_dpo_plus registry.

This module is the only place that touches TRL and Transformers internals. It overrides TRL's private `_compute_loss`
(TRL hard-codes its losses there), `_precompute_ref_logps` (to collate in the shared-prefix layout) and
`_prepare_dataset` (a clear error when `max_length` drops every pair; for unpaired rows it runs TRL's own
`KTOTrainer._prepare_dataset` on this trainer), `_set_signature_columns_if_needed` (to keep the unpaired rows'
columns), TRL's `compute_ref_log_probs`, and Transformers' private `_load_callback_state` (to restore the
diagnostics on resume). For reference-free losses it keeps TRL's `__init__` from loading a reference model; for the
shared-prefix layout it has TRL's fused LM head score only labelled positions on every device (TRL does so on Triton
devices only). `tests/test_trl_contract.py` pins the upstream code all of these rely on and fails loudly when it
changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections import defaultdict
from unittest import mock

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, concatenate_datasets
from trl import DPOConfig
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import dpo_trainer as _trl_dpo
from trl.trainer import kto_trainer as _trl_kto
from trl.trainer import utils as _trl_utils

from .config import DPOPlusConfig
from .data import check_preference_dataset, looks_like_local_path
from .diagnostics import (
    DiagnosticCallback,
    DiagnosticsReportCallback,
    NonFiniteCallback,
    default_callbacks,
    write_report,
)
from .hub import build_model_card
from .layout import (
    NON_MODEL_KEYS,
    PaddedPairCollator,
    PaddedPairLayout,
    PolicyForward,
    SharedPrefixCollator,
    SharedPrefixLayout,
    UnpackedPaddedLayout,
    UnpairedCollator,
    padded_tokens,
    unpack_to_padded,
)
from .losses import PreferenceBatch, UnpairedBatch, get_loss
from .losses._common import per_token
from .console import install_compact_console
from .qlora import prepare_adapter_training
from .reference_cache import Fingerprint, ReferenceCache, token_ids_fingerprint, tokenizer_fingerprint, weights_fingerprint

logger = logging.getLogger(__name__)

METRIC_PREFIX = "dpo_plus"
TOKEN_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Unpaired rows as TRL's KTOTrainer prepares them: the completion, and another row's completion for the KL baseline
UNPAIRED_TOKEN_ID_COLUMNS = ("prompt_ids", "completion_ids", "KL_completion_ids")
UNPAIRED_COLUMNS = ("completion_ids", "KL_completion_ids", "label")
_TRL_INIT_ARGS = (
    "data_collator", "train_dataset", "eval_dataset", "processing_class", "compute_metrics", "callbacks",
    "optimizers", "quantization_config", "peft_config",
)


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(π/π_ref) of the f-DPO paper (https://arxiv.org/abs/2309.16240), as TRL 1.16 computes it."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log 2 + logσ(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(α−1) − 1)/(α − 1)
        dtype = logratios.dtype
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(dtype, 80.0)
        t = torch.clamp(((alpha - 1.0) * logratios).float(), max=clamp_max)
        return (torch.exp(t) - 1.0).to(dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"Unknown f_divergence_type: {kind!r}")


def _without_filter(args):
    """A copy of `args` under which TRL's preparation keeps every row: its DPO and KTO preparations read `max_length`
    only to drop rows whose prompt alone fills it."""
    import copy

    args = copy.copy(args)
    args.max_length = None
    return args


def _size(dataset) -> int | None:
    """Rows of a map-style dataset before TRL prepares it; `None` for streamed data."""
    return len(dataset) if isinstance(dataset, Dataset) else None


@contextlib.contextmanager
def _dropout_off(model: torch.nn.Module):
    """Dropout probabilities set to 0 for the duration (TRL's `disable_dropout` does this for the whole run)."""
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for module, _ in dropouts:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in dropouts:
            module.p = p


def _as_plus_config(args: DPOConfig) -> DPOPlusConfig:
    """A TRL `DPOConfig` becomes a `DPOPlusConfig` with the same field values (and the registry's checks)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return DPOPlusConfig(**values)


class DPOPlusTrainer(_trl_dpo.DPOTrainer):
    """TRL's [`~trl.DPOTrainer`], with `loss_type` taken from the trl_dpo_plus loss registry.

    Arguments are exactly TRL's. Differences in behaviour:
    - any registered loss (or weighted list of losses) can be used, with per-loss hyperparameters from
      `DPOPlusConfig.loss_kwargs`;
    - when every selected loss is reference-free, no reference model is loaded and no reference forward runs;
    - the dataset is checked before tokenization (missing columns, non-string fields, empty or identical pairs);
    - extra per-pair statistics are logged under `dpo_plus/` next to TRL's `rewards/*`, `logps/*`, `logits/*`;
    - pairs are laid out with the prompt computed once, packed without padding, and the LM head run at completion
      tokens only (`pair_layout`, see `trl_dpo_plus.layout`); `layout`, `layout_reason` and `layout_check` say which
      layout runs, why, and how it compared with the padded forward on the first batch;
    - pairs dropped or truncated by `max_length` are counted per split (`truncation_counts`) and logged;
    - unpaired thumbs-up/down rows (`prompt`, `completion`, `label`) train with the unpaired losses (`kto`,
      `apo_zero_unpaired`) exactly as `trl.KTOTrainer` trains them, in the same layouts and with the same
      diagnostics (`data_kind`, `label_counts`).
    """

    _tag_names = ["trl", "dpo", "trl-dpo-plus"]
    instances_created = 0  # read by `trl-dpo-plus run` to check that a script really used this trainer

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *pos_args, **kwargs):
        """Same arguments as `trl.DPOTrainer`; a TRL `DPOConfig` is converted to a `DPOPlusConfig`."""
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = DPOPlusConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-DPO")
        elif not isinstance(args, DPOPlusConfig):
            args = _as_plus_config(args)
        self.loss_specs = [get_loss(name) for name in args.loss_type]
        self.loss_kwargs = [args.loss_kwargs_for(name) for name in args.loss_type]
        self.requires_reference = args.requires_reference
        self.requires_kl = any(spec.requires_kl for spec in self.loss_specs)
        self.data_kind = args.data_kind  # "paired" or "unpaired", the same for every selected loss (checked in config)
        if self.data_kind == "unpaired":  # what TRL's KTO preparation reads (see `_prepare_unpaired`)
            self.calculate_KL = self.requires_kl
            weights = next((kw for kw in self.loss_kwargs if "desirable_weight" in kw), {})
            self.desirable_weight = weights.get("desirable_weight", 1.0)
            self.undesirable_weight = weights.get("undesirable_weight", 1.0)

        # Positional arguments as in TRL's signature, so that they can be read and replaced by name
        if len(pos_args) > len(_TRL_INIT_ARGS):
            raise TypeError(f"DPOPlusTrainer takes at most {3 + len(_TRL_INIT_ARGS)} positional arguments")
        kwargs.update(zip(_TRL_INIT_ARGS, pos_args))

        # The datasets are checked on the raw text, before TRL tokenizes them and before any model is loaded
        def check(dataset, name):
            return check_preference_dataset(dataset, name=name, drop_degenerate=args.drop_degenerate_pairs,
                                            kind=self.data_kind, losses=list(args.loss_type), unpair=args.unpair,
                                            seed=args.seed)

        if kwargs.get("train_dataset") is not None:
            kwargs["train_dataset"] = check(kwargs["train_dataset"], "train")
        eval_dataset = kwargs.get("eval_dataset")
        if isinstance(eval_dataset, dict):
            kwargs["eval_dataset"] = {key: check(ds, key) for key, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            kwargs["eval_dataset"] = check(eval_dataset, "eval")

        if args.qlora or args.lora:
            model, kwargs["peft_config"], kwargs["quantization_config"] = prepare_adapter_training(
                model, args, kwargs.get("peft_config"), kwargs.get("quantization_config")
            )

        if isinstance(model, str) and looks_like_local_path(model) and not os.path.exists(os.path.expanduser(model)):
            raise FileNotFoundError(
                f"Model path {model!r} does not exist. Give an existing local folder, or a Hub id such as "
                "'Qwen/Qwen2.5-0.5B-Instruct'."
            )
        self.layout = PaddedPairLayout()
        self.layout_reason = "not chosen yet"
        self._layout_installed = False
        self._layout_verified = False
        self._reference_hashes: dict[str, str] | None = None
        self.reference_forwards = {"batches": 0, "rows": 0}  # reference forwards run by this trainer (see compare)
        self.layout_check: dict | None = None  # the shared-prefix layout's first-batch check against the padded one
        self._user_collator = kwargs.get("data_collator") is not None
        self._has_compute_metrics = kwargs.get("compute_metrics") is not None
        raw_sizes = {"train": _size(kwargs.get("train_dataset"))}
        if isinstance(kwargs.get("eval_dataset"), dict):
            raw_sizes.update({key: _size(ds) for key, ds in kwargs["eval_dataset"].items()})
        else:
            raw_sizes["eval"] = _size(kwargs.get("eval_dataset"))
        with self._no_reference_model_loaded(model, ref_model):
            super().__init__(model, ref_model, args, **kwargs)
        sorted_across_batch = sorted({"aot", "aot_unpaired"} & set(args.loss_type))
        if sorted_across_batch and self.accelerator.num_processes > 1:
            raise ValueError(
                f"{sorted_across_batch} sort the log-ratios across the batch, and with {self.accelerator.num_processes} "
                "processes each would sort only its own pairs, which is a different loss than on one process. Train "
                "them on one process (raise per_device_train_batch_size or gradient_accumulation_steps for the same "
                "batch), or choose a per-pair loss such as 'sigmoid'."
            )
        self._install_layout()
        self.label_counts = self._count_labels()
        token_ids = self._token_id_tables()
        self.truncation_counts = self._count_truncation(raw_sizes, token_ids)
        self._counts_logged = False
        self._check_token_ids(token_ids)
        DPOPlusTrainer.instances_created += 1
        self._pair_stats = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.last_pair_statistics: dict[str, torch.Tensor] = {}
        self._add_diagnostics(args)
        if args.console_log == "compact":
            install_compact_console(self)

    def _add_diagnostics(self, args: DPOPlusConfig) -> None:
        """The default diagnostics callbacks (unless the user passed their own of a kind), and the report writer."""
        given = {type(cb) for cb in self.callback_handler.callbacks}
        if args.diagnostics:
            for callback in default_callbacks(action=args.diagnostics_action):
                if type(callback) not in given:
                    self.add_callback(callback)
        if self.diagnostics and DiagnosticsReportCallback not in given:
            self.add_callback(DiagnosticsReportCallback())
        if self.data_kind == "unpaired":  # the statistics' chosen/rejected are the desirable/undesirable rows
            for callback in self.diagnostics:
                callback.sides = ("desirable", "undesirable")

    @property
    def diagnostics(self) -> list[DiagnosticCallback]:
        """The diagnostics callbacks in use (looked up each time: a resume may replace callback objects)."""
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, DiagnosticCallback)]

    def _load_callback_state(self) -> None:
        """On resume, restore the diagnostics callbacks' state from the checkpoint (in place), whatever
        `restore_callback_states_from_checkpoint` says for other callbacks: a resumed run must raise the same flags."""
        super()._load_callback_state()
        if self.args.restore_callback_states_from_checkpoint:
            return  # Transformers rebuilt every stateful callback, ours included
        stored = self.state.stateful_callbacks or {}
        for callback in self.diagnostics:
            data = stored.get(type(callback).__name__)
            data = data[0] if isinstance(data, list) else data
            if data and "saved_state" in data.get("attributes", {}):
                callback.saved_state = data["attributes"]["saved_state"]
                logger.info("Resumed %s from the checkpoint (step %s)", type(callback).__name__, callback._last_step)

    def train(self, *args, **kwargs):
        """`Trainer.train`; if it raises, the diagnostics report is still written from what was logged, marked
        `interrupted` with the error, before the exception goes on."""
        try:
            return super().train(*args, **kwargs)
        except BaseException as err:
            if self.diagnostics and self.is_world_process_zero():
                try:
                    write_report(self.state.log_history, self.args.output_dir,
                                 interrupted=f"{type(err).__name__}: {err}"[:500])
                except Exception as report_error:  # never mask the training error
                    logger.warning("Could not write the diagnostics report after the error: %s", report_error)
            raise

    @contextlib.contextmanager
    def _no_reference_model_loaded(self, model, ref_model):
        """For reference-free losses, keep TRL's `__init__` from loading a reference copy of the policy.

        TRL builds the reference with `create_model_from_path` after the policy (which it builds with the same
        function only when `model` is a path). Every call after the policy's returns `None`, so `self.ref_model`
        stays `None` and nothing is loaded, not even briefly.
        """
        if self.requires_reference or ref_model is not None:
            yield
            return
        policy_calls_left = [1 if isinstance(model, str) else 0]
        create = _trl_dpo.create_model_from_path

        def create_policy_only(*args, **kwargs):
            if policy_calls_left[0] > 0:
                policy_calls_left[0] -= 1
                return create(*args, **kwargs)
            logger.info("Reference-free loss %s: no reference model is loaded", [s.name for s in self.loss_specs])
            return None

        with mock.patch.object(_trl_dpo, "create_model_from_path", create_policy_only):
            yield

    # -- the pair layout: shared-prefix where it is exact, else TRL's padded batch ---------------------------------
    def _shared_prefix_blocker(self) -> str | None:
        """Why the shared-prefix layout cannot be exact for this model and setup, or `None` when it can."""
        model = self.accelerator.unwrap_model(self.model)
        config = model.config.get_text_config()
        attn = getattr(model.config, "_attn_implementation", None)
        window = getattr(config, "sliding_window", None)
        if self._is_vision_dataset:
            return "vision-language data"
        if self._user_collator:
            return "a data_collator was passed to the trainer"
        if self._has_compute_metrics:
            return "compute_metrics needs the padded logits"
        if attn not in ("sdpa", "eager"):
            return f"attn_implementation={attn!r} cannot take a custom 4D attention mask (sdpa and eager can)"
        if window is not None and getattr(config, "use_sliding_window", True) and (
            self.args.max_length is None or self.args.max_length > window
        ):
            return f"sliding-window attention (window {window}) with sequences up to max_length={self.args.max_length}"
        if self.aux_loss_enabled:
            return "the MoE load-balancing loss needs a 2D attention mask"
        if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
            return "prompt-learning PEFT prepends virtual tokens"
        return None

    def _install_layout(self) -> None:
        """Choose the layout once (`args.pair_layout`) and install its collator; say why when it is not the default.

        Unpaired rows go through the same layouts: the completion takes the chosen branch and the KL completion (another
        row's completion, for KTO's baseline) the rejected one (`UnpairedCollator`)."""
        if self._layout_installed:
            return
        self._layout_installed = True
        self.layout, self.layout_reason, collator = self._choose_layout()
        if collator is not None:
            self.data_collator = collator
        if self.data_kind == "unpaired" and not self._user_collator:
            self.data_collator = UnpairedCollator(self.data_collator)

    def _choose_layout(self):
        """`(layout, reason, collator or None to keep TRL's)`."""
        args = self.args
        blocker = self._shared_prefix_blocker() if args.pair_layout != "padded" else None
        if args.pair_layout == "shared_prefix" and blocker:
            raise ValueError(f"pair_layout='shared_prefix' is not exact here: {blocker}. Use pair_layout='auto' or 'padded'.")
        if args.pair_layout == "padded" or blocker:
            if blocker:
                logger.info("Pair layout: padded (TRL's), because %s", blocker)
            collator = None
            if args.truncation_mode == "keep_completions" and not self._user_collator:
                collator = PaddedPairCollator(
                    pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
                    pad_to_multiple_of=args.pad_to_multiple_of,
                )
            return PaddedPairLayout(), "pair_layout='padded'" if args.pair_layout == "padded" else blocker, collator
        collator = SharedPrefixCollator(
            pad_token_id=self._tokenizer.pad_token_id, max_length=args.max_length,
            truncation_mode=args.truncation_mode, packing_length=args.packing_budget,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )
        return SharedPrefixLayout(), "exact for this model (sdpa/eager attention, no sliding window)", collator

    @property
    def token_id_columns(self) -> tuple[str, ...]:
        """The prepared token-id columns: the pair's, or the unpaired row's (the KL completion only for KTO)."""
        if self.data_kind == "paired":
            return TOKEN_ID_COLUMNS
        return UNPAIRED_TOKEN_ID_COLUMNS if self.calculate_KL else UNPAIRED_TOKEN_ID_COLUMNS[:2]

    def _count_labels(self) -> dict[str, int] | None:
        """Desirable and undesirable rows of the prepared (map-style) unpaired train split."""
        if self.data_kind != "unpaired" or not isinstance(self.train_dataset, Dataset):
            return None
        labels = self.train_dataset.with_format("arrow")["label"]
        desirable = int(pc.sum(labels.cast("int64")).as_py() or 0)
        return {"desirable": desirable, "undesirable": len(labels) - desirable}

    def _token_id_tables(self) -> dict:
        """Per prepared map-style split, its `prompt_ids`/`chosen_ids`/`rejected_ids` as one Arrow table, read once
        through TRL's filter's indices (streamed splits are not known up front)."""
        datasets = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            datasets.update(self.eval_dataset)
        elif self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
        columns = list(self.token_id_columns)
        return {name: ds.select_columns(columns).with_format("arrow")[:]
                for name, ds in datasets.items() if isinstance(ds, Dataset) and "prompt_ids" in ds.column_names}

    def _check_token_ids(self, tables: dict) -> None:
        """Token ids the model's embedding has no row for (a tokenizer with added tokens and no resize) fail here, at
        preparation, naming the token and the fix, not with an IndexError at step 1."""
        embeddings = self.accelerator.unwrap_model(self.model).get_input_embeddings()
        size = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
        for name, table in tables.items():
            for column in table.column_names:
                values = pc.list_flatten(table.column(column))
                if len(values) == 0:
                    continue
                top = pc.max(values).as_py()
                if top is not None and top >= size:
                    token = self._tokenizer.convert_ids_to_tokens(int(top))
                    raise ValueError(
                        f"The {name} dataset has token id {top} ({token!r}) in {column!r}, but the model's embedding has "
                        f"{size} rows (ids 0..{size - 1}). The tokenizer has tokens the model does not: call "
                        "model.resize_token_embeddings(len(tokenizer)) before training, or use the model's own tokenizer."
                    )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation (DPO's for pairs, KTO's for unpaired rows); when `max_length` leaves nothing of a dataset,
        a clear error instead of `num_samples=0` at the first step (or an evaluation on nothing)."""
        prepare = self._prepare_unpaired if self.data_kind == "unpaired" else super()._prepare_dataset
        if self.data_kind == "unpaired" and args.truncation_mode != "keep_start":
            args = _without_filter(args)  # the other modes keep every row (TRL's KTO drops under any mode)
        prepared = prepare(dataset, processing_class, args, dataset_name)
        if isinstance(prepared, Dataset) and len(prepared) == 0 and isinstance(dataset, Dataset) and len(dataset) > 0:
            lengths = sorted(len(ids) for ids in prepare(
                dataset, processing_class, _without_filter(args), dataset_name)["prompt_ids"])
            pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
            raise ValueError(
                f"Every one of the {len(dataset)} {'pairs' if self.data_kind == 'paired' else 'rows'} of the "
                f"{dataset_name} dataset was dropped: its prompt alone "
                f"fills max_length={args.max_length} tokens (prompt length p10/p50/p90/max: {pick(0.1)}/{pick(0.5)}/"
                f"{pick(0.9)}/{lengths[-1]}). Raise max_length above the prompt lengths, or set "
                "truncation_mode='keep_completions' to cut the prompt's start instead."
            )
        return prepared

    def _prepare_unpaired(self, dataset, processing_class, args, dataset_name):
        """Unpaired rows prepared exactly as TRL's `KTOTrainer` prepares them (its own method, run on this trainer):
        EOS appended to plain-text completions, `prompt_ids`/`completion_ids` tokenized, rows whose prompt fills
        `max_length` dropped, `KL_completion_ids` (each row's neighbour's completion within blocks of
        `per_device_train_batch_size`) when a loss has a KL term, and TRL's warning when λD·nD / λU·nU is off."""
        return _trl_kto.KTOTrainer._prepare_dataset(self, dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        """TRL's columns, plus the unpaired rows' (`remove_unused_columns` would drop them)."""
        super()._set_signature_columns_if_needed()
        if self.data_kind == "unpaired" and not set(UNPAIRED_COLUMNS) <= set(self._signature_columns):
            self._signature_columns = [*self._signature_columns, *UNPAIRED_COLUMNS]

    def _count_truncation(self, raw_sizes: dict[str, int | None], tables: dict) -> dict[str, dict[str, int]]:
        """Per split: pairs kept, pairs TRL's preparation dropped (prompt alone fills `max_length` under
        `keep_start`), and kept pairs that `max_length` truncates; logged once per split that loses anything."""
        counts = {}
        max_length, mode = self.args.max_length, self.args.truncation_mode
        for name, table in tables.items():
            if raw_sizes.get(name) is None:
                continue
            # Paired: the longer completion decides; unpaired: the completion itself (not the KL completion)
            lengths = [pc.list_value_length(table.column(c)).to_numpy() for c in self.token_id_columns]
            longest = np.maximum(lengths[1], lengths[2]) if self.data_kind == "paired" else lengths[1]
            truncated = 0 if max_length is None else int((lengths[0] + longest > max_length).sum())
            dropped = raw_sizes[name] - table.num_rows
            counts[name] = {"pairs": table.num_rows, "dropped": dropped, "truncated": truncated}
            if not (dropped or truncated):
                continue
            unit = "pairs" if self.data_kind == "paired" else "rows"
            what = "with their prompt cut at the start" if mode == "keep_completions" else "truncated"
            message = f"{name} dataset, max_length={max_length}: {truncated} of {table.num_rows} {unit} {what}"
            if dropped:
                message += (f"; {dropped} of {raw_sizes[name]} {unit} dropped because the prompt alone fills max_length. "
                            f"truncation_mode='keep_completions' keeps every {unit[:-1]} (it cuts the prompt's start, "
                            "identically for both completions); a larger max_length keeps more")
            logger.warning(message)
        return counts

    @contextlib.contextmanager
    def completion_only_lm_head(self):
        """Have TRL's fused LM head score only the labelled positions, on every device.

        TRL's fused forward does so on Triton devices and scores every position elsewhere (a fixed tile shape avoids
        recompilation on Neuron). In eager PyTorch the compact path is the same arithmetic on fewer rows, so on the
        CPU the vocabulary projection runs at the completion tokens only.
        """
        with mock.patch.object(_trl_utils, "_use_triton", lambda device: True):
            yield

    @contextlib.contextmanager
    def reference_context(self, model):
        """What TRL's `compute_ref_log_probs` runs the reference forward under: no gradient, no checkpointing, the
        adapter disabled (or the 'ref' adapter) when the reference is the PEFT model's base, and autocast."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = _trl_utils.use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
            self.accelerator.autocast(),
        ):
            yield

    def padded_reference_logps(self, model, inputs):
        """TRL's reference forward of a padded batch."""
        return super().compute_ref_log_probs(model, inputs)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs `(chosen, rejected)` of one batch, in whichever layout it was collated (counted in
        `reference_forwards`)."""
        layout = self.layout if "pair_ids" in inputs else PaddedPairLayout()
        chosen, rejected = layout.reference_logps(self, model, inputs)
        self.reference_forwards["batches"] += 1
        self.reference_forwards["rows"] += chosen.shape[0]
        return chosen, rejected

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute, collated in this run's layout; with `reference_cache_dir`, read from the cache when the
        fingerprint matches and written to it otherwise."""
        self._install_layout()  # TRL precomputes inside its __init__: collate as training will
        if self.args.reference_cache_dir is None or not isinstance(dataset, Dataset):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        cache = ReferenceCache(self.args.reference_cache_dir)
        fingerprint = self.reference_fingerprint(dataset)
        cached = cache.load(fingerprint, len(dataset))
        if cached is not None:
            logger.info("Reference log-probs of the %s split (%d rows) read from %s: no reference forward", name,
                        len(dataset), cache.path(fingerprint))
            columns = Dataset.from_dict({"ref_chosen_logps": cached["chosen"].numpy(),
                                         "ref_rejected_logps": cached["rejected"].numpy()})
            return concatenate_datasets([dataset, columns], axis=1)
        closest = cache.closest(fingerprint, name)
        logger.info("Computing reference log-probs of the %s split (%d rows) once, cached in %s%s", name, len(dataset),
                    cache.directory, "" if closest is None else
                    f" (no cached entry matches; the closest, {closest[0].name}, was computed for another "
                    f"{', '.join(closest[1])})")
        prepared = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            values = prepared.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).with_format("torch")[:]
            cache.save(fingerprint, name, values["ref_chosen_logps"], values["ref_rejected_logps"])
        self.accelerator.wait_for_everyone()
        return prepared

    def reference_fingerprint(self, dataset: Dataset) -> Fingerprint:
        """What a prepared split's reference log-probs depend on (see `trl_dpo_plus.reference_cache`); rank 0's value
        on every process."""
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError("reference_cache_dir cannot fingerprint a ZeRO-3 model (its weights are sharded across "
                             "processes). Drop reference_cache_dir; precompute_ref_log_probs still runs the reference "
                             "once per run.")
        if self._reference_hashes is None:  # the same for every split: hashed once
            if self.ref_model is not None:
                reference, keep_adapters = self.accelerator.unwrap_model(self.ref_model), True
            else:  # the policy itself before training, or a PEFT model's base (its 'ref' adapter when it has one)
                reference = self.accelerator.unwrap_model(self.model)
                keep_adapters = not is_peft_model(reference) or "ref" in reference.peft_config
            self._reference_hashes = {"reference_weights": weights_fingerprint(reference, keep_adapters=keep_adapters),
                                      "tokenizer": tokenizer_fingerprint(self.processing_class)}
        args = self.args
        precision = f"bf16={args.bf16},fp16={args.fp16},mixed_precision={self.accelerator.mixed_precision}"
        components = {
            **self._reference_hashes,
            "dataset": token_ids_fingerprint(dataset.select_columns(list(self.token_id_columns)).with_format("arrow")[:]),
            "truncation": f"max_length={args.max_length},truncation_mode={args.truncation_mode}",
            "layout": f"{type(self.layout).__name__},{precision}",
        }
        shared = [components]
        broadcast_object_list(shared, from_process=0)
        return Fingerprint(shared[0])

    def _verify_layout(self, model, inputs) -> None:
        """Once, on the first batch: the shared-prefix forward must equal the padded forward of the same pairs.

        Models that rebuild their own attention mask or ignore `position_ids` fail this; then the run goes on in the
        padded layout (rebuilt from the same batches) with a warning, or raises if `pair_layout='shared_prefix'`.
        """
        self._layout_verified = True
        unwrapped = self.accelerator.unwrap_model(model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            _dropout_off(unwrapped),  # not eval(): bitsandbytes repacks 4-bit weights for its CPU inference kernel
        ):
            padded = PaddedPairLayout().policy_forward(self, model, unpack_to_padded(inputs, self.pad_token_id))
            failure = None
            try:
                shared = self.layout.policy_forward(self, model, inputs)
            except Exception as err:  # a model that builds its own mask from a 2D one (e.g. Bloom's ALiBi)
                failure = f"{type(err).__name__}: {err}"
        # Half precision (bf16/fp16 weights or autocast, also when `accelerate launch` sets it) rounds a log-prob of
        # -15 by up to ~0.06, so there the bound grows with the log-prob's size; a wrong mask is off by whole nats.
        half = (self.args.bf16 or self.args.fp16 or self.accelerator.mixed_precision in ("bf16", "fp16")
                or unwrapped.get_input_embeddings().weight.dtype != torch.float32)
        tolerance, relative = (5e-2, 1e-2) if half else (1e-4, 0.0)
        error, excess = torch.tensor(float("inf")), torch.tensor(float("inf"))
        if failure is None and torch.equal(shared.lengths, padded.lengths):
            theirs = padded_tokens(padded)
            width = min(theirs.size(1), shared.mask.size(1))
            mask = shared.mask[:, :width]
            diff = (shared.per_token_logps[:, :width] - theirs[:, :width]).abs() * mask
            error = diff.max()
            excess = (diff - relative * theirs[:, :width].abs() * mask).max()
        error, excess = self.accelerator.gather(torch.stack([error, excess]).float().reshape(1, 2).to(
            self.accelerator.device)).max(dim=0).values.tolist()
        self.layout_check = {"max_abs_token_logp_error": error, "tolerance": tolerance, "relative_tolerance": relative}
        if excess <= tolerance:
            logger.info("Pair layout: shared_prefix, checked on the first batch (per-token log-prob error %.1e)", error)
            return
        if failure is not None:
            reason = f"the model's forward fails with a 4D attention mask ({failure[:200]})"
        else:
            reason = (f"its per-token log-probs differ from the padded forward by up to {error:.3g} on the first batch "
                      "(the model does not honour a custom 4D attention mask with position_ids)")
        if self.args.pair_layout == "shared_prefix":
            raise RuntimeError(f"pair_layout='shared_prefix' is not exact for this model: {reason}. Use pair_layout='padded'.")
        logger.warning("Pair layout: falling back to padded (TRL's), because %s", reason)
        self.layout = UnpackedPaddedLayout(self.pad_token_id)
        self.layout_reason = reason

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    # -- the loss path: the one override of TRL's private method ------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        if isinstance(self.layout, SharedPrefixLayout) and not self._layout_verified:
            self._verify_layout(model, inputs)
        forward = self.layout.policy_forward(self, model, inputs)
        if self.data_kind == "unpaired":
            loss = self._unpaired_loss(mode, inputs, forward)
        else:
            loss = self._paired_loss(mode, inputs, forward)

        if self.aux_loss_enabled:
            aux_loss = forward.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        if return_outputs:  # deprecated in TRL: the fused LM head builds no logits, so recompute them
            padded = inputs if "pair_ids" not in inputs else unpack_to_padded(inputs, self.pad_token_id)
            with torch.no_grad():
                outputs = model(**{k: v for k, v in padded.items() if k not in NON_MODEL_KEYS})
            return loss, outputs
        return loss

    def _reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's reference log-probs (both branches): precomputed, or from the reference forward now."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model or self.model, inputs)

    def _record_finite(self, loss, forward: PolicyForward, reference: torch.Tensor | None) -> None:
        for callback in self.diagnostics:
            if isinstance(callback, NonFiniteCallback):
                callback.record(loss if torch.is_tensor(loss) else torch.tensor(loss), forward.logps, reference)

    def _unpaired_loss(self, mode: str, inputs, forward: PolicyForward):
        """KTO-style loss of B unpaired completions; the layout's second branch holds each row's KL completion."""
        logps, kl_logps = forward.logps.chunk(2, dim=0)
        lengths = forward.lengths.chunk(2, dim=0)[0]
        labels = inputs["label"].bool()
        ref_logps = ref_kl_logps = kl = None
        if self.requires_reference:
            ref_logps, ref_kl_logps = self._reference_logps(inputs)
            if self.calculate_KL:  # z0: the mismatched pairs' mean log-ratio over every process's rows, detached
                sums = torch.stack([(kl_logps.detach() - ref_kl_logps).sum(),
                                    torch.tensor(float(kl_logps.numel()), device=kl_logps.device)])
                sums = self.accelerator.reduce(sums, reduction="sum")
                kl = sums[0] / sums[1]
        batch = UnpairedBatch(logps=logps, lengths=lengths, labels=labels, ref_logps=ref_logps, kl=kl)
        loss = 0.0
        loss_outputs = []
        for spec, loss_kwargs, loss_weight in zip(self.loss_specs, self.loss_kwargs, self.loss_weights, strict=True):
            out = spec(batch, **loss_kwargs)
            loss += out.losses.mean() * loss_weight
            loss_outputs.append(out)
        if mode == "train":
            self._record_finite(loss, forward, torch.cat([ref_logps, ref_kl_logps]) if batch.has_reference else None)
        self._log_unpaired_metrics(mode, inputs, forward, batch, loss_outputs)
        return loss

    def _paired_loss(self, mode: str, inputs, forward: PolicyForward):
        chosen_logps, rejected_logps = forward.logps.chunk(2, dim=0)
        chosen_lengths, rejected_lengths = forward.lengths.chunk(2, dim=0)

        ref_chosen_logps = ref_rejected_logps = chosen_scores = rejected_scores = chosen_kl = rejected_kl = None
        if self.requires_reference:
            ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)
            chosen_logratios = chosen_logps - ref_chosen_logps
            rejected_logratios = rejected_logps - ref_rejected_logps
            if self.f_divergence_type != "reverse_kl":
                chosen_scores = f_divergence_scores(chosen_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)
                rejected_scores = f_divergence_scores(
                    rejected_logratios, self.f_divergence_type, self.f_alpha_divergence_coef
                )
            if self.requires_kl:  # batch-level baselines over every process's pairs
                sums = torch.stack(
                    [chosen_logratios.detach().sum(), rejected_logratios.detach().sum()]
                    + [torch.tensor(float(chosen_logps.numel()), device=chosen_logps.device)]
                )
                sums = self.accelerator.reduce(sums, reduction="sum")
                chosen_kl, rejected_kl = sums[0] / sums[2], sums[1] / sums[2]

        chosen_tokens = None
        if self.accelerator.num_processes > 1:  # token-mean terms (sft, rpo) over the global batch
            chosen_tokens = self.accelerator.reduce(chosen_lengths.sum().float().detach(), reduction="mean")
        batch = PreferenceBatch(
            chosen_tokens=chosen_tokens,
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            chosen_nll=forward.nll.chunk(2, dim=0)[0],
            chosen_scores=chosen_scores,
            rejected_scores=rejected_scores,
            chosen_kl=chosen_kl,
            rejected_kl=rejected_kl,
        )

        weights = self._wpo_weights(forward) if self.use_weighting else None
        loss = 0.0
        loss_outputs = []
        for spec, loss_kwargs, loss_weight in zip(self.loss_specs, self.loss_kwargs, self.loss_weights, strict=True):
            out = spec(batch, **loss_kwargs)
            per_sequence_loss = out.losses if weights is None else out.losses * weights
            loss += per_sequence_loss.mean() * loss_weight
            loss_outputs.append(out)

        if mode == "train":
            self._record_finite(loss, forward,
                                torch.cat([ref_chosen_logps, ref_rejected_logps]) if batch.has_reference else None)
        self._log_metrics(mode, inputs, forward, batch, loss_outputs)
        return loss

    def _wpo_weights(self, forward: PolicyForward) -> torch.Tensor:
        """WPO weights (https://arxiv.org/abs/2406.11827 Eq. 2), as TRL computes them, one per pair."""
        with torch.no_grad():
            aligned = (forward.per_token_logps - forward.log_sum_sq_probs) * forward.mask
        weights = torch.exp(per_token(aligned.sum(dim=1), forward.lengths))
        chosen_weights, rejected_weights = weights.chunk(2, dim=0)
        return chosen_weights * rejected_weights

    # -- metrics: TRL's names, plus per-pair statistics under `dpo_plus/` ---------------------------------------
    def _global_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float | None:
        """Mean of `values` where `mask` is set, over every process; `None` where nothing is set."""
        gather = self.accelerator.gather_for_metrics
        total = gather(values[mask].float().sum()).sum().item()
        count = gather(mask.sum()).sum().item()
        return total / count if count > 0 else None

    def _log_token_metrics(self, mode, forward: PolicyForward, num_tokens: torch.Tensor, first: torch.Tensor,
                           second: torch.Tensor) -> None:
        """TRL's token-level metrics: entropy, `num_tokens`, `logits/chosen|rejected` over the rows in `first` and
        `second` (`(2B,)` masks), `mean_token_accuracy` over the `first` rows."""
        metrics = self._metrics[mode]
        mask = forward.mask.bool()
        rows = (first | second).unsqueeze(1)
        metrics["entropy"].append(self._global_mean(forward.entropy.detach(), mask & rows) or 0.0)
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather(num_tokens.reshape(1)).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for side, side_rows in (("chosen", first), ("rejected", second)):
            mean = self._global_mean(forward.mean_logits, mask & side_rows.unsqueeze(1))
            if mean is not None or self.data_kind == "paired":
                metrics[f"logits/{side}"].append(mean or 0.0)
        accuracy = self._global_mean(forward.is_top1, mask & first.unsqueeze(1))
        metrics["mean_token_accuracy"].append(accuracy or 0.0)

    def _log_loss_metrics(self, mode, loss_outputs) -> None:
        """Each loss's own value (when several are mixed) and its extra metrics, under `dpo_plus/<loss>/`."""
        gather = self.accelerator.gather_for_metrics
        for spec, out in zip(self.loss_specs, loss_outputs):
            if len(loss_outputs) > 1:
                self._metrics[mode][f"{METRIC_PREFIX}/loss/{spec.name}"].append(
                    gather(out.losses.detach().mean()).mean().item())
            for key, value in out.metrics.items():
                self._metrics[mode][f"{METRIC_PREFIX}/{spec.name}/{key}"].append(
                    gather(value.detach().float().mean()).mean().item())

    def _log_unpaired_metrics(self, mode, inputs, forward: PolicyForward, batch: UnpairedBatch, loss_outputs):
        """TRL's KTO metrics (`rewards/chosen` is the desirable completions' mean reward, `rewards/rejected` the
        undesirable ones', `kl` the baseline z0), plus per-label statistics under `dpo_plus/`. `rewards/accuracies`
        is the share of completions whose reward has their label's sign (above the reference when desirable, below
        when undesirable); the diagnostics read that signed reward as the per-row margin."""
        metrics = self._metrics[mode]
        labels, padding = batch.labels, torch.zeros_like(batch.labels)
        # The completion rows' tokens, as TRL's KTO counts them (the KL completions are not counted)
        if "unpack_index" in inputs:
            num_tokens = (inputs["unpack_index"][: labels.numel()] >= 0).sum()
        else:
            num_tokens = inputs["attention_mask"][: labels.numel()].sum()
        self._log_token_metrics(mode, forward, num_tokens, torch.cat([labels, padding]), torch.cat([~labels, padding]))

        gather = self.accelerator.gather
        labels = gather(labels)
        rewards = gather(loss_outputs[0].rewards).float()
        logps = gather(batch.logps.detach()).float()
        lengths = gather(batch.lengths.float())
        signed = torch.where(labels, rewards, -rewards)
        for side, rows in (("chosen", labels), ("rejected", ~labels)):
            if rows.any():
                metrics[f"rewards/{side}"].append(rewards[rows].mean().item())
                metrics[f"logps/{side}"].append(logps[rows].mean().item())
        if labels.any() and not labels.all():
            metrics["rewards/margins"].append(rewards[labels].mean().item() - rewards[~labels].mean().item())
        metrics["rewards/accuracies"].append((signed > 0).float().mean().item())
        kl = next((out.metrics["kl"] for out in loss_outputs if "kl" in out.metrics), None)
        if kl is not None:
            metrics["kl"].append(kl.item())

        # Per-row statistics for diagnostics, split by label: "chosen" = desirable, "rejected" = undesirable
        rows = {"{}_logp_per_token": per_token(logps, lengths)}
        if batch.has_reference:
            rows["ref_{}_logp_per_token"] = per_token(gather(batch.ref_logps.detach()).float(), lengths)
            rows["{}_logratio_per_token"] = rows["{}_logp_per_token"] - rows["ref_{}_logp_per_token"]
        self._pair_stats[mode]["margin"].append(signed.cpu())
        for key, value in rows.items():
            for side, label, mask in (("chosen", "desirable", labels), ("rejected", "undesirable", ~labels)):
                self._pair_stats[mode][key.format(side)].append(value[mask].cpu())
                if mask.any():
                    metrics[f"{METRIC_PREFIX}/{key.format(label)}"].append(value[mask].mean().item())
        self._log_loss_metrics(mode, loss_outputs)

    def _log_metrics(self, mode, inputs, forward: PolicyForward, batch: PreferenceBatch, loss_outputs):
        metrics = self._metrics[mode]
        chosen_rows = torch.arange(forward.mask.size(0), device=forward.mask.device) < batch.chosen_logps.numel()
        self._log_token_metrics(mode, forward, forward.num_tokens, chosen_rows, ~chosen_rows)

        # Rewards as the first loss defines them (β·Δ for reference-based losses, like TRL)
        first = loss_outputs[0]
        chosen_rewards = self.accelerator.gather(first.chosen_rewards)
        rejected_rewards = self.accelerator.gather(first.rejected_rewards)
        margins = chosen_rewards - rejected_rewards
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append(margins.mean().item())
        chosen_logps = self.accelerator.gather(batch.chosen_logps.detach())
        rejected_logps = self.accelerator.gather(batch.rejected_logps.detach())
        metrics["logps/chosen"].append(chosen_logps.mean().item())
        metrics["logps/rejected"].append(rejected_logps.mean().item())

        # Per-pair statistics for diagnostics: per-token log-probs and log-ratios, lengths, margins
        chosen_len = self.accelerator.gather(batch.chosen_lengths.float())
        rejected_len = self.accelerator.gather(batch.rejected_lengths.float())
        pairs = {
            "margin": margins.float(),
            "chosen_len": chosen_len,
            "rejected_len": rejected_len,
            "chosen_logp_per_token": per_token(chosen_logps.float(), chosen_len),
            "rejected_logp_per_token": per_token(rejected_logps.float(), rejected_len),
        }
        if batch.has_reference:
            ref_chosen = self.accelerator.gather(batch.ref_chosen_logps.detach()).float()
            ref_rejected = self.accelerator.gather(batch.ref_rejected_logps.detach()).float()
            pairs["ref_chosen_logp_per_token"] = per_token(ref_chosen, chosen_len)
            pairs["ref_rejected_logp_per_token"] = per_token(ref_rejected, rejected_len)
            pairs["chosen_logratio_per_token"] = pairs["chosen_logp_per_token"] - pairs["ref_chosen_logp_per_token"]
            pairs["rejected_logratio_per_token"] = pairs["rejected_logp_per_token"] - pairs["ref_rejected_logp_per_token"]
        for key, value in pairs.items():
            self._pair_stats[mode][key].append(value.cpu())
            if key != "margin":
                metrics[f"{METRIC_PREFIX}/{key}"].append(value.mean().item())

        self._log_loss_metrics(mode, loss_outputs)

    # -- Hub-ready output: a card that says how the model was trained -------------------------------------------
    def create_model_card(self, model_name=None, dataset_name=None, tags=None, output_dir=None):
        """Write `README.md` into `output_dir` (default `args.output_dir`): losses, hyperparameters, reference mode,
        quantisation, LoRA, training summary and diagnostics (see `trl_dpo_plus.hub.build_model_card`)."""
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else tags
        card = build_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, output_dir=output_dir)
        card.save(os.path.join(output_dir or self.args.output_dir, "README.md"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call:  # push_to_hub and checkpoints write their own card
            self.create_model_card(output_dir=output_dir)

    def end(self):
        """Finish the trackers and destroy the process group, once every process got here.

        The main process writes the diagnostics report at the end of training and the model card after saving, while
        the others move on; tearing the group down under it aborted the other rank (`terminate called without an
        active exception`, about 1 run in 6 with two CPU processes here), so all ranks meet first.
        """
        self.accelerator.wait_for_everyone()
        super().end()

    def pair_statistics(self, mode: str = "train") -> dict[str, torch.Tensor]:
        """Per-pair statistics gathered since the last log, concatenated: what diagnostics callbacks read."""
        return {key: torch.cat(values) for key, values in self._pair_stats[mode].items() if values}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train" and not self._counts_logged:  # once: trackers get the data's losses too
            self._counts_logged = True
            for split, counts in self.truncation_counts.items():
                logs[f"{METRIC_PREFIX}/{split}_pairs_dropped"] = float(counts["dropped"])
                logs[f"{METRIC_PREFIX}/{split}_pairs_truncated"] = float(counts["truncated"])
        stats = self.pair_statistics(mode)
        self.last_pair_statistics = stats
        step = self.state.global_step
        for callback in self.diagnostics:
            if mode == "train":
                logs.update(callback.observe(step, stats, is_main=self.is_world_process_zero()))
            else:
                logs.update({f"eval_{k}": v for k, v in callback.observe_once(step, stats).items()})
        super().log(logs, start_time)
        self._pair_stats[mode].clear()
