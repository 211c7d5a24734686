"""`DPOPlusTrainer`: TRL's `DPOTrainer` with the loss taken from the trl_dpo_plus registry.

This class holds the seams on TRL and Transformers and nothing else; every job behind them has a file of its own
(`layout/`, `data_kinds/`, `metrics.py`, `prepared.py`, `reference_cache.py`, `diagnostics/`). The seams, each pinned
in `contract.py` (checked when a trainer is built, and by `tests/test_trl_contract.py`):

- TRL's private `_compute_loss` (TRL hard-codes its losses there): forward in the chosen layout, the data kind's batch,
  the registry's losses, metrics;
- TRL's `_prepare_dataset` (TRL's DPO preparation for pairs, its `KTOTrainer._prepare_dataset` run on this trainer
  for unpaired rows), `_set_signature_columns_if_needed` (keeps the unpaired rows' columns), `_precompute_ref_logps`
  (collates in the chosen layout; reads and fills the reference cache) and `compute_ref_log_probs` (the reference
  forward in the chosen layout, counted);
- TRL's `log` (adds the diagnostics' metrics), Transformers' private `_load_callback_state` (restores them on
  resume, says when the loss changed) and `_save_checkpoint` (a full disk named), `train`, `save_model` (the
  adapter's base by Hub id), `create_model_card` and `end`;
- two patches: `_no_reference_model_loaded` keeps TRL's `__init__` from loading a reference model for reference-free
  losses, and `completion_only_lm_head` has TRL's fused LM head score only labelled positions on every device (TRL
  does so on Triton devices only).

Other files that touch TRL: `layout/` (TRL's fused LM head output and its padded collator), `runner.py` (replaces
TRL's trainer in a user's script), `cli.py` (TRL's argument parser and script arguments) and `iterate/rounds.py`
(`--reference previous` rests on TRL copying a PeftModel's adapter into a frozen "ref" reference adapter; checked
there when the round's trainer is built).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from unittest import mock

import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset
from trl import DPOConfig
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import dpo_trainer as _trl_dpo
from trl.trainer import kto_trainer as _trl_kto
from trl.trainer import utils as _trl_utils

from .config import DPOPlusConfig, check_processes, release_unused_reference
from .console import install_compact_console
from .contract import check_trl_contract
from .data import check_model_path, check_trainer_datasets
from .data_kinds import data_kind_for
from .diagnostics import DiagnosticCallback, PairStatistics, callbacks_to_add, restore_states, write_interrupted_report
from .hub import adapter_base_id, name_adapter_base, write_model_card
from .layout import ForwardContext, PaddedPairLayout, choose_layout, padded_outputs, verify_first_batch
from .losses import get_loss
from .losses.transforms import wpo_weights
from .metrics import loss_metrics, truncation_logs
from .prepared import check_prepared, check_rows_left, split_sizes, without_filter
from .qlora import prepare_adapter_training
from .reference_cache import ReferenceCache, SplitFingerprints, cached_precompute, rows_read_per_batch, run_settings
from .saving import check_resumed_losses, disk_full_named

logger = logging.getLogger(__name__)

_TRL_INIT_ARGS = ("data_collator", "train_dataset", "eval_dataset", "processing_class", "compute_metrics",
                  "callbacks", "optimizers", "quantization_config", "peft_config")
# TRL's data preparation per data kind; the unpaired one is KTOTrainer's, run on this trainer
_TRL_PREPARATION = {"paired": _trl_dpo.DPOTrainer._prepare_dataset, "unpaired": _trl_kto.KTOTrainer._prepare_dataset}


class DPOPlusTrainer(_trl_dpo.DPOTrainer):
    """TRL's [`~trl.DPOTrainer`], with `loss_type` taken from the trl_dpo_plus loss registry; arguments are TRL's.

    Any registered loss or weighted mix trains (`DPOPlusConfig.loss_kwargs`), reference-free ones with no reference
    model; datasets are checked before tokenization; pairs train in the shared-prefix layout where it is exact
    (`layout`, `layout_reason`, `layout_check`); rows lost to `max_length` are counted (`truncation_counts`); unpaired
    thumbs-up/down rows train as `trl.KTOTrainer` trains them (`data_kind`, `label_counts`); per-pair statistics are
    logged under `dpo_plus/` beside TRL's metrics and read by the diagnostics (`statistics`, `diagnostics`).
    """

    _tag_names = ["trl", "dpo", "trl-dpo-plus"]
    instances_created = 0  # read by `trl-dpo-plus run` to check that a script really used this trainer

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *pos_args, **kwargs):
        """Same arguments as `trl.DPOTrainer`; a TRL `DPOConfig` is converted to a `DPOPlusConfig`."""
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = DPOPlusConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-DPO")
        elif not isinstance(args, DPOPlusConfig):
            args = DPOPlusConfig.from_trl(args)
        self.loss_specs = [get_loss(name) for name in args.loss_type]
        self.loss_kwargs = [args.loss_kwargs_for(name) for name in args.loss_type]
        self.requires_reference = args.requires_reference
        self.kind = data_kind_for(args, self.loss_specs, self.loss_kwargs)
        self.data_kind = self.kind.name
        # What TRL's KTO preparation reads from the trainer (see `_prepare_dataset`)
        self.calculate_KL, self.desirable_weight, self.undesirable_weight = self.kind.kto_preparation

        # Positional arguments as in TRL's signature, so that they can be read and replaced by name
        if len(pos_args) > len(_TRL_INIT_ARGS):
            raise TypeError(f"DPOPlusTrainer takes at most {3 + len(_TRL_INIT_ARGS)} positional arguments")
        kwargs.update(zip(_TRL_INIT_ARGS, pos_args))
        kwargs["train_dataset"], kwargs["eval_dataset"] = check_trainer_datasets(
            kwargs.get("train_dataset"), kwargs.get("eval_dataset"), args)
        if args.qlora or args.lora:
            model, kwargs["peft_config"], kwargs["quantization_config"] = prepare_adapter_training(
                model, args, kwargs.get("peft_config"), kwargs.get("quantization_config"))
        check_model_path(model)
        check_trl_contract()
        ref_model = release_unused_reference(ref_model, self.loss_specs)

        self.layout, self.layout_reason = PaddedPairLayout(), "not chosen yet"
        self.layout_check: dict | None = None  # the shared-prefix layout's first-batch check against the padded one
        self.reference_forwards = {"batches": 0, "rows": 0}  # reference forwards run by this trainer (see compare)
        self._layout_installed = False
        self._user_collator = kwargs.get("data_collator") is not None
        self._has_compute_metrics = kwargs.get("compute_metrics") is not None
        raw_sizes = split_sizes(kwargs.get("train_dataset"), kwargs.get("eval_dataset"))
        with self._no_reference_model_loaded(model, ref_model), self._exo_pair_checked_at_its_epsilon(args):
            super().__init__(model, ref_model, args, **kwargs)
        check_processes(self.loss_specs, self.accelerator.num_processes)
        self._install_layout()
        self.label_counts = self.kind.label_counts(self.train_dataset)
        self.truncation_counts = check_prepared(self.train_dataset, self.eval_dataset, raw_sizes, self.kind, args,
                                                self.accelerator.unwrap_model(self.model), self._tokenizer)
        self._counts_logged = False
        DPOPlusTrainer.instances_created += 1
        self.statistics = PairStatistics(lambda: self.diagnostics)
        for callback in callbacks_to_add(self.callback_handler.callbacks, args, sides=self.kind.sides):
            self.add_callback(callback)
        if args.console_log == "compact":
            install_compact_console(self)

    @property
    def diagnostics(self) -> list[DiagnosticCallback]:
        """The diagnostics callbacks in use (looked up each time: a resume may replace callback objects)."""
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, DiagnosticCallback)]

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.pad_token_id

    @functools.cached_property
    def forward_context(self) -> ForwardContext:
        """What the layouts receive from this run in place of the trainer."""
        args = self.args
        return ForwardContext(
            pad_token_id=self.pad_token_id, unwrap=self.accelerator.unwrap_model, ld_alpha=self.ld_alpha,
            aux_loss_enabled=self.aux_loss_enabled, compact_head=self.completion_only_lm_head,
            reference=self.reference_context, padded_reference=super().compute_ref_log_probs,
            no_checkpointing=lambda model: disable_gradient_checkpointing(model, args.gradient_checkpointing_kwargs),
            gather=self.accelerator.gather,
            half_precision=bool(args.bf16 or args.fp16 or self.accelerator.mixed_precision in ("bf16", "fp16")),
        )

    # -- data: TRL's preparation, the layout's collator -----------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation of this data kind; when `max_length` leaves nothing of a dataset, a clear error."""
        prepare = functools.partial(_TRL_PREPARATION[self.kind.name], self)
        prepared = prepare(dataset, processing_class, self.kind.preparation_args(args), dataset_name)
        check_rows_left(dataset, prepared, dataset_name, args.max_length, self.kind.unit, lambda: [
            len(ids) for ids in prepare(dataset, processing_class, without_filter(args), dataset_name)["prompt_ids"]])
        return prepared

    def _set_signature_columns_if_needed(self):
        """TRL's columns, plus the ones the data kind's batches need (`remove_unused_columns` would drop them)."""
        super()._set_signature_columns_if_needed()
        missing = [c for c in self.kind.extra_columns if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def _install_layout(self) -> None:
        """Choose the layout once (`args.pair_layout`, see `layout.choice`) and install its collator."""
        if self._layout_installed:
            return
        self._layout_installed = True
        setup = ("vision-language data" if self._is_vision_dataset else
                 "a data_collator was passed to the trainer" if self._user_collator else
                 "compute_metrics needs the padded logits" if self._has_compute_metrics else None)
        ctx, model = self.forward_context, self.model
        self.layout, self.layout_reason, collator = choose_layout(ctx, model, self.args, setup, self.ref_model)
        if not self._user_collator:
            self.data_collator = self.kind.wrap_collator(collator or self.data_collator)

    # -- the reference: precomputed (and cached), or run per batch in the chosen layout ---------------------------
    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute in this run's layout, through `reference_cache_dir`; the train split's if all is read."""
        self._install_layout()  # TRL precomputes inside its __init__: collate as training will
        if dataset is self.train_dataset and isinstance(dataset, Dataset) and self.reference_forwards.setdefault(
                "read_per_batch", rows_read_per_batch(self.args, len(dataset), self.accelerator.num_processes,
                                                      is_peft_model(self.model))):
            return dataset  # its rows' reference log-probs come from the reference forward as they are read
        precompute = functools.partial(super()._precompute_ref_logps, dataset, name, batch_size)
        if self.args.reference_cache_dir is None or not isinstance(dataset, Dataset):
            return precompute()
        fingerprint = self._split_fingerprints(dataset, self.kind.token_columns)
        return cached_precompute(ReferenceCache(self.args.reference_cache_dir), fingerprint, dataset, name, precompute,
                                 is_main=self.accelerator.is_main_process, barrier=self.accelerator.wait_for_everyone)

    @functools.cached_property
    def _split_fingerprints(self) -> SplitFingerprints:
        """The reference weights and tokenizer hashed once per trainer (rank 0's fingerprints on every process)."""
        separate = self.ref_model is not None
        return SplitFingerprints(
            self.accelerator.unwrap_model(self.ref_model if separate else self.model), separate=separate,
            tokenizer=self.processing_class, settings=run_settings(self.args, self.layout, self.accelerator),
            broadcast=broadcast_object_list,
            sharded=self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

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

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs `(chosen, rejected)` of a batch in the layout it was collated in (counted)."""
        layout = self.layout if "pair_ids" in inputs else PaddedPairLayout()
        chosen, rejected = layout.reference_logps(self.forward_context, model, inputs)
        self.reference_forwards["batches"] += 1
        self.reference_forwards["rows"] += chosen.shape[0]
        return chosen, rejected

    def _reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's reference log-probs (both branches): precomputed, or from the reference forward now."""
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model or self.model, inputs)

    # -- the loss path: the one override of TRL's private method ------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        ctx = self.forward_context
        if self.layout_check is None and self.layout.name == "shared_prefix":  # once, on the first batch
            self.layout, fallback, self.layout_check = verify_first_batch(
                self.layout, ctx, model, inputs, required=self.args.pair_layout == "shared_prefix")
            self.layout_reason = fallback or self.layout_reason
        forward = self.layout.policy_forward(ctx, model, inputs)
        reference = self._reference_logps(inputs) if self.requires_reference else None
        batch = self.kind.build_batch(forward, reference, inputs, self.accelerator)
        weights = wpo_weights(forward.per_token_logps, forward.log_sum_sq_probs, forward.mask) if self.use_weighting else None
        loss, outputs = self._weighted_loss(batch, weights)
        if mode == "train":
            self.statistics.record_finite(loss, forward.logps, None if reference is None else torch.cat(reference))
        metrics, per_pair = self.kind.metrics(forward, batch, outputs, inputs, self.accelerator)
        self._append_metrics(mode, {**metrics, **loss_metrics(self.loss_specs, outputs,
                                                              self.accelerator.gather_for_metrics)})
        self.statistics.add(mode, per_pair)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * forward.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(forward.aux_loss).mean().item())
        # `return_outputs` is deprecated in TRL: the fused LM head builds no logits, so they are recomputed
        return (loss, padded_outputs(model, inputs, self.pad_token_id)) if return_outputs else loss

    def _weighted_loss(self, batch, weights: torch.Tensor | None):
        """`Σ_k w_k · mean(loss_k)` over the selected losses (WPO's per-pair `weights` first), and their outputs."""
        loss, outputs = 0.0, []
        for spec, loss_kwargs, loss_weight in zip(self.loss_specs, self.loss_kwargs, self.loss_weights, strict=True):
            out = spec(batch, **loss_kwargs)
            loss += (out.losses if weights is None else out.losses * weights).mean() * loss_weight
            outputs.append(out)
        return loss, outputs

    def _append_metrics(self, mode: str, metrics: dict[str, float]) -> None:
        """One batch's metrics into TRL's per-mode lists; `num_tokens` is TRL's running count of training tokens."""
        for key, value in metrics.items():
            if key == "num_tokens":
                if mode == "train":
                    self._total_train_tokens += value // self._tp_size
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            else:
                self._metrics[mode][key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train" and not self._counts_logged:  # once: trackers get the data's losses too
            self._counts_logged = True
            logs.update(truncation_logs(self.truncation_counts))
        logs.update(self.statistics.observe(mode, self.state.global_step, is_main=self.is_world_process_zero()))
        super().log(logs, start_time)

    # -- resume, save, card, end ------------------------------------------------------------------------------
    def _load_callback_state(self) -> None:
        """On resume: a change of loss said, and the detectors' state restored in place (the same flags again)."""
        super()._load_callback_state()
        check_resumed_losses(self.state.stateful_callbacks, self.args.loss_type, self.args.loss_kwargs)
        if not self.args.restore_callback_states_from_checkpoint:  # else Transformers rebuilt them, ours included
            restore_states(self.diagnostics, self.state.stateful_callbacks)

    def train(self, *args, **kwargs):
        """`Trainer.train`; if it raises, the diagnostics report is still written, marked `interrupted`."""
        try:
            return super().train(*args, **kwargs)
        except BaseException as err:
            if self.diagnostics and self.is_world_process_zero():
                write_interrupted_report(self.state.log_history, self.args.output_dir, err)
            raise

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, output_dir=None):
        """Write `README.md` into `output_dir` (default `args.output_dir`), best-effort (`hub.write_model_card`)."""
        if self.is_world_process_zero():
            write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, output_dir=output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        base = adapter_base_id(self, warn=not _internal_call)  # before anything is written or pushed
        with disk_full_named(f"the model to {output_dir or self.args.output_dir}"):
            super().save_model(output_dir, _internal_call)
        name_adapter_base(output_dir or self.args.output_dir, base if self.is_world_process_zero() else None)
        if not _internal_call:  # push_to_hub and checkpoints write their own card
            self.create_model_card(output_dir=output_dir)

    def _save_checkpoint(self, model, trial):
        with disk_full_named(f"a checkpoint in {self.args.output_dir}"):
            super()._save_checkpoint(model, trial)

    def end(self):
        """Finish once every process got here (an earlier teardown aborted the other rank, 1 run in 6 on 2 CPUs)."""
        self.accelerator.wait_for_everyone()
        super().end()

    # -- the two patches ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _no_reference_model_loaded(self, model, ref_model):
        """For reference-free losses, keep TRL's `__init__` from loading a reference copy of the policy: TRL builds it
        with `create_model_from_path` after the policy (built by the same function when `model` is a path), so every
        call after the policy's returns `None` and nothing is loaded, not even briefly."""
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

    def _exo_pair_checked_at_its_epsilon(self, args):
        """TRL's `__init__` refuses `exo_pair` at `label_smoothing=0` (its default); TRL checks the ε ours runs with."""
        eps = next((kw["label_smoothing"] for s, kw in zip(self.loss_specs, self.loss_kwargs) if s.name == "exo_pair"),
                   None)
        if eps is None or args.label_smoothing != 0.0:
            return contextlib.nullcontext()
        return mock.patch.object(args, "label_smoothing", eps)

    @contextlib.contextmanager
    def completion_only_lm_head(self):
        """Have TRL's fused LM head score only the labelled positions on every device, as it does on Triton devices
        (elsewhere it scores every position); in eager PyTorch the compact path is the same arithmetic on fewer rows."""
        with mock.patch.object(_trl_utils, "_use_triton", lambda device: True):
            yield
