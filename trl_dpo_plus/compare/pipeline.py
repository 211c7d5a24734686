"""`compare()`: train one run per loss, score every run on the held-out pairs in one pass, write the report."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from ..config import DPOPlusConfig
from ..diagnostics import read_report
from ..losses import get_loss
from ..metrics import last_train_log
from ..reference_cache import rows_read
from .held_out import AdapterPolicies, FullPolicy, evaluate_pairs, held_out_metrics
from .report import Comparison, write_comparison
from .runs import RunResult, RunSpec, parse_run, run_config
from .sampling import RewardFn, RewardFnError, check_reward_fn, generation

logger = logging.getLogger(__name__)


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
    from ..data import check_preference_dataset, data_kind_of

    if data_kind_of(dataset.column_names) != "paired":
        raise ValueError(f"compare needs preference pairs (prompt, chosen, rejected) for its {name} split, to score "
                         f"every loss on the same held-out pairs; it has columns {dataset.column_names}. Unpaired "
                         "losses (kto) are compared on the same pairs, unpaired for them.")
    return check_preference_dataset(dataset, name=name)


@dataclasses.dataclass
class _Sweep:
    """What every stage of one comparison reads: the runs, their configs and the shared inputs."""

    model: str
    args: DPOPlusConfig
    runs: list[RunSpec]
    configs: list[DPOPlusConfig]
    train_dataset: Any
    eval_dataset: Any
    out_dir: Path
    cache_dir: str | None
    processing_class: Any = None
    peft_config: Any = None
    quantization_config: Any = None
    progress: bool = True
    rescore: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)  # what the report must say it left out, and why
    samples_failed: bool = False  # the reward_fn failed on the samples: no sample columns

    @property
    def adapters(self) -> bool:
        return self.args.lora or self.args.qlora or self.peft_config is not None


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
    rescore: bool = False,
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
        rescore: score the runs already saved in `output_dir` (their adapter or model, card and diagnostics) without
            training them again, e.g. with a new `reward_fn`; runs not saved there are trained.

    A `reward_fn` is tried on a few held-out completions before the first run trains; if it fails later, the table
    is written without its columns and says why (`Comparison.notes`).
    """
    start = time.time()
    sweep = _plan(model, train_dataset, eval_dataset, losses, args, share_reference, processing_class=processing_class,
                  peft_config=peft_config, quantization_config=quantization_config, progress=progress, rescore=rescore)
    if reward_fn is not None:
        check_reward_fn(reward_fn, sweep.eval_dataset, processing_class)
    results, prepared_eval, tokenizer = train_runs(sweep, dataset_name)
    base_generation = score_held_out(sweep, results, prepared_eval, tokenizer, reward_fn, generation_prompts,
                                     samples_per_prompt, max_new_tokens)
    return _write(sweep, results, base_generation, seconds=time.time() - start)


def _plan(model, train_dataset, eval_dataset, losses, args, share_reference, **shared) -> _Sweep:
    """Every run's config, checked (with the data) before the first run trains."""
    args = args or DPOPlusConfig(output_dir="comparison", lora=True)
    out_dir = Path(args.output_dir)
    runs = [parse_run(loss) for loss in losses]
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"compare: two runs have the same name {labels}; give them different hyperparameters")
    cache_dir = (args.reference_cache_dir or str(out_dir / "reference_cache")) if share_reference else None
    configs = [run_config(args, run, out_dir, cache_dir) for run in runs]
    train_dataset, notes = _pairs_read(_check_paired(train_dataset, "train"), args)
    eval_dataset = _check_paired(eval_dataset, "eval")
    if len(eval_dataset) == 0:
        raise ValueError("compare: the held-out split is empty; every run is scored on held-out pairs")
    out_dir.mkdir(parents=True, exist_ok=True)
    return _Sweep(model, args, runs, configs, train_dataset, eval_dataset, out_dir, cache_dir, notes=notes, **shared)


def _pairs_read(train_dataset, args: DPOPlusConfig):
    """With `max_steps` reading fewer pairs than the train split holds: the pairs it reads, a seeded random subset
    that every run trains on, so the shared reference pass covers those only; and the note that says so."""
    read = rows_read(args, args.world_size)
    if read is None or read >= len(train_dataset):
        return train_dataset, []
    note = (f"max_steps {args.max_steps} reads {read} of the {len(train_dataset)} train pairs: every run trains on the "
            f"same {read} (a random subset, seed {args.seed}), and the reference pass covers those only.")
    logger.info("compare: %s", note)
    return train_dataset.shuffle(seed=args.seed).select(range(read)).flatten_indices(), [note]


def train_runs(sweep: _Sweep, dataset_name=None) -> tuple[list[RunResult], Any, Any]:
    """Stage 1: each run trained and saved in turn. A run that fails is kept as `failed` with its error (and
    `error.txt` in its folder); the others go on. Returns the results, the held-out pairs as a paired run prepared
    them (or `None`), and the tokenizer."""
    from ..trainer import DPOPlusTrainer

    results, prepared_eval, tokenizer = [], None, sweep.processing_class
    bar = tqdm(list(zip(sweep.runs, sweep.configs)), desc="compare", unit="run", disable=not sweep.progress, position=0)
    for run, config in bar:
        bar.set_postfix_str(run.label)
        spec = get_loss(run.loss)
        result = RunResult(name=run.label, loss=run.loss, hyperparameters=config.loss_kwargs_for(run.loss),
                           reference_free=not spec.requires_reference, output_dir=config.output_dir)
        results.append(result)
        t0 = time.time()
        trainer = None
        if sweep.rescore and _saved(config.output_dir):
            _read_saved(result, config.output_dir)
            continue
        try:
            trainer = DPOPlusTrainer(sweep.model, args=config, train_dataset=sweep.train_dataset,
                                     eval_dataset=sweep.eval_dataset, processing_class=sweep.processing_class,
                                     peft_config=sweep.peft_config, quantization_config=sweep.quantization_config)
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            if sweep.progress:
                trainer.add_callback(StepBar(run.label))
            if tokenizer is None:
                tokenizer = trainer.processing_class
            if prepared_eval is None and spec.data == "paired":
                prepared_eval = trainer.eval_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
            trainer.train()
            trainer.save_model()
            trainer.create_model_card(dataset_name=dataset_name)
            result.steps = trainer.state.global_step
            result.train_reward_accuracy = last_train_log(trainer.state.log_history).get("rewards/accuracies")
            report = read_report(config.output_dir) or {}
            result.flags = [f"{flag['flag']}@{flag['step']}" for flag in report.get("train", {}).get("flags", [])]
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
                    train_rows = trainer.reference_forwards.get("read_per_batch") or len(trainer.train_dataset)
                    result.reference_rows_alone = train_rows + len(trainer.eval_dataset)
                trainer.accelerator.free_memory()
            del trainer
            gc.collect()
    bar.close()
    return results, prepared_eval, tokenizer


def _saved(output_dir: str) -> bool:
    folder = Path(output_dir)
    return (folder / "adapter_config.json").exists() or (folder / "model.safetensors").exists()


def _read_saved(result: RunResult, output_dir: str) -> None:
    """A run saved by an earlier `compare`, read back from its card and report instead of trained again."""
    from huggingface_hub import ModelCard

    card = Path(output_dir) / "README.md"
    recorded = (ModelCard.load(card).data.to_dict().get("trl_dpo_plus") or {}) if card.exists() else {}
    result.steps = recorded.get("steps") or 0
    result.train_reward_accuracy = recorded.get("final_reward_accuracy")
    report = read_report(output_dir) or {}
    result.flags = [f"{flag['flag']}@{flag['step']}" for flag in report.get("train", {}).get("flags", [])]
    logger.info("compare: run %s read from %s (rescore: not trained again)", result.name, output_dir)


def score_held_out(sweep: _Sweep, results: list[RunResult], prepared_eval, tokenizer, reward_fn, generation_prompts,
                   samples_per_prompt: int, max_new_tokens: int) -> dict[str, Any]:
    """Stage 2: every trained run scored on the held-out pairs in one pass (and, with `reward_fn`, on samples);
    fills each result's `held_out` and `generation`, and returns the base model's generation numbers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = [r for r in results if r.status == "ok"]
    if not trained:
        return {}
    args = sweep.args
    if prepared_eval is None:  # only unpaired runs trained, or none (rescore): prepare them as a paired run would
        prepared_eval, prepared_with = _prepare_eval(sweep.model, args, sweep.eval_dataset, sweep.peft_config,
                                                     sweep.quantization_config, sweep.processing_class)
        tokenizer = tokenizer or prepared_with
    rows = prepared_eval.to_list()
    init_kwargs = _init_kwargs(args, sweep.quantization_config)
    base = AutoModelForCausalLM.from_pretrained(sweep.model, **init_kwargs)
    if sweep.adapters:
        ids = {r.name: f"run{i}" for i, r in enumerate(trained)}  # PEFT's adapter names cannot hold "."
        peft_model = PeftModel.from_pretrained(base, trained[0].output_dir, adapter_name=ids[trained[0].name])
        for r in trained[1:]:
            peft_model.load_adapter(r.output_dir, adapter_name=ids[r.name])
        groups = [AdapterPolicies(peft_model, ids)]
    else:  # full fine-tuning: each policy in turn, so the reference's held-out pass runs once per run
        groups = (FullPolicy.load(base, r.name, r.output_dir, init_kwargs) for r in trained)
    by_name = {r.name: (r, run, config) for r, run, config in zip(results, sweep.runs, sweep.configs)}
    base_generation: dict[str, Any] = {}
    for policies in groups:
        reference, per_policy = evaluate_pairs(
            policies, rows, tokenizer.pad_token_id, batch_size=args.per_device_eval_batch_size,
            max_length=args.max_length, truncation_mode=args.truncation_mode, progress=sweep.progress)
        for name, values in per_policy.items():
            result, run, config = by_name[name]
            result.held_out = held_out_metrics(run, config, reference, values)
        if reward_fn is not None and not sweep.samples_failed:
            try:
                base_generation = generation(policies, by_name, sweep.eval_dataset, tokenizer, reward_fn,
                                             generation_prompts, samples_per_prompt, max_new_tokens, args.seed,
                                             sweep.progress, base_generation)
            except RewardFnError as err:  # the held-out table is kept; the sample columns are left out, saying why
                logger.warning("compare: %s; the table is written without the sample columns", err)
                sweep.samples_failed = True
                sweep.notes.append(f"No sample columns (win-rate, reward, fluency, sample KL): {err}. Score the "
                                   "saved runs again with a fixed reward_fn: compare(..., rescore=True), or "
                                   "`trl-dpo-plus compare --rescore DIR`.")
                base_generation = {}
                for result in results:
                    result.generation = {}
        del policies
    del groups, base
    gc.collect()
    return {k: v for k, v in base_generation.items() if k not in ("samples", "scores")}


def _write(sweep: _Sweep, results: list[RunResult], base_generation: dict, seconds: float) -> Comparison:
    """Stage 3: `comparison.md`, `.json` and `.png`, with the setup and the reference pass's numbers."""
    args = sweep.args
    reference_stats = {
        "shared": sweep.cache_dir is not None,
        "cache_dir": _relative(sweep.cache_dir, sweep.out_dir),
        "reference_based_runs": sum(not r.reference_free for r in results),
        "forward_rows": sum(r.reference_rows for r in results),
        "forward_rows_unshared": sum(r.reference_rows_alone for r in results),
    }
    setup = {
        "model": _model_name(sweep.model), "train_pairs": len(sweep.train_dataset),
        "held_out_pairs": len(sweep.eval_dataset),
        "adapters": "qlora" if args.qlora else "lora" if sweep.adapters else "full fine-tuning",
        "learning_rate": args.learning_rate, "epochs": args.num_train_epochs, "max_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps, "seed": args.seed,
        "max_length": args.max_length, "seconds": round(seconds, 1),
    }
    comparison = Comparison(results, base_generation, reference_stats, setup, {}, notes=sweep.notes)
    comparison.files = write_comparison(comparison, sweep.out_dir)
    return comparison


def _init_kwargs(args: DPOPlusConfig, quantization_config) -> dict:
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    elif args.qlora:
        from ..qlora import qlora_defaults

        kwargs["quantization_config"] = qlora_defaults()[0]
    return kwargs


def _prepare_eval(model: str, args: DPOPlusConfig, eval_dataset, peft_config, quantization_config, processing_class):
    """The held-out pairs tokenized exactly as a paired run prepares them, and the tokenizer as the trainer set it up
    (a trainer is built for it, nothing trains)."""
    from ..trainer import DPOPlusTrainer

    config = dataclasses.replace(args, loss_type=["simpo"], beta=None, loss_kwargs=None, reference_cache_dir=None,
                                 output_dir=str(Path(args.output_dir) / ".held-out-preparation"))
    trainer = DPOPlusTrainer(model, args=config, train_dataset=eval_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, peft_config=peft_config,
                             quantization_config=quantization_config)
    return trainer.eval_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]), trainer.processing_class


def _model_name(model: str) -> str:
    from ..assets import default_model_path

    return "stories260K (embedded)" if os.path.abspath(str(model)) == os.path.abspath(default_model_path()) else str(model)


def _relative(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
