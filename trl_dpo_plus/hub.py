"""Hub-ready output: a model card that says exactly how the model was trained, and merging adapters.

The card is built with `huggingface_hub.ModelCard.from_template` (YAML metadata from `ModelCardData`, body from
`templates/model_card.md`). `Trainer.save_model` and `push_to_hub` write it; publishing goes through
`huggingface_hub` as in TRL, with the token from `hub_token`, `HF_TOKEN` or `huggingface-cli login`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from peft import PeftModel

from .citations import TRL, bibtex
from .diagnostics.report import read_report
from .metrics import last_train_log
from .data import looks_like_local_path
from .qlora import is_quantized
from .saving import best_effort, nonfinite_weights

TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"


def _versions() -> dict[str, str]:
    return {name: version(dist) for name, dist in (("trl_dpo_plus", "trl-dpo-plus"), ("trl", "trl"),
            ("transformers", "transformers"), ("peft", "peft"), ("torch", "torch"))}


def reference_mode(trainer) -> str:
    """How the reference log-probs were obtained, in words (an on-policy round says which model it was)."""
    if not trainer.requires_reference:
        return "none (reference-free loss)"
    on_policy = getattr(trainer, "training_round", None)  # set by `trl_dpo_plus.iterate`
    if on_policy and on_policy.get("reference_text"):
        return on_policy["reference_text"]
    read = trainer.reference_forwards.get("read_per_batch")
    if trainer.precompute_ref_logps and read:
        which = "frozen 'ref' adapter" if "ref" in getattr(trainer.model, "peft_config", {}) else "adapter-disabled base"
        return f"{which}, computed per batch on the {read} train rows max_steps reads (the eval split precomputed)"
    if trainer.precompute_ref_logps:
        return "precomputed before training (log-probs of the initial model)"
    if trainer.ref_model is not None:
        synced = f", synced every {trainer.args.ref_model_sync_steps} steps" if trainer.args.sync_ref_model else ""
        return f"separate frozen copy of the initial model{synced}"
    if isinstance(trainer.model, PeftModel):
        if "ref" in trainer.model.peft_config:
            return "frozen copy of the initial adapter ('ref' adapter)"
        return "adapter-disabled base model (one model in memory)"
    return "initial model"


def data_description(trainer) -> str:
    """The kind of data trained on, in words: pairs, or unpaired completions with their label counts and KL setup."""
    if trainer.data_kind == "paired":
        return "preference pairs (prompt, chosen, rejected)"
    text = "unpaired completions (prompt, completion, label)"
    if trainer.label_counts:
        text += f": {trainer.label_counts['desirable']} desirable, {trainer.label_counts['undesirable']} undesirable"
    if trainer.calculate_KL:
        text += (f"; KL baseline from each row's neighbour's completion within batches of "
                 f"{trainer.args.per_device_train_batch_size}, averaged over {trainer.args.world_size} process(es)")
    return text


def _quantization(model) -> dict | None:
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
            "bnb_4bit_quant_storage")
    # Booleans stay booleans in the card's YAML; dtypes and enums become their names
    return {k: config[k] if isinstance(config[k], (bool, int, float)) else str(config[k]) for k in keys if k in config}


def _lora(model) -> dict | None:
    if not isinstance(model, PeftModel):
        return None
    config = model.peft_config["default"]
    targets = config.target_modules
    if isinstance(targets, (set, list)):  # PEFT resolves "all-linear" to module paths: list the layer names once
        targets = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": targets, "use_rslora": config.use_rslora, "use_dora": config.use_dora}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub repo id of a model or dataset given by id or by a local Hub-cache snapshot path; None for other
    local folders (a path is never a Hub id)."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path if _HUB_ID.match(name_or_path) and not looks_like_local_path(name_or_path) else None
    for part in path.resolve().parts:  # ~/.cache/huggingface/hub/models--org--name/snapshots/<sha>
        if part.startswith(("models--", "datasets--")):
            return part.split("--", 1)[1].replace("--", "/", 1)
    return None


def display_name(name_or_path: str) -> str:
    """How a card names a model or dataset: its Hub id, or a local folder's or file's own name (no machine path)."""
    return hub_id(name_or_path) or Path(str(name_or_path).rstrip("/")).name


LICENSE_TEXTS = {"MIT License": "mit", "Apache License": "apache-2.0"}


def base_license(name_or_path: str) -> str | None:
    """A local base model's licence: its README metadata's `license`, else recognised from its LICENSE file."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return None
    if (path / "README.md").exists() and (path / "README.md").read_text(errors="replace").startswith("---"):
        try:
            license_ = ModelCard.load(path / "README.md").data.license
        except Exception:  # a README without (valid) metadata
            license_ = None
        if license_:
            return license_
    if (path / "LICENSE").exists():
        head = (path / "LICENSE").read_text(errors="replace")[:400]
        return next((hub for text, hub in LICENSE_TEXTS.items() if text in head), None)
    return None


def _eval_results(trainer, dataset: str | None) -> list[EvalResult] | None:
    """The last evaluation's metrics as `model-index` results, when evaluation ran."""
    evaluations = [h for h in trainer.state.log_history if "eval_rewards/accuracies" in h]
    if not evaluations:
        return None
    last, name = evaluations[-1], display_name(dataset) if dataset else "evaluation split"
    metrics = (("accuracy", "reward accuracy", "eval_rewards/accuracies"),
               ("reward_margin", "reward margin", "eval_rewards/margins"), ("loss", "loss", "eval_loss"))
    return [EvalResult(task_type="text-generation", task_name="Preference optimisation",
                       dataset_type=(hub_id(dataset) if dataset else None) or name, dataset_name=name,
                       metric_type=kind, metric_name=f"{label} (step {last.get('step')})",
                       metric_value=round(float(last[key]), 4))
            for kind, label, key in metrics if key in last]


def build_model_card(trainer, model_name: str | None = None, dataset_name: str | list[str] | None = None,
                     tags: list[str] | None = None, output_dir: str | None = None) -> ModelCard:
    """The card for what `trainer` trained, with every loss hyperparameter actually used."""
    args = trainer.args
    output_dir = Path(output_dir or args.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = getattr(model.config, "_name_or_path", "") or ""
    base_model = args.base_model or hub_id(base)
    is_adapter = isinstance(model, PeftModel)
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    losses = []
    for spec, kwargs, weight in zip(trainer.loss_specs, trainer.loss_kwargs, trainer.loss_weights):
        losses.append({"name": spec.name, "weight": weight, "kwargs": kwargs, "paper": spec.paper,
                       "formula": spec.formula, "requires_reference": spec.requires_reference,
                       "kwargs_text": ", ".join(f"{k}={v}" for k, v in kwargs.items())})
    citations = list(dict.fromkeys(c for c in (bibtex(loss["paper"]) for loss in losses) if c)) + [TRL]
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    final = last_train_log(trainer.state.log_history)
    training = {
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 3),
        "learning_rate": args.learning_rate, "lr_scheduler": str(args.lr_scheduler_type).split(".")[-1].lower(),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": args.world_size,
        "max_length": args.max_length, "truncation_mode": args.truncation_mode,
        "pair layout": f"{trainer.layout.name} ({trainer.layout_reason})", "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
        "final reward accuracy": round(final["rewards/accuracies"], 4) if final else None,
        "final reward margin": round(final["rewards/margins"], 4) if final else None,
        "final loss": round(final["loss"], 4) if final and "loss" in final else None,
    }
    nonfinite = nonfinite_weights(model)
    on_policy = getattr(trainer, "training_round", None)
    if on_policy:
        training = {"on-policy round": on_policy["text"], **training}
    training = {"data": data_description(trainer), **training,
                "final weights": f"NON-FINITE in {len(nonfinite)} tensors" if nonfinite else "finite"}
    diagnostics = None
    report = read_report(args.output_dir)
    if report is not None:
        train = report.get("train") or {}
        number = lambda v: "non-finite" if v is None else f"{v:.4g}"  # noqa: E731  (strict JSON wrote NaN as null)
        summary = {k: f"{number(v['first'])} → {number(v['last'])}" for k, v in train.get("summary", {}).items()}
        plot = Path(args.output_dir) / "diagnostics.png"
        if plot.exists() and output_dir.resolve() != plot.parent.resolve():
            output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(plot, output_dir / plot.name)
        diagnostics = {"healthy": train.get("healthy", True), "flags": train.get("flags", []), "summary": summary,
                       "plot": plot.name if plot.exists() else None}

    loss_names = [loss["name"] for loss in losses]
    all_tags = list(dict.fromkeys([*trainer._tag_names, *loss_names, *(tags or []),
                                   *(["lora"] if is_adapter else []), *(["qlora"] if args.qlora else [])]))
    metadata = {
        "loss_type": loss_names, "loss_weights": list(trainer.loss_weights),
        "loss_kwargs": {loss["name"]: loss["kwargs"] for loss in losses},
        "reference": reference_mode(trainer), "quantization": _quantization(model), "lora": _lora(model),
        "data": trainer.data_kind, "label_counts": trainer.label_counts,
        "pair_layout": trainer.layout.name, "truncation_mode": args.truncation_mode,
        "pairs": trainer.truncation_counts,
        "steps": trainer.state.global_step,
        "final_reward_accuracy": training["final reward accuracy"], "final_reward_margin": training["final reward margin"],
        "diagnostics_flags": [f["flag"] for f in diagnostics["flags"]] if diagnostics else None,
        "weights_finite": not nonfinite,
        **({"iterate": {k: v for k, v in on_policy.items() if k not in ("text", "reference_text")}} if on_policy else {}),
    }
    model_name = model_name or (repo_id or output_dir.resolve().name).split("/")[-1]
    card_data = ModelCardData(
        base_model=base_model, license=args.license or base_license(base),
        library_name="peft" if is_adapter else "transformers", pipeline_tag="text-generation",
        tags=all_tags, datasets=[d for d in map(hub_id, datasets) if d] or None, model_name=model_name,
        eval_results=_eval_results(trainer, datasets[0] if len(datasets) == 1 else None), trl_dpo_plus=metadata,
    )
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=model_name,
        base_model_display=base_model or (f"{display_name(base)} (a local model)" if base else "unknown"),
        is_adapter=is_adapter, dataset_name=", ".join(map(display_name, datasets)) or None, losses=losses,
        reference_mode=metadata["reference"], ld_alpha=args.ld_alpha, f_divergence_type=args.f_divergence_type,
        use_weighting=args.use_weighting, quantization=metadata["quantization"], lora=metadata["lora"],
        training=training, diagnostics=diagnostics, versions=_versions(), nonfinite=nonfinite[:5],
        nonfinite_count=len(nonfinite),
        repo_or_path=repo_id or f"path/to/{output_dir.resolve().name}", citations=citations,
    )


def write_model_card(trainer, output_dir: str | None = None, tags: str | list[str] | None = None, **kwargs) -> None:
    """`build_model_card` saved as `README.md` in `output_dir`, best-effort: a card that cannot be built or written
    (a full disk, an unwritable folder) is a warning, never the loss of the weights saved before it."""
    path = Path(output_dir or trainer.args.output_dir) / "README.md"
    tags = [tags] if isinstance(tags, str) else tags
    best_effort("the model card", path, lambda: build_model_card(
        trainer, tags=tags, output_dir=output_dir, **kwargs).save(str(path)))


def adapter_base_id(trainer, warn: bool = True) -> str | None:
    """The Hub id a saved adapter names as its base (`base_model`, or the one inferred), so the folder loads on any
    machine; `None` for a full model, or a local base with no Hub id: then a warning (with `warn`), and for
    `push_to_hub` an error before anything is written or pushed (no one could load the pushed adapter)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(model, PeftModel):
        return None
    base = getattr(model.get_base_model().config, "_name_or_path", "") or ""
    repo = trainer.args.base_model or hub_id(base)
    if repo is None:
        message = (f"the adapter's base is the local folder {display_name(base)!r}, which has no Hub id: "
                   "adapter_config.json names its path, so the adapter loads only where that folder exists. Set "
                   "base_model (--base_model) to the base's Hub id")
        if trainer.args.push_to_hub:
            raise ValueError(f"push_to_hub: {message} before pushing.")
        if warn and trainer.is_world_process_zero():
            logging.getLogger(__name__).warning("%s.", message)
    return repo


def name_adapter_base(output_dir: str, repo: str | None) -> None:
    """Write `repo` as the base of the adapter saved in `output_dir` (`adapter_config.json`), where there is one."""
    import json

    config_path = Path(output_dir) / "adapter_config.json"
    if repo is None or not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if config.get("base_model_name_or_path") != repo:
        config["base_model_name_or_path"] = repo
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def merge_and_save(model, output_dir: str | os.PathLike, *, dequantize: bool = False, tokenizer=None,
                   dtype: torch.dtype | str = "auto") -> Path:
    """Write a merged full model (base + LoRA) for people who want one.

    The base is reloaded from its path in `dtype` (default: its own) and the adapter merged into it, so the trained model is left as it
    is. A 4-bit base is refused unless `dequantize=True`: merging into NF4 weights re-quantises them (lossy), so the
    base is reloaded unquantised instead, which needs the full-precision weights and the memory for them.
    """
    if not isinstance(model, PeftModel):
        raise TypeError("merge_and_save needs a PeftModel (a model trained with adapters); a full model is already merged")
    if is_quantized(model.get_base_model()) and not dequantize:
        raise ValueError(
            "The base model is quantised (4/8-bit). Merging into quantised weights loses precision, so merge_and_save "
            "reloads the base unquantised: pass dequantize=True to accept that (it needs the full-precision weights "
            "and the memory for them), or publish the adapter as it is."
        )
    from peft import AutoPeftModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        merged = AutoPeftModelForCausalLM.from_pretrained(tmp, dtype=dtype).merge_and_unload()
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir
