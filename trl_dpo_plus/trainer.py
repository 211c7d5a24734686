"""`DPOPlusTrainer`: TRL's `DPOTrainer` with the loss taken from the trl_dpo_plus registry.

This module is the only place that touches TRL internals. It overrides one private method, `_compute_loss` (TRL
hard-codes its losses there), and, for reference-free losses, keeps TRL's `__init__` from loading a reference model.
`tests/test_trl_contract.py` pins the upstream code both rely on and fails loudly when TRL changes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections import defaultdict
from unittest import mock

import torch
import torch.nn.functional as F
from trl import DPOConfig
from trl.trainer import dpo_trainer as _trl_dpo

from .config import DPOPlusConfig
from .data import check_preference_dataset
from .diagnostics import DiagnosticCallback, DiagnosticsReportCallback, default_callbacks
from .hub import build_model_card
from .layout import NON_MODEL_KEYS, PaddedPairLayout, PolicyForward
from .losses import PreferenceBatch, get_loss
from .losses._common import per_token
from .qlora import prepare_adapter_training

logger = logging.getLogger(__name__)

METRIC_PREFIX = "dpo_plus"
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
    - extra per-pair statistics are logged under `dpo_plus/` next to TRL's `rewards/*`, `logps/*`, `logits/*`.
    """

    _tag_names = ["trl", "dpo", "trl-dpo-plus"]
    layout = PaddedPairLayout()
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

        # Positional arguments as in TRL's signature, so that they can be read and replaced by name
        if len(pos_args) > len(_TRL_INIT_ARGS):
            raise TypeError(f"DPOPlusTrainer takes at most {3 + len(_TRL_INIT_ARGS)} positional arguments")
        kwargs.update(zip(_TRL_INIT_ARGS, pos_args))

        # The datasets are checked on the raw text, before TRL tokenizes them and before any model is loaded
        def check(dataset, name):
            return check_preference_dataset(dataset, name=name, drop_degenerate=args.drop_degenerate_pairs)

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

        with self._no_reference_model_loaded(model, ref_model):
            super().__init__(model, ref_model, args, **kwargs)
        DPOPlusTrainer.instances_created += 1
        self._pair_stats = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.last_pair_statistics: dict[str, torch.Tensor] = {}
        self._add_diagnostics(args)

    def _add_diagnostics(self, args: DPOPlusConfig) -> None:
        """The default diagnostics callbacks (unless the user passed their own of a kind), and the report writer."""
        given = {type(cb) for cb in self.callback_handler.callbacks}
        if args.diagnostics:
            for callback in default_callbacks(action=args.diagnostics_action):
                if type(callback) not in given:
                    self.add_callback(callback)
        self.diagnostics = [cb for cb in self.callback_handler.callbacks if isinstance(cb, DiagnosticCallback)]
        if self.diagnostics and DiagnosticsReportCallback not in given:
            self.add_callback(DiagnosticsReportCallback())

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

    # -- the loss path: the one override of TRL's private method ------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        forward = self.layout.policy_forward(self, model, inputs)
        chosen_logps, rejected_logps = forward.logps.chunk(2, dim=0)
        chosen_lengths, rejected_lengths = forward.lengths.chunk(2, dim=0)

        ref_chosen_logps = ref_rejected_logps = chosen_scores = rejected_scores = chosen_kl = rejected_kl = None
        if self.requires_reference:
            ref_chosen_logps, ref_rejected_logps = self.layout.reference_logps(self, inputs)
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

        batch = PreferenceBatch(
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

        if self.aux_loss_enabled:
            aux_loss = forward.outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_metrics(mode, inputs, forward, batch, loss_outputs)

        if return_outputs:  # deprecated in TRL: the fused LM head builds no logits, so recompute them
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS})
            return loss, outputs
        return loss

    def _wpo_weights(self, forward: PolicyForward) -> torch.Tensor:
        """WPO weights (https://arxiv.org/abs/2406.11827 Eq. 2), as TRL computes them, one per pair."""
        seq_len = forward.mask.size(1)
        with torch.no_grad():
            aligned = (forward.per_token_logps - forward.outputs.log_sum_sq_probs[:, -seq_len:]) * forward.mask
        weights = torch.exp(per_token(aligned.sum(dim=1), forward.lengths))
        chosen_weights, rejected_weights = weights.chunk(2, dim=0)
        return chosen_weights * rejected_weights

    # -- metrics: TRL's names, plus per-pair statistics under `dpo_plus/` ---------------------------------------
    def _log_metrics(self, mode, inputs, forward: PolicyForward, batch: PreferenceBatch, loss_outputs):
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        mask = forward.mask
        seq_len = mask.size(1)
        outputs = forward.outputs

        total_tokens = gather(mask.sum()).sum()
        entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * mask).sum()).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_mask, rejected_mask = mask.bool().chunk(2, dim=0)
        chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for side, side_logits, side_mask in (
            ("chosen", chosen_mean_logits, chosen_mask),
            ("rejected", rejected_mean_logits, rejected_mask),
        ):
            total = gather(side_logits[side_mask].sum()).sum().item()
            count = gather(side_mask.sum()).sum().item()
            metrics[f"logits/{side}"].append(total / count if count > 0 else 0.0)

        chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        correct = gather((chosen_is_top1 & chosen_mask).sum()).sum()
        count = gather(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

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

        for spec, out in zip(self.loss_specs, loss_outputs):
            if len(loss_outputs) > 1:
                metrics[f"{METRIC_PREFIX}/loss/{spec.name}"].append(gather(out.losses.detach().mean()).mean().item())
            for key, value in out.metrics.items():
                metrics[f"{METRIC_PREFIX}/{spec.name}/{key}"].append(gather(value.detach().float().mean()).mean().item())

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
