"""`compare`: which loss for this data? One run per loss on identical data, seed and schedule, judged on held-out pairs.

    from trl_dpo_plus.compare import compare
    result = compare("Qwen/Qwen2.5-0.5B-Instruct", train, held_out, ["sigmoid", "ipo:beta=0.5", "simpo"])

Each run is an ordinary `DPOPlusTrainer` run (LoRA adapters by default, so a sweep holds one base model at a time) and
saves its adapter, model card and diagnostics under `output_dir/<run>/`. The reference log-probs are computed once:
every run shares `reference_cache_dir` (`trl_dpo_plus.reference_cache`), so the first reference-based run pays the
reference forward over the train and held-out splits and the others read it back, as do later `train`/`compare` runs
on the same data.

After the runs, one pass over the held-out pairs scores every trained adapter against the reference (the base, its
adapter disabled) batch by batch: per-pair rewards as each loss defines them, log-ratios per token, and the exact
per-token KL(π‖π_ref) from the two full next-token distributions at the held-out completions' positions. With a
`reward_fn`, completions sampled on held-out prompts from the base and from every adapter add a win-rate against the
base, the mean reward, and the base model's per-token log-likelihood of the samples (fluency).

Writes `comparison.md`, `comparison.json` and `comparison.png` into `output_dir`. A run that fails is reported in the
table with its error (and `error.txt` in its folder); the other runs go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from .config import DPOPlusConfig
from .losses import PreferenceBatch, get_loss

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]
QUANTILES = (0.1, 0.5, 0.9)


# -- what to run -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a registered loss and its hyperparameters (`beta` among them)."""

    loss: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """The run's name in the table and its folder: `ipo`, `ipo-beta0.5`."""
        extra = "".join(f"-{k}{v}" for k, v in self.kwargs.items())
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.loss}{extra}")


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_run(text: str | RunSpec) -> RunSpec:
    """`"ipo"`, `"ipo:beta=0.5"`, `"simpo:beta=2.5,gamma=0.55"` → `RunSpec` (the loss name checked)."""
    if isinstance(text, RunSpec):
        get_loss(text.loss)
        return text
    name, _, rest = text.partition(":")
    get_loss(name.strip())  # an unknown name raises with the closest registered ones
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{text!r}: write each hyperparameter as key=value, e.g. 'ipo:beta=0.5'")
        kwargs[key.strip()] = _value(value.strip())
    return RunSpec(name.strip(), kwargs)


def run_config(base: DPOPlusConfig, run: RunSpec, output_dir: Path, reference_cache_dir: str | None) -> DPOPlusConfig:
    """`base` with this run's loss, hyperparameters and output folder (checked now, before any run trains)."""
    kwargs = dict(run.kwargs)
    beta = kwargs.pop("beta", None if getattr(base, "_beta_per_loss", False) else base.beta)
    spec = get_loss(run.loss)
    return dataclasses.replace(
        base, loss_type=[run.loss], beta=beta, loss_kwargs={run.loss: kwargs} if kwargs else None, loss_weights=None,
        output_dir=str(output_dir / run.label), unpair=spec.data == "unpaired",
        reference_cache_dir=reference_cache_dir if spec.requires_reference else None,
        train_sampling_strategy=None if getattr(base, "_sampling_by_loss", False) else base.train_sampling_strategy,
    )


# -- held-out evaluation ---------------------------------------------------------------------------------------------
def _truncate(prompt: list[int], completion: list[int], max_length: int | None, mode: str) -> tuple[list[int], list[int]]:
    """The training collators' truncation of one prompt + completion to `max_length` tokens."""
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion
    if mode == "keep_completions":
        keep = max(max_length - len(completion), 0)
        return prompt[len(prompt) - keep:], completion[:max_length]
    if mode == "keep_end":
        sequence = (prompt + completion)[-max_length:]
        cut = max(len(prompt) - (len(prompt) + len(completion) - max_length), 0)
        return sequence[:cut], sequence[cut:]
    return prompt[:max_length], completion[: max(max_length - len(prompt), 0)]


def _pad(sequences: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-padded `input_ids`, `attention_mask` and completion-token mask of `(prompt ids, completion ids)` pairs."""
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, c) in enumerate(sequences):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p): len(p) + len(c)] = True
    return input_ids, attention, completion


def _pair_batch(rows: list[dict], pad_token_id: int, max_length: int | None, mode: str):
    """`2B` padded sequences (the B chosen, then the B rejected), truncated as training truncates them."""
    sequences = []
    for side in ("chosen_ids", "rejected_ids"):
        sequences += [_truncate(list(row["prompt_ids"]), list(row[side]), max_length, mode) for row in rows]
    return _pad(sequences, pad_token_id)


def _per_sequence(values: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Per-completion-token `values` (in the order `_completion_logprobs` returns them) summed per sequence."""
    mask = completion[:, 1:]
    owner = torch.arange(len(completion), device=values.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(len(completion), device=values.device, dtype=values.dtype).index_add_(0, owner, values).cpu()


def _completion_logprobs(model, input_ids, attention, completion) -> torch.Tensor:
    """Log-softmax of the next-token distribution at each completion token's position: `(n_tokens, vocab)`."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return logits[completion[:, 1:]].float().log_softmax(-1)


class AdapterPolicies:
    """The trained policies as adapters of one PEFT model; the reference is that model with its adapters disabled."""

    def __init__(self, model, adapters: dict[str, str]):
        self.model, self.adapters = model, adapters  # run name -> adapter name (PEFT's names cannot hold ".")
        self.names = list(adapters)

    @contextlib.contextmanager
    def reference(self):
        with self.model.disable_adapter():
            yield self.model

    @contextlib.contextmanager
    def policy(self, name: str):
        self.model.set_adapter(self.adapters[name])
        yield self.model


class FullPolicy:
    """One fully fine-tuned policy (loaded from its folder) and the base model as its reference."""

    def __init__(self, base, name: str, path: str, init_kwargs: dict):
        from transformers import AutoModelForCausalLM

        self.base, self.names = base, [name]
        self.model = AutoModelForCausalLM.from_pretrained(path, **init_kwargs).eval()

    @contextlib.contextmanager
    def reference(self):
        yield self.base

    @contextlib.contextmanager
    def policy(self, name: str):
        yield self.model


@torch.no_grad()
def evaluate_pairs(policies: AdapterPolicies | FullPolicy, rows: list[dict], pad_token_id: int, *, batch_size: int = 8,
                   max_length: int | None = None, truncation_mode: str = "keep_start", progress: bool = True):
    """One pass over prepared held-out pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`): per batch, the reference
    forward once, then every policy on the same batch.

    Returns the reference's per-pair `chosen_logps`, `rejected_logps`, `chosen_lengths`, `rejected_lengths`, and per
    policy its `chosen_logps`, `rejected_logps`, `kl` (KL(π‖π_ref) summed over the pair's completion tokens, both
    completions) and `tokens` (their count).
    """
    reference = {k: [] for k in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths")}
    per_policy = {name: {k: [] for k in ("chosen_logps", "rejected_logps", "kl", "tokens")} for name in policies.names}
    for start in tqdm(range(0, len(rows), batch_size), desc="  held-out pass", leave=False, disable=not progress):
        chunk = rows[start: start + batch_size]
        with policies.reference() as model:
            device = next(model.parameters()).device
            input_ids, attention, completion = (
                t.to(device) for t in _pair_batch(chunk, pad_token_id, max_length, truncation_mode))
            ref_logprobs = _completion_logprobs(model.eval(), input_ids, attention, completion)
        labels = input_ids[:, 1:][completion[:, 1:]]

        def per_pair(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sums = _per_sequence(values, completion)
            return sums[: len(chunk)], sums[len(chunk):]

        chosen, rejected = per_pair(ref_logprobs.gather(1, labels[:, None]).squeeze(1))
        lengths = per_pair(torch.ones_like(labels, dtype=torch.float32))
        for key, value in zip(reference, (chosen, rejected, *lengths)):
            reference[key].append(value)
        for name in policies.names:
            with policies.policy(name) as model:
                logprobs = _completion_logprobs(model.eval(), input_ids, attention, completion)
            chosen, rejected = per_pair(logprobs.gather(1, labels[:, None]).squeeze(1))
            kl_chosen, kl_rejected = per_pair((logprobs.exp() * (logprobs - ref_logprobs)).sum(-1))
            for key, value in zip(per_policy[name], (chosen, rejected, kl_chosen + kl_rejected, lengths[0] + lengths[1])):
                per_policy[name][key].append(value)
    joined = lambda parts: {k: torch.cat(v) for k, v in parts.items()}  # noqa: E731
    return joined(reference), {name: joined(parts) for name, parts in per_policy.items()}


def _quantiles(values: torch.Tensor) -> list[float]:
    return [float(v) for v in torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))]


def held_out_metrics(run: RunSpec, config: DPOPlusConfig, reference: dict, policy: dict) -> dict[str, Any]:
    """The table's held-out columns for one run: its rewards as its loss defines them, and what the log-probs say."""
    spec = get_loss(run.loss)
    kwargs = config.loss_kwargs_for(run.loss)
    chosen_ratio = policy["chosen_logps"] - reference["chosen_logps"]
    rejected_ratio = policy["rejected_logps"] - reference["rejected_logps"]
    if spec.data == "unpaired":  # KTO's reward, as its training logs it: β·log-ratio
        chosen_rewards, rejected_rewards = kwargs["beta"] * chosen_ratio, kwargs["beta"] * rejected_ratio
    else:
        batch = PreferenceBatch(
            chosen_logps=policy["chosen_logps"], rejected_logps=policy["rejected_logps"],
            chosen_lengths=reference["chosen_lengths"], rejected_lengths=reference["rejected_lengths"],
            ref_chosen_logps=reference["chosen_logps"] if spec.requires_reference else None,
            ref_rejected_logps=reference["rejected_logps"] if spec.requires_reference else None,
        )
        out = spec(batch, **kwargs)
        chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    margin = (chosen_rewards - rejected_rewards).double()
    gap = (reference["chosen_lengths"] - reference["rejected_lengths"]).double()
    r2 = None
    if len(margin) > 2 and margin.std() > 0 and gap.std() > 0:
        r2 = float(torch.corrcoef(torch.stack([margin, gap]))[0, 1] ** 2)
    metrics = {
        "pairs": len(margin),
        "reward_accuracy": float((margin > 0).double().mean()),
        "margin_mean": float(margin.mean()),
        "margin_quantiles": _quantiles(margin),
        "chosen_logratio_per_token": None,
        "rejected_logratio_per_token": None,
        "length_r2": r2,
        "kl_per_token": float(policy["kl"].sum() / policy["tokens"].sum().clamp(min=1)),
    }
    if spec.requires_reference:  # a reference-free loss's reward is not a log-ratio: nothing to show there
        metrics["chosen_logratio_per_token"] = float((chosen_ratio / reference["chosen_lengths"].clamp(min=1)).mean())
        metrics["rejected_logratio_per_token"] = float(
            (rejected_ratio / reference["rejected_lengths"].clamp(min=1)).mean())
    return metrics


# -- generation ------------------------------------------------------------------------------------------------------
def prompt_text(prompt, tokenizer) -> str:
    """A plain-text prompt as it is; a conversational one through the chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int, batch: int = 64):
    """`n` completions per prompt, ancestral sampling at temperature 1 (so a KL estimate from them is unbiased)."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    flat = [p for p in prompts for _ in range(n)]
    completions = []
    device = next(model.parameters()).device
    try:
        for i in range(0, len(flat), batch):
            enc = tokenizer(flat[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=True).to(device)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            completions += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [completions[i * n: (i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list[str], completions: list[str],
                     batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each completion given its prompt, and its token count."""
    sums, counts = [], []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch):
        sequences = []
        for p, c in zip(prompts[i: i + batch], completions[i: i + batch]):
            prompt_ids = tokenizer(p)["input_ids"]
            sequences.append((prompt_ids, tokenizer(p + c)["input_ids"][len(prompt_ids):]))
        input_ids, attention, completion = (t.to(device) for t in _pad(sequences, tokenizer.pad_token_id))
        logprobs = _completion_logprobs(model, input_ids, attention, completion)
        labels = input_ids[:, 1:][completion[:, 1:]]
        sums.append(_per_sequence(logprobs.gather(1, labels[:, None]).squeeze(1), completion))
        counts.append(completion[:, 1:].sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


def load_reward_fn(spec: str) -> RewardFn:
    """`module:function` (or `path/to/file.py:function`) → the callable; errors name what is missing."""
    import importlib
    import importlib.util

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward_fn {spec!r}: write it as module:function, e.g. my_rewards:score")
    if module_name.endswith(".py"):
        if not os.path.exists(module_name):
            raise FileNotFoundError(f"--reward_fn {spec!r}: no file {module_name!r}")
        loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"--reward_fn {spec!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward_fn {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


def _score(reward_fn: RewardFn, prompts: list, samples: list[list[str]]) -> list[list[float]]:
    flat_prompts = [p for p, cs in zip(prompts, samples) for _ in cs]
    flat = [c for cs in samples for c in cs]
    scores = list(reward_fn(prompts=flat_prompts, completions=flat))
    if len(scores) != len(flat) or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise ValueError(f"reward_fn must return one finite number per completion ({len(flat)}); got "
                         f"{len(scores)} values, e.g. {scores[:3]!r}")
    it = iter(scores)
    return [[float(next(it)) for _ in cs] for cs in samples]


def win_rate(after: list[list[float]], before: list[list[float]]) -> tuple[float, float]:
    """Share of (prompt, sample) slots where the trained model's reward beats the base's (ties count ½), and ties."""
    pairs = [(a, b) for a_list, b_list in zip(after, before) for a, b in zip(a_list, b_list)]
    wins = sum(a > b for a, b in pairs)
    ties = sum(a == b for a, b in pairs)
    return (wins + 0.5 * ties) / len(pairs), ties / len(pairs)


# -- the comparison --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    """One row of the table."""

    name: str
    loss: str
    hyperparameters: dict[str, Any]
    reference_free: bool
    status: str = "ok"
    error: str | None = None
    steps: int = 0
    seconds: float = 0.0
    train_reward_accuracy: float | None = None
    flags: list[str] = dataclasses.field(default_factory=list)
    reference_rows: int = 0  # rows the reference forward ran on in this run (0 when it read the cache)
    reference_rows_alone: int = 0  # rows its reference pass covers when run alone (train + held-out, as prepared)
    held_out: dict[str, Any] = dataclasses.field(default_factory=dict)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    output_dir: str = ""


@dataclasses.dataclass
class Comparison:
    runs: list[RunResult]
    base_generation: dict[str, Any]
    reference: dict[str, Any]
    setup: dict[str, Any]
    files: dict[str, str]

    def to_dict(self) -> dict:
        return {"setup": self.setup, "reference": self.reference, "base_generation": self.base_generation,
                "runs": [dataclasses.asdict(r) for r in self.runs], "files": self.files}


class StepBar(TrainerCallback):
    """One tqdm bar per training run, with the loss and reward accuracy."""

    def __init__(self, label: str, position: int = 1):
        self.label, self.position = label, position

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=f"  train {self.label}", leave=False, unit="step",
                        position=self.position)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "rewards/accuracies" in logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['rewards/accuracies']:.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _check_paired(dataset, name: str):
    from .data import check_preference_dataset, data_kind_of

    if data_kind_of(dataset.column_names) != "paired":
        raise ValueError(f"compare needs preference pairs (prompt, chosen, rejected) for its {name} split, to score "
                         f"every loss on the same held-out pairs; it has columns {dataset.column_names}. Unpaired "
                         "losses (kto) are compared on the same pairs, unpaired for them.")
    return check_preference_dataset(dataset, name=name)


def compare(
    model: str,
    train_dataset,
    eval_dataset,
    losses: list[str | RunSpec],
    args: DPOPlusConfig | None = None,
    *,
    processing_class=None,
    peft_config=None,
    quantization_config=None,
    reward_fn: RewardFn | None = None,
    generation_prompts: int | list = 16,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 64,
    share_reference: bool = True,
    dataset_name: str | list[str] | None = None,
    progress: bool = True,
) -> Comparison:
    """Train one run per entry of `losses` on the same data, seed and schedule, and compare them on `eval_dataset`.

    Args:
        model: a local folder or Hub id (each run loads it afresh, so every run starts from the same weights).
        train_dataset, eval_dataset: preference pairs (`prompt`, `chosen`, `rejected`); unpaired losses (`kto`) train
            on the same pairs unpaired (`unpair=True`).
        losses: loss names, optionally with hyperparameters: `"ipo:beta=0.5"`, or `RunSpec`s.
        args: the shared training configuration (`output_dir` holds the comparison and one folder per run). `None`
            means `DPOPlusConfig(output_dir="comparison", lora=True)`.
        processing_class, peft_config, quantization_config: as for `DPOPlusTrainer` (the `lora`/`qlora` presets otherwise).
        reward_fn: optional TRL-style reward function `reward_fn(prompts=[...], completions=[...]) -> list[float]`;
            adds win-rate vs the base, mean reward and fluency from samples on held-out prompts.
        generation_prompts: how many of the held-out split's prompts to sample on, or the prompts themselves.
        share_reference: compute the reference log-probs once for all runs (`reference_cache_dir`, default
            `output_dir/reference_cache`); `False` gives every run its own reference pass (for benchmarks).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .trainer import DPOPlusTrainer

    start = time.time()
    args = args or DPOPlusConfig(output_dir="comparison", lora=True)
    out_dir = Path(args.output_dir)
    runs = [parse_run(loss) for loss in losses]
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"compare: two runs have the same name {labels}; give them different hyperparameters")
    cache_dir = (args.reference_cache_dir or str(out_dir / "reference_cache")) if share_reference else None
    configs = [run_config(args, run, out_dir, cache_dir) for run in runs]
    train_dataset = _check_paired(train_dataset, "train")
    eval_dataset = _check_paired(eval_dataset, "eval")
    adapters = args.lora or args.qlora or peft_config is not None
    if len(eval_dataset) == 0:
        raise ValueError("compare: the held-out split is empty; every run is scored on held-out pairs")
    out_dir.mkdir(parents=True, exist_ok=True)

    results, prepared_eval, tokenizer = [], None, processing_class
    bar = tqdm(list(zip(runs, configs)), desc="compare", unit="run", disable=not progress, position=0)
    for run, config in bar:
        bar.set_postfix_str(run.label)
        spec = get_loss(run.loss)
        result = RunResult(name=run.label, loss=run.loss, hyperparameters=config.loss_kwargs_for(run.loss),
                           reference_free=not spec.requires_reference, output_dir=config.output_dir)
        results.append(result)
        t0 = time.time()
        trainer = None
        try:
            trainer = DPOPlusTrainer(model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                     processing_class=processing_class, peft_config=peft_config,
                                     quantization_config=quantization_config)
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            if progress:
                trainer.add_callback(StepBar(run.label))
            if tokenizer is None:
                tokenizer = trainer.processing_class
            if prepared_eval is None and spec.data == "paired":
                prepared_eval = trainer.eval_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
            trainer.train()
            trainer.save_model()
            trainer.create_model_card(dataset_name=dataset_name)
            result.steps = trainer.state.global_step
            logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h and "eval_loss" not in h]
            result.train_reward_accuracy = logs[-1]["rewards/accuracies"] if logs else None
            result.flags = [f"{flag['flag']}@{flag['step']}" for flag in _flags(config.output_dir)]
        except Exception as err:  # reported in the table; the other runs go on
            result.status, result.error = "failed", f"{type(err).__name__}: {err}"[:300]
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(config.output_dir) / "error.txt").write_text(traceback.format_exc())
            logger.warning("compare: run %s failed (%s); going on with the others", run.label, result.error)
        finally:
            result.seconds = time.time() - t0
            if trainer is not None:
                result.reference_rows = trainer.reference_forwards["rows"]
                if spec.requires_reference:  # what its own reference pass would have been, without the cache
                    result.reference_rows_alone = sum(len(ds) for ds in (trainer.train_dataset, trainer.eval_dataset))
                trainer.accelerator.free_memory()
            del trainer
            gc.collect()
    bar.close()

    trained = [r for r in results if r.status == "ok"]
    base_generation: dict[str, Any] = {}
    if trained:
        if prepared_eval is None:  # only unpaired runs trained: prepare the held-out pairs as a paired run would
            prepared_eval = _prepare_eval(model, args, eval_dataset, peft_config, quantization_config)
        rows = prepared_eval.to_list()
        init_kwargs = _init_kwargs(args, quantization_config)
        base = AutoModelForCausalLM.from_pretrained(model, **init_kwargs)
        if adapters:
            ids = {r.name: f"run{i}" for i, r in enumerate(trained)}
            peft_model = PeftModel.from_pretrained(base, trained[0].output_dir, adapter_name=ids[trained[0].name])
            for r in trained[1:]:
                peft_model.load_adapter(r.output_dir, adapter_name=ids[r.name])
            groups = [AdapterPolicies(peft_model, ids)]
        else:  # full fine-tuning: each policy in turn, so the reference's held-out pass runs once per run
            groups = (FullPolicy(base, r.name, r.output_dir, init_kwargs) for r in trained)
        by_name = {r.name: (r, run, config) for r, run, config in zip(results, runs, configs)}
        for policies in groups:
            reference, per_policy = evaluate_pairs(
                policies, rows, tokenizer.pad_token_id, batch_size=args.per_device_eval_batch_size,
                max_length=args.max_length, truncation_mode=args.truncation_mode, progress=progress)
            for name, values in per_policy.items():
                result, run, config = by_name[name]
                result.held_out = held_out_metrics(run, config, reference, values)
            if reward_fn is not None:
                base_generation = _generation(policies, by_name, eval_dataset, tokenizer, reward_fn,
                                              generation_prompts, samples_per_prompt, max_new_tokens, args.seed,
                                              progress, base_generation)
            del policies
        del groups, base
        gc.collect()

    reference_stats = {
        "shared": share_reference,
        "cache_dir": _relative(cache_dir, out_dir),
        "reference_based_runs": sum(not r.reference_free for r in results),
        "forward_rows": sum(r.reference_rows for r in results),
        "forward_rows_unshared": sum(r.reference_rows_alone for r in results),
    }
    setup = {
        "model": _model_name(model), "train_pairs": len(train_dataset), "held_out_pairs": len(eval_dataset),
        "adapters": "qlora" if args.qlora else "lora" if adapters else "full fine-tuning",
        "learning_rate": args.learning_rate, "epochs": args.num_train_epochs, "max_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps, "seed": args.seed,
        "max_length": args.max_length, "seconds": round(time.time() - start, 1),
    }
    base_generation = {k: v for k, v in base_generation.items() if k not in ("samples", "scores")}
    comparison = Comparison(results, base_generation, reference_stats, setup, {})
    comparison.files = write_comparison(comparison, out_dir)
    return comparison


def _init_kwargs(args: DPOPlusConfig, quantization_config) -> dict:
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    elif args.qlora:
        from .qlora import qlora_defaults

        kwargs["quantization_config"] = qlora_defaults()[0]
    return kwargs


def _prepare_eval(model: str, args: DPOPlusConfig, eval_dataset, peft_config, quantization_config):
    """The held-out pairs tokenized exactly as a paired run prepares them (a trainer is built for it, nothing trains)."""
    from .trainer import DPOPlusTrainer

    config = dataclasses.replace(args, loss_type=["simpo"], beta=None, loss_kwargs=None, reference_cache_dir=None,
                                 output_dir=str(Path(args.output_dir) / ".held-out-preparation"))
    trainer = DPOPlusTrainer(model, args=config, train_dataset=eval_dataset, eval_dataset=eval_dataset,
                             peft_config=peft_config, quantization_config=quantization_config)
    return trainer.eval_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])


def _flags(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "diagnostics.json"
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("train", {}).get("flags", [])


def _model_name(model: str) -> str:
    from .assets import default_model_path

    return "stories260K (embedded)" if os.path.abspath(str(model)) == os.path.abspath(default_model_path()) else str(model)


def _relative(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _generation(policies, by_name, eval_dataset, tokenizer, reward_fn, generation_prompts, samples_per_prompt,
                max_new_tokens, seed, progress, base: dict) -> dict[str, Any]:
    """Samples on held-out prompts from the base (once) and from each policy, scored by `reward_fn`; fills each run's
    `generation` and returns the base's."""
    if isinstance(generation_prompts, int):
        prompts = list(dict.fromkeys(eval_dataset["prompt"]))[:generation_prompts]  # the first n distinct prompts
    else:
        prompts = list(generation_prompts)
    texts = [prompt_text(p, tokenizer) for p in prompts]
    if not base:
        with policies.reference() as model:
            before = sample(model, tokenizer, texts, samples_per_prompt, max_new_tokens, seed + 2)
        base = {"prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
                "samples": before, "scores": _score(reward_fn, prompts, before)}
        base.update(mean_reward=_mean(base["scores"]), fluency=_fluency(policies, tokenizer, texts, before)[0],
                    example=before[0][0])
    for name in tqdm(policies.names, desc="  sampling", leave=False, disable=not progress):
        with policies.policy(name) as model:
            after = sample(model, tokenizer, texts, samples_per_prompt, max_new_tokens, seed + 2)
            flat_prompts = [p for p, cs in zip(texts, after) for _ in cs]
            policy_logps, _ = completion_logps(model, tokenizer, flat_prompts, [c for cs in after for c in cs])
        scores = _score(reward_fn, prompts, after)
        wins, ties = win_rate(scores, base["scores"])
        fluency, base_logps = _fluency(policies, tokenizer, texts, after)
        best = max(range(len(after[0])), key=lambda i: scores[0][i])
        by_name[name][0].generation = {
            "mean_reward": _mean(scores), "win_rate": wins, "ties": ties, "fluency": fluency,
            "sample_kl": float((policy_logps - base_logps).mean()), "example": after[0][best]}
    return base


def _fluency(policies, tokenizer, texts, samples) -> tuple[float, torch.Tensor]:
    """The base model's per-token log-likelihood of the samples, and its summed log-prob of each."""
    flat_prompts = [p for p, cs in zip(texts, samples) for _ in cs]
    with policies.reference() as model:
        logps, counts = completion_logps(model, tokenizer, flat_prompts, [c for cs in samples for c in cs])
    return float(logps.sum() / counts.sum().clamp(min=1)), logps


def _mean(scores: list[list[float]]) -> float:
    flat = [s for row in scores for s in row]
    return sum(flat) / len(flat)


# -- the report ------------------------------------------------------------------------------------------------------
COLUMNS = {
    "reward acc": "held-out reward accuracy: share of held-out pairs whose chosen reward (as the run's loss defines "
                  "it) beats the rejected one",
    "margin p10/p50/p90": "quantiles of the held-out reward margin (chosen − rejected reward, the loss's own scale)",
    "chosen / rejected log-ratio": "mean log π − log π_ref per token of the held-out chosen / rejected completions; "
                                   "rejected falling far faster than chosen rises, or chosen below 0, is likelihood "
                                   "displacement (— for reference-free losses: their reward is no log-ratio)",
    "length R²": "R² of the held-out margin against the chosen − rejected length gap (high: the margin is length)",
    "KL/token": "exact KL(π‖π_ref) per token, from both next-token distributions at the held-out completions' "
                "positions (π_ref: the base model)",
    "flags": "diagnostics flags raised during training (name@step; see diagnostics.json in the run's folder)",
    "time": "wall time of the run (training, saving; the held-out pass is shared)",
    "win-rate": "share of held-out prompt samples where the run's reward_fn score beats the base model's sample of the "
                "same prompt and index (ties ½)",
    "reward": "mean reward_fn score of the samples (base model → this run)",
    "fluency": "base model's per-token log-likelihood of the run's samples (base's own samples in the header)",
    "sample KL": "Monte-Carlo KL(π‖π_base) in nats per completion, from the run's own samples",
}


ADAPTER_WORDS = {"lora": "LoRA adapters", "qlora": "QLoRA adapters"}


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def markdown_table(comparison: Comparison) -> str:
    generation = bool(comparison.base_generation)
    header = ["run", "reward acc", "margin p10/p50/p90", "chosen / rejected log-ratio", "length R²", "KL/token"]
    if generation:
        header += ["win-rate", "reward", "fluency", "sample KL"]
    header += ["flags", "time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = comparison.base_generation
    for r in comparison.runs:
        name = f"{r.name}" + (" (reference-free)" if r.reference_free else "")
        if r.status != "ok":
            cells = [name, f"**failed**: {r.error}"] + [""] * (len(header) - 3) + [f"{r.seconds:.0f} s"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            continue
        h = r.held_out
        q = h.get("margin_quantiles") or [None] * 3
        ratios = "—" if h.get("chosen_logratio_per_token") is None else (
            f"{h['chosen_logratio_per_token']:+.3f} / {h['rejected_logratio_per_token']:+.3f}")
        cells = [name, _fmt(h.get("reward_accuracy")), " / ".join(_fmt(v) for v in q), ratios,
                 _fmt(h.get("length_r2")), _fmt(h.get("kl_per_token"), 4)]
        if generation:
            g = r.generation
            cells += [_fmt(g.get("win_rate")), f"{_fmt(base.get('mean_reward'))} → {_fmt(g.get('mean_reward'))}",
                      _fmt(g.get("fluency")), _fmt(g.get("sample_kl"), 1)]
        cells += [", ".join(r.flags) or "none", f"{r.seconds:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(comparison: Comparison, out_dir: Path) -> dict[str, str]:
    files = {"json": "comparison.json", "markdown": "comparison.md"}
    setup, ref = comparison.setup, comparison.reference
    scored = next((r.held_out["pairs"] for r in comparison.runs if r.held_out), setup["held_out_pairs"])
    held_out = (f"{setup['held_out_pairs']} held-out pairs" if scored == setup["held_out_pairs"] else
                f"{setup['held_out_pairs']} held-out pairs ({scored} fit max_length and are scored)")
    text = [
        "# Loss comparison", "",
        f"{setup['model']}, {ADAPTER_WORDS.get(setup['adapters'], setup['adapters'])}; {setup['train_pairs']} train pairs, {held_out}; lr {setup['learning_rate']:g}, batch {setup['batch_size']}, "
        + (f"{setup['max_steps']} steps" if setup["max_steps"] and setup["max_steps"] > 0 else f"{setup['epochs']:g} epochs")
        + f", seed {setup['seed']}, max_length {setup['max_length']}. Every run: same data, seed and schedule.", "",
        markdown_table(comparison), "",
    ]
    if ref["reference_based_runs"]:
        text.append(f"Reference log-probs: the reference forward ran on {ref['forward_rows']} rows for "
                    f"{ref['reference_based_runs']} reference-based runs, whose own passes would cover "
                    f"{ref['forward_rows_unshared']} rows"
                    + (f" (shared through `{ref['cache_dir']}`)." if ref["shared"] else " (not shared)."))
        text.append("")
    if comparison.base_generation:
        b = comparison.base_generation
        text.append(f"Samples: {b['prompts']} held-out prompts × {b['samples_per_prompt']}, up to {b['max_new_tokens']} "
                    f"new tokens, temperature 1. Base model: mean reward {b['mean_reward']:.2f}, fluency "
                    f"{b['fluency']:.2f} nats/token.")
        text.append("")
    text += ["Columns:", ""] + [f"- **{k}**: {v}" for k, v in COLUMNS.items()
                                if comparison.base_generation or k not in ("win-rate", "reward", "fluency", "sample KL")]
    text += ["", "Each run's folder holds its adapter (or model), model card (README.md) and diagnostics.json/.png."]
    (out_dir / "comparison.md").write_text("\n".join(text) + "\n")
    (out_dir / "comparison.json").write_text(json.dumps(comparison.to_dict(), indent=2, allow_nan=False))
    if plot_comparison(comparison, out_dir / "comparison.png") is not None:
        files["plot"] = "comparison.png"
    return files


def plot_comparison(comparison: Comparison, path: Path) -> Path | None:
    """Four panels, one bar group per run: held-out reward accuracy, the margin's p10–p90 range with its median,
    chosen and rejected log-ratios per token, and KL per token (plus win-rate with a `reward_fn`)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    runs = [r for r in comparison.runs if r.status == "ok"]
    if not runs:
        return None
    names = [r.name for r in runs]
    x = list(range(len(runs)))
    panels = 5 if comparison.base_generation else 4
    fig = Figure(figsize=(3.2 * panels, 3.4))
    axes = fig.subplots(1, panels)
    axes[0].bar(x, [r.held_out["reward_accuracy"] for r in runs], color="tab:blue")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out reward accuracy", fontsize=9)
    for i, r in enumerate(runs):
        lo, mid, hi = r.held_out["margin_quantiles"]
        axes[1].plot([i, i], [lo, hi], color="tab:purple", lw=4, alpha=0.5)
        axes[1].plot(i, mid, "o", color="tab:purple")
    axes[1].axhline(0, color="grey", lw=0.8, ls="--")
    axes[1].set_title("margin p10–p90, median (own scale)", fontsize=9)
    chosen = [r.held_out["chosen_logratio_per_token"] or 0.0 for r in runs]
    rejected = [r.held_out["rejected_logratio_per_token"] or 0.0 for r in runs]
    axes[2].bar([i - 0.2 for i in x], chosen, width=0.4, color="tab:green", label="chosen")
    axes[2].bar([i + 0.2 for i in x], rejected, width=0.4, color="tab:red", label="rejected")
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].legend(fontsize=7)
    axes[2].set_title("log-ratio / token (0: reference-free)", fontsize=9)
    axes[3].bar(x, [r.held_out["kl_per_token"] for r in runs], color="tab:orange")
    axes[3].set_title("KL(π‖π_ref) / token, held-out", fontsize=9)
    if comparison.base_generation:
        axes[4].bar(x, [r.generation.get("win_rate", 0.0) for r in runs], color="tab:cyan")
        axes[4].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[4].set_ylim(0, 1)
        axes[4].set_title("win-rate vs base (reward_fn)", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"trl-dpo-plus compare: {comparison.setup['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
