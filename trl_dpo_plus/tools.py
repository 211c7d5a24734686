"""After training: look at a run again (`report`), try its adapter beside the base (`sample`), ship a merged model
(`merge`). Behind `trl-dpo-plus report | sample | merge`; each works on the folder `train`/`save_model` wrote."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# What each flag means, in a line (the detectors' messages carry the numbers)
FLAG_MEANINGS = {
    "both_falling": "chosen log-probs fall below the reference while the margin grows (likelihood displacement)",
    "rejected_collapse": "the rejected completions' likelihood collapsed far below the reference",
    "rejected_driven": "the margin grows mostly by pushing the rejected side down",
    "length_exploitation": "the margin is explained by the length gap more than by content",
    "nonfinite": "a loss, log-prob or gradient was NaN or infinite: the run diverged",
    "not_learning": "the margins stayed within noise: the learning rate is likely too low",
}


def report(run_dir: str | Path) -> str:
    """The run's diagnostics in words: health, each flag with its step and meaning, and the first → last margins,
    log-ratios and length bias. Rebuilds `diagnostics.json`/`.png` from `trainer_state.json` when the folder is a
    checkpoint (or the report is missing)."""
    from .diagnostics import read_report, rebuild_report

    run_dir = Path(run_dir)
    state = run_dir / "trainer_state.json"
    data = rebuild_report(state) if state.exists() else read_report(run_dir)
    if data is None:
        raise FileNotFoundError(f"{run_dir} has no diagnostics.json or trainer_state.json: name a folder that "
                                "trl-dpo-plus train (or save_model) wrote, or one of its checkpoint-N folders")
    if "diagnostics.png" not in {p.name for p in run_dir.iterdir()} and not state.exists():
        from .diagnostics import plot_report

        plot_report(data, run_dir / "diagnostics.png")
    train = data.get("train")
    if not train:
        return f"{run_dir}: no training step was logged"
    lines = [f"{run_dir}: {'healthy, no flag raised' if train['healthy'] else 'NOT healthy'}"
             + (f" (interrupted: {data['interrupted']})" if data.get("interrupted") else "")]
    for flag in train["flags"]:
        lines.append(f"  step {flag['step']}: {flag['flag']}: {FLAG_MEANINGS.get(flag['flag'], '')}")
    number = lambda v: "non-finite" if v is None else f"{v:+.4g}"  # noqa: E731
    names = {"margin_mean": "reward margin (mean)", "chosen_logratio": "chosen log-ratio per token",
             "rejected_logratio": "rejected log-ratio per token", "length_r2": "length bias (R²)", "loss": "loss"}
    for key, label in names.items():
        if key in train["summary"]:
            s = train["summary"][key]
            lines.append(f"  {label}: {number(s['first'])} → {number(s['last'])} (steps {s['steps'][0]}–{s['steps'][1]})")
    if data.get("plot"):
        lines.append(f"  plot: {run_dir / data['plot']}")
    return "\n".join(lines)


def load_adapter_run(run_dir: str | Path, base: str | None = None):
    """`(peft_model, tokenizer)` of an adapter folder; `base` overrides the base named in `adapter_config.json`."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no adapter (adapter_config.json): name the output_dir of a run "
                                "trained with --lora or --qlora")
    base = base or PeftConfig.from_pretrained(str(run_dir)).base_model_name_or_path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), str(run_dir))
    tokenizer_dir = run_dir if (run_dir / "tokenizer_config.json").exists() else base
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


def sample(run_dir: str | Path, prompts: list[str], *, max_new_tokens: int = 48, seed: int = 0,
           base: str | None = None) -> list[dict[str, str]]:
    """For each prompt, the adapter's completion and the base's (adapter disabled), greedy, side by side."""
    import torch

    model, tokenizer = load_adapter_run(run_dir, base)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        with torch.no_grad():
            tuned = model.generate(**inputs, **kwargs)
            with model.disable_adapter():
                original = model.generate(**inputs, **kwargs)
        cut = inputs["input_ids"].shape[1]
        rows.append({"prompt": prompt, "adapter": tokenizer.decode(tuned[0, cut:], skip_special_tokens=True),
                     "base": tokenizer.decode(original[0, cut:], skip_special_tokens=True)})
    return rows


def merge(run_dir: str | Path, output_dir: str | Path, *, dtype: str | None = None, base: str | None = None) -> Path:
    """The base with the adapter merged in, saved to `output_dir` in the base's own dtype (unless `dtype`), with the
    tokenizer and a model card that says it was merged from the adapter run."""
    import torch
    from huggingface_hub import ModelCard

    model, tokenizer = load_adapter_run(run_dir, base)
    merged = model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(getattr(torch, dtype))
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    card_path = Path(run_dir) / "README.md"
    note = (f"\n> Merged: the LoRA adapter of this run merged into its base (`merge_and_unload`), saved in "
            f"{str(merged.dtype).removeprefix('torch.')}. The adapter alone is the run's own output folder.\n")
    if card_path.exists():
        card = ModelCard.load(card_path)
        card.data.library_name = "transformers"
        title_end = card.text.find("\n", card.text.find("# ")) + 1
        card.text = card.text[:title_end] + note + card.text[title_end:]
        card.save(output_dir / "README.md")
    else:
        (output_dir / "README.md").write_text(f"# Merged model\n{note}")
    return output_dir
