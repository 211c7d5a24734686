"""`iterate()`: rounds of sample → score → pair → train, each round starting from the previous round's weights."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, set_seed

from ..compare.held_out import AdapterPolicies, FullPolicy
from ..compare.pipeline import StepBar, _init_kwargs, _model_name
from ..compare.sampling import RewardFn, prompt_text, sample, score, scored_samples, win_rate
from ..config import DPOPlusConfig
from ..diagnostics import read_report
from ..metrics import last_train_log
from .pairs import best_vs_worst, labelled
from .report import REPORT_JSON, IterateReport, write_report
from .scoring import RewardModelScorer

logger = logging.getLogger(__name__)

REFERENCES = {
    "base": "fixed: the round-0 base model (adapter disabled), log-probs precomputed once for this round's pairs",
    "previous": "updated: the previous round's policy, log-probs precomputed once for this round's pairs",
}
HELD_OUT_SEED = 1000  # added to `args.seed`: every round's held-out samples are drawn with the same seed


@dataclasses.dataclass
class _Plan:
    """What every round reads."""

    model: str
    args: DPOPlusConfig
    out_dir: Path
    train_prompts: list
    eval_prompts: list
    reward_fn: RewardFn
    tokenizer: Any
    rounds: int
    samples_per_prompt: int
    pairs_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    reference: str
    label_threshold: float | None
    peft_config: Any
    quantization_config: Any
    progress: bool

    @property
    def adapters(self) -> bool:
        return self.args.lora or self.args.qlora or self.peft_config is not None

    def round_dir(self, r: int) -> Path:
        return self.out_dir / f"round-{r}"


def iterate(
    model: str,
    train_prompts,
    eval_prompts,
    args: DPOPlusConfig | None = None,
    *,
    reward_fn: RewardFn | None = None,
    reward_model: str | None = None,
    rounds: int = 3,
    samples_per_prompt: int = 4,
    pairs_per_prompt: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    reference: str = "base",
    label_threshold: float | None = None,
    full_finetune: bool = False,
    resume: bool = False,
    processing_class=None,
    peft_config=None,
    quantization_config=None,
    progress: bool = True,
) -> IterateReport:
    """On-policy rounds: each round samples `samples_per_prompt` completions per training prompt from the current
    policy, scores them, builds training rows and trains one `DPOPlusTrainer` run from the current weights.

    Args:
        model: the round-0 base, a local folder or Hub id.
        train_prompts, eval_prompts: prompts (strings or conversations), or datasets with a `prompt` column (a
            preference dataset's prompts, each once). The held-out prompts are sampled by the base and by every
            round's policy, at temperature 1 and top-p 1 with one fixed seed, and never trained on.
        args: the training configuration of every round (`output_dir` holds `round-<r>/` and the report). LoRA
            adapters unless `full_finetune` or `qlora`/`peft_config` say otherwise; each round's rows are new, so
            `num_train_epochs` is per round.
        reward_fn / reward_model: the scorer, a TRL-style `reward_fn(prompts=[...], completions=[...])`, or the path
            of a local `AutoModelForSequenceClassification` (`RewardModelScorer`). Exactly one.
        samples_per_prompt, max_new_tokens, temperature, top_p: the training prompts' sampling (seed `args.seed + r`).
        pairs_per_prompt: paired losses train on best-vs-worst pairs (then second best vs second worst, ...).
        label_threshold: unpaired losses (`kto`) label a sample desirable above it (default: its prompt's mean).
        reference: `"base"` (fixed to the round-0 model) or `"previous"` (the previous round's policy).
        resume: continue after the last finished round recorded in `output_dir/iterate.json`.

    Ties (no score difference) are dropped and counted. A round that fails is recorded with its error (`error.txt`
    in its folder) and the loop stops; everything before it stays saved and `resume=True` continues from there.
    """
    plan = _plan(model, train_prompts, eval_prompts, args, reward_fn, reward_model, rounds, samples_per_prompt,
                 pairs_per_prompt, max_new_tokens, temperature, top_p, reference, label_threshold, full_finetune,
                 processing_class, peft_config, quantization_config, progress)
    report = _resumed(plan) if resume else None
    if report is None:
        report = IterateReport(setup=_setup(plan), rounds=[])
        report.rounds.append(_base_row(plan))
        write_report(report, plan.out_dir)
    done = report.finished_rounds
    bar = tqdm(range(done + 1, plan.rounds + 1), desc="iterate", unit="round", disable=not plan.progress, position=0)
    for r in bar:
        bar.set_postfix_str(f"round {r}/{plan.rounds}")
        row = _round(plan, r, report)
        report.rounds.append(row)
        write_report(report, plan.out_dir)
        if row["status"] != "ok":
            logger.warning("iterate: round %d failed (%s); rounds 1-%d are saved in %s; fix it and run again with "
                           "resume=True (--resume)", r, row["error"], r - 1, plan.out_dir)
            break
    bar.close()
    return report


def _plan(model, train_prompts, eval_prompts, args, reward_fn, reward_model, rounds, samples_per_prompt,
          pairs_per_prompt, max_new_tokens, temperature, top_p, reference, label_threshold, full_finetune,
          processing_class, peft_config, quantization_config, progress) -> _Plan:
    """Every argument checked before anything loads or samples."""
    from transformers import AutoTokenizer

    from ..data import check_model_path

    if (reward_fn is None) == (reward_model is None):
        raise ValueError("iterate needs exactly one scorer: reward_fn (a TRL-style function, --reward_fn "
                         "module:function) or reward_model (a local sequence-classification model, "
                         "--reward_model PATH)")
    if reference not in REFERENCES:
        raise ValueError(f"reference={reference!r}: choose 'base' (fixed to the round-0 model) or 'previous' (the "
                         "previous round's policy)")
    for name, value, low in (("rounds", rounds, 1), ("samples_per_prompt", samples_per_prompt, 2),
                             ("pairs_per_prompt", pairs_per_prompt, 1), ("max_new_tokens", max_new_tokens, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer ≥ {low}")
    if pairs_per_prompt > samples_per_prompt // 2:
        raise ValueError(f"pairs_per_prompt={pairs_per_prompt} needs samples_per_prompt ≥ {2 * pairs_per_prompt} "
                         f"(each pair takes two distinct samples); it is {samples_per_prompt}")
    if not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature}, top_p={top_p}: temperature must be > 0 and top_p in (0, 1]")
    check_model_path(model)
    args = args or DPOPlusConfig(output_dir="iterate")
    if full_finetune and (args.lora or args.qlora or peft_config is not None):
        raise ValueError("full_finetune=True with lora/qlora/peft_config: choose adapters or the full model")
    if not full_finetune and not (args.lora or args.qlora or peft_config is not None):
        args = dataclasses.replace(args, lora=True)
    train = distinct_prompts(train_prompts, "train_prompts")
    held_out = distinct_prompts(eval_prompts, "eval_prompts")
    tokenizer = processing_class or AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for prompts in (train, held_out):
        if not isinstance(prompts[0], str) and not tokenizer.chat_template:
            raise ValueError("the prompts are conversations but the tokenizer has no chat template to turn them into "
                             "the model's input; give plain-text prompts or a tokenizer with a chat template")
    if reward_model is not None:
        reward_fn = RewardModelScorer(reward_model)
    score(reward_fn, held_out[:1], [["", " ok"]])  # a scorer that cannot run stops here, before any sampling
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _Plan(str(model), args, out_dir, train, held_out, reward_fn, tokenizer, rounds, samples_per_prompt,
                 pairs_per_prompt, max_new_tokens, temperature, top_p, reference, label_threshold, peft_config,
                 quantization_config, progress)


def distinct_prompts(source, name: str) -> list:
    """Prompts from a list or a dataset's `prompt` column, each once, in order."""
    if hasattr(source, "column_names"):
        if "prompt" not in source.column_names:
            raise ValueError(f"{name}: the dataset has no 'prompt' column (columns {source.column_names})")
        source = source["prompt"]
    prompts = list({json.dumps(p, sort_keys=True): p for p in source}.values())
    if not prompts:
        raise ValueError(f"{name}: no prompts")
    return prompts


def _setup(plan: _Plan) -> dict:
    args = plan.args
    return {
        "model": _model_name(plan.model), "loss_type": list(args.loss_type), "reference": plan.reference,
        "adapters": "qlora" if args.qlora else "lora" if plan.adapters else "full fine-tuning",
        "rounds": plan.rounds, "train_prompts": len(plan.train_prompts), "eval_prompts": len(plan.eval_prompts),
        "samples_per_prompt": plan.samples_per_prompt, "pairs_per_prompt": plan.pairs_per_prompt,
        "max_new_tokens": plan.max_new_tokens, "temperature": plan.temperature, "top_p": plan.top_p,
        "learning_rate": args.learning_rate, "epochs_per_round": args.num_train_epochs, "max_steps": args.max_steps,
        "seed": args.seed, "scorer": _scorer_name(plan),
    }


def _scorer_name(plan: _Plan) -> str:
    return getattr(plan.reward_fn, "__name__", type(plan.reward_fn).__name__)


def _resumed(plan: _Plan) -> IterateReport | None:
    """The report of an earlier run in `output_dir`, its failed round dropped; `None` when there is none."""
    path = plan.out_dir / REPORT_JSON
    if not path.exists():
        logger.info("iterate: resume=True but %s does not exist; starting from round 0", path)
        return None
    report = IterateReport.from_dict(json.loads(path.read_text()))
    setup = _setup(plan)
    changed = [k for k in ("model", "loss_type", "reference", "adapters", "samples_per_prompt", "eval_prompts")
               if report.setup.get(k) != setup[k]]
    if changed:
        was = ", ".join(f"{k}: {report.setup.get(k)!r}" for k in changed)
        raise ValueError(f"resume: {path} was written with other settings ({was}; now "
                         f"{', '.join(repr(setup[k]) for k in changed)}); resume with the same settings or use "
                         "another output_dir")
    report.rounds = [row for row in report.rounds if row["status"] == "ok"]
    report.setup["rounds"] = plan.rounds
    logger.info("iterate: resuming after round %d of %s", report.finished_rounds, path)
    return report


# -- the models: the base, the previous round's policy, and each round's trainer -----------------------------------
def _device(plan: _Plan) -> torch.device:
    """Where training runs, so samples are drawn there too: this process's GPU when there is one, else the CPU."""
    if torch.cuda.is_available() and not plan.args.use_cpu:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cpu")


def _load_base(plan: _Plan):
    from transformers import AutoModelForCausalLM

    kwargs = _init_kwargs(plan.args, plan.quantization_config)
    kwargs.setdefault("device_map", {"": _device(plan)})
    return AutoModelForCausalLM.from_pretrained(plan.model, **kwargs).eval()


def _load_policy(plan: _Plan, r: int, trainable: bool = False):
    """Round `r`'s policy read back from its folder (round 0: the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if r == 0:
        model = _load_base(plan)
    elif plan.adapters:
        base = _load_base(plan)
        if trainable and plan.args.qlora:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=plan.args.gradient_checkpointing)
        model = PeftModel.from_pretrained(base, plan.round_dir(r), is_trainable=trainable)
    else:
        model = AutoModelForCausalLM.from_pretrained(plan.round_dir(r), **(plan.args.model_init_kwargs or {}))
        model.to(_device(plan))
    return model if trainable else model.eval()


def _trainer(plan: _Plan, r: int, rows, config: DPOPlusConfig):
    """Round `r`'s trainer, starting from round `r - 1`'s weights, its reference as `plan.reference` says."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..trainer import DPOPlusTrainer

    shared = {"train_dataset": rows, "processing_class": plan.tokenizer}
    previous = plan.round_dir(r - 1)
    if r == 1 or (plan.adapters and plan.reference == "base"):
        # The base with a fresh adapter: TRL precomputes the reference with the adapter disabled (the base)
        trainer = DPOPlusTrainer(plan.model, args=config, peft_config=plan.peft_config,
                                 quantization_config=plan.quantization_config, **shared)
        if r > 1:  # then the previous round's adapter weights are loaded into it, and training goes on from there
            weights = load_file(previous / "adapter_model.safetensors")
            loaded = set_peft_model_state_dict(trainer.model, weights, adapter_name="default")
            missing = [k for k in loaded.missing_keys if "lora_" in k]
            if loaded.unexpected_keys or missing:
                raise ValueError(f"round {r}: round {r - 1}'s adapter does not fit this round's LoRA layout "
                                 f"(unexpected {loaded.unexpected_keys[:3]}, missing {missing[:3]})")
        return trainer
    if plan.adapters:  # the previous adapter, trainable; TRL's frozen "ref" copy of it is the reference
        config = dataclasses.replace(config, lora=False, qlora=False)  # keeps the resolved learning rate
        trainer = DPOPlusTrainer(_load_policy(plan, r - 1, trainable=True), args=config, **shared)
        if "ref" not in trainer.model.peft_config:  # TRL's behaviour this mode rests on (trl 1.16's DPOTrainer)
            raise RuntimeError("reference='previous' relies on TRL's DPOTrainer copying a PeftModel's adapter into a "
                               "frozen 'ref' adapter as the reference; this TRL version did not, so the reference "
                               "would be the base. Use reference='base', or the TRL range trl-dpo-plus pins")
        return trainer
    # full fine-tuning from the previous round's model; the reference is the base, or (no ref_model) that model
    ref_model = _load_base(plan) if plan.reference == "base" else None
    return DPOPlusTrainer(str(previous), ref_model=ref_model, args=config, **shared)


# -- one round ------------------------------------------------------------------------------------------------------
def _base_row(plan: _Plan) -> dict:
    """Round 0: the base model's held-out samples, the yardstick of every later round."""
    t0 = time.time()
    base = _load_base(plan)
    held = _held_out(plan, FullPolicy(base, "base", base), None)
    del base
    return {"round": 0, "status": "ok", **held, "seconds": round(time.time() - t0, 1)}


def _held_out(plan: _Plan, policies, name: str | None) -> dict:
    texts = [prompt_text(p, plan.tokenizer) for p in plan.eval_prompts]
    return scored_samples(policies, name, plan.eval_prompts, texts, plan.tokenizer, plan.reward_fn,
                          plan.samples_per_prompt, plan.max_new_tokens, plan.args.seed + HELD_OUT_SEED,
                          progress="  held-out samples" if plan.progress else None)


def _round(plan: _Plan, r: int, report: IterateReport) -> dict:
    row: dict[str, Any] = {"round": r, "status": "ok", "reference": plan.reference}
    folder = plan.round_dir(r)
    t0, trainer = time.time(), None
    (folder / "error.txt").unlink(missing_ok=True)  # an earlier failure of this round, now run again
    try:
        rows, row["pairs"], row["ties"] = _training_rows(plan, r, folder)
        if len(rows) == 0:
            raise ValueError(f"round {r}: every sample scored the same as its prompt's others, so there is nothing to "
                             f"learn from ({row['ties']} ties); raise samples_per_prompt or temperature")
        config = dataclasses.replace(plan.args, output_dir=str(folder), eval_strategy="no",
                                     reference_cache_dir=str(plan.out_dir / "reference_cache"))
        set_seed(plan.args.seed + r)  # the fresh adapter's init does not depend on what ran before in the process
        trainer = _trainer(plan, r, rows, config)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if plan.progress:
            trainer.add_callback(StepBar(f"round {r}"))
        trainer.train()
        _save_round(plan, r, trainer, row, folder)
        row.update(_after_training(plan, r, trainer, report))
    except Exception as err:  # the loop stops; what was saved before stays
        row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
    finally:
        row["seconds"] = round(time.time() - t0, 1)
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer
        gc.collect()
    return row


def _training_rows(plan: _Plan, r: int, folder: Path):
    """Samples of the training prompts from round `r - 1`'s policy, scored, as pairs or labelled completions."""
    policy = _load_policy(plan, r - 1)
    texts = [prompt_text(p, plan.tokenizer) for p in plan.train_prompts]
    samples = sample(policy, plan.tokenizer, texts, plan.samples_per_prompt, plan.max_new_tokens, plan.args.seed + r,
                     temperature=plan.temperature, top_p=plan.top_p,
                     progress=f"  round {r} samples" if plan.progress else None)
    del policy
    scores = score(plan.reward_fn, plan.train_prompts, samples)
    if plan.args.data_kind == "paired":
        rows, ties = best_vs_worst(plan.train_prompts, samples, scores, plan.pairs_per_prompt)
    else:
        rows, ties = labelled(plan.train_prompts, samples, scores, plan.label_threshold)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.jsonl", "w") as file:  # every sample with its score, the rows' source
        for prompt, texts, values in zip(plan.train_prompts, samples, scores):
            file.write(json.dumps({"prompt": prompt, "samples": texts, "scores": values}) + "\n")
    rows.to_json(folder / "rows.jsonl")
    score_columns = [c for c in ("chosen_score", "rejected_score", "score") if c in rows.column_names]
    return rows.remove_columns(score_columns), len(rows), ties


def _save_round(plan: _Plan, r: int, trainer, row: dict, folder: Path) -> None:
    """The round's adapter (or model) and card, the card saying which round and which reference."""
    from ..saving import best_effort

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if plan.adapters and "ref" in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter("ref")  # TRL's frozen reference copy: the previous round's adapter, not this one's
    row["steps"] = trainer.state.global_step
    row["train_reward_accuracy"] = last_train_log(trainer.state.log_history).get("rewards/accuracies")
    reference = REFERENCES[plan.reference] if r > 1 else REFERENCES["base"]
    trainer.training_round = {
        "round": r, "rounds": plan.rounds, "reference": plan.reference if r > 1 else "base", "pairs": row["pairs"],
        "ties_dropped": row["ties"], "samples_per_prompt": plan.samples_per_prompt,
        "text": f"round {r} of {plan.rounds} of `trl-dpo-plus iterate`: {row['pairs']} rows from "
                f"{plan.samples_per_prompt} samples per prompt of round {r - 1}'s policy, scored by "
                f"{_scorer_name(plan)} ({row['ties']} ties dropped); trained from round {r - 1}'s weights",
        "reference_text": reference,
    }
    trainer.save_model()
    best_effort("the model card", folder / "README.md",
                lambda: trainer.create_model_card(dataset_name=f"on-policy samples, round {r}"))
    ref_columns = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in trainer.train_dataset.column_names]
    if ref_columns:  # the rows with the reference log-probs this round trained against
        rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
        if len(rows) == len(trainer.train_dataset):
            refs = trainer.train_dataset.select_columns(ref_columns).to_list()
            (folder / "rows.jsonl").write_text("".join(json.dumps({**a, **b}) + "\n" for a, b in zip(rows, refs)))
    report = read_report(folder) or {}
    row["flags"] = [f"{flag['flag']}@{flag['step']}" for flag in report.get("train", {}).get("flags", [])]


def _after_training(plan: _Plan, r: int, trainer, report: IterateReport) -> dict:
    """The round's policy on the held-out prompts: reward, win-rates, sample KL to the base, fluency."""
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    if plan.adapters:
        policies, name = AdapterPolicies(model, {"policy": "default"}), "policy"
    else:
        policies, name = FullPolicy(_load_base(plan), "policy", model), "policy"
    held = _held_out(plan, policies, name)
    base, previous = report.rounds[0], report.rounds[-1]
    held["win_rate_vs_base"], held["ties_vs_base"] = win_rate(held["scores"], base["scores"])
    held["win_rate_vs_previous"], _ = win_rate(held["scores"], previous["scores"])
    return held
