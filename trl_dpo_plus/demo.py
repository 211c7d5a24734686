"""The one-command demo: preference tuning that visibly works, offline, on the CPU, in a few minutes.

1. Sample story continuations from the embedded stories260K model (a real TinyStories Llama).
2. Score them with a transparent rule standing in for a human: a happy-words lexicon (+1 per happy word, −1 per
   sad word; the word lists are printed).
3. Build chosen/rejected pairs per prompt (best vs worst, second best vs second worst) for the paired losses, and,
   for the unpaired `kto`, label single completions by the same rule (thumbs up if it scores above 0, down below 0;
   no pairing), as many as the pairs hold.
4. Train one copy of the model per loss with `trl_dpo_plus.DPOTrainer`.
5. Sample fresh completions on held-out prompts and report, per loss: rule reward before → after, win-rate against
   the base model (ties count ½), a Monte-Carlo KL(π‖π_base) in nats per completion, and the time taken.

Run: `python -m trl_dpo_plus.demo` (or `make demo`, or `trl-dpo-plus demo`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback

from .assets import default_model_path

HAPPY = {
    "happy", "smile", "smiled", "smiling", "smiles", "laugh", "laughed", "laughing", "love", "loved", "loves",
    "fun", "glad", "hug", "hugged", "kind", "nice", "joy", "excited", "proud", "best", "friends", "friend", "yay",
}
SAD = {
    "sad", "cry", "cried", "crying", "angry", "mad", "scared", "hurt", "upset", "sorry", "bad", "afraid",
    "lonely", "naughty", "broke", "broken", "mean", "frightened", "lost",
}
_WORD = re.compile(r"[a-z]+")

NAMES = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia", "Tim", "Anna", "Sam", "Lucy", "Jack", "Zoe"]
THINGS = ["ball", "kite", "cat", "tree", "cake", "boat", "dog", "box", "hat", "bird", "car", "doll"]
OPENINGS = [
    "Once upon a time, there was a little {kid} named {name}. {name} had a {thing}.",
    "One day, {name} went to the park with a {thing}.",
    "{name} found a {thing} in the garden.",
    "{name} and mom saw a big {thing}.",
]


def story_prompts(held_out: bool, n: int, seed: int) -> list[str]:
    """Story openings; held-out prompts use names and things never seen in training prompts."""
    rng = random.Random(seed)
    names, things = (NAMES[9:], THINGS[9:]) if held_out else (NAMES[:9], THINGS[:9])
    prompts = set()
    while len(prompts) < n:
        opening = rng.choice(OPENINGS)
        prompts.add(opening.format(kid=rng.choice(["girl", "boy"]), name=rng.choice(names), thing=rng.choice(things)))
    return sorted(prompts)


def lexicon_reward(text: str) -> int:
    """+1 per happy word, −1 per sad word: the stand-in for a human preference."""
    words = _WORD.findall(text.lower())
    return sum(w in HAPPY for w in words) - sum(w in SAD for w in words)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int, batch: int = 64):
    """`n` completions per prompt, ancestral sampling at temperature 1 (so the KL estimate is unbiased)."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    flat = [p for p in prompts for _ in range(n)]
    completions = []
    for i in range(0, len(flat), batch):
        enc = tokenizer(flat[i : i + batch], return_tensors="pt", padding=True)
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], batch: int = 64) -> torch.Tensor:
    """Summed log-prob of each completion given its prompt."""
    out = []
    for i in range(0, len(prompts), batch):
        p_ids = [tokenizer(p)["input_ids"] for p in prompts[i : i + batch]]
        c_ids = [tokenizer(p + c)["input_ids"][len(pi) :] for p, c, pi in zip(prompts[i : i + batch], completions[i : i + batch], p_ids)]
        seqs = [a + b for a, b in zip(p_ids, c_ids)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        attn = torch.zeros_like(ids)
        comp = torch.zeros_like(ids, dtype=torch.bool)
        for j, (a, b) in enumerate(zip(p_ids, c_ids)):
            ids[j, : len(a) + len(b)] = torch.tensor(a + b)
            attn[j, : len(a) + len(b)] = 1
            comp[j, len(a) : len(a) + len(b)] = True
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        token_logps = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
        out.append((token_logps * comp[:, 1:]).sum(-1))
    return torch.cat(out)


def build_pairs(prompts: list[str], samples: list[list[str]], pairs_per_prompt: int) -> Dataset:
    """Best vs worst, second best vs second worst, ...; pairs whose rule rewards tie are skipped."""
    rows = []
    for prompt, completions in zip(prompts, samples):
        ranked = sorted(completions, key=lexicon_reward, reverse=True)
        for k in range(pairs_per_prompt):
            best, worst = ranked[k], ranked[-1 - k]
            if lexicon_reward(best) > lexicon_reward(worst):
                rows.append({"prompt": prompt, "chosen": best, "rejected": worst})
    return Dataset.from_list(rows)


def build_unpaired(prompts: list[str], samples: list[list[str]], rows: int, seed: int) -> Dataset:
    """Single completions labelled by the rule alone: desirable when it scores > 0, undesirable when < 0 (a neutral
    one gets no thumb). `rows` of them, shuffled, so that batches mix prompts and labels (KTO's KL baseline pairs
    each row with its neighbour's completion)."""
    labelled = [{"prompt": p, "completion": c, "label": lexicon_reward(c) > 0}
                for p, completions in zip(prompts, samples) for c in completions if lexicon_reward(c) != 0]
    random.Random(seed).shuffle(labelled)
    return Dataset.from_list(labelled[:rows])


def balance_weights(labels: list[bool]) -> dict[str, float]:
    """λD, λU with λD·nD / (λU·nU) = 1, the lower end of the KTO paper's recommended [1, 4/3]; the smaller side is
    up-weighted."""
    desirable = max(sum(labels), 1)
    undesirable = max(len(labels) - sum(labels), 1)
    if desirable < undesirable:
        return {"desirable_weight": round(undesirable / desirable, 3), "undesirable_weight": 1.0}
    return {"desirable_weight": 1.0, "undesirable_weight": round(desirable / undesirable, 3)}


@dataclass
class Result:
    loss: str
    reward_before: float
    reward_after: float
    win_rate: float
    ties: float
    kl: float
    reward_accuracy: float
    margin: float
    seconds: float
    flags: int


class _StepBar(TrainerCallback):
    """One tqdm bar per training run, showing the loss and reward accuracy."""

    def __init__(self, label: str):
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=f"  train {self.label:<9}", leave=False, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "rewards/accuracies" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}" if "loss" in logs else "", acc=f"{logs['rewards/accuracies']:.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def plot_results(results: list[Result], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r.loss for r in results]
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].bar([i - 0.2 for i in x], [r.reward_before for r in results], width=0.4, color="lightgrey", label="base")
    axes[0].bar([i + 0.2 for i in x], [r.reward_after for r in results], width=0.4, color="tab:blue", label="trained")
    axes[0].set_xticks(x, names)
    axes[0].set_title("rule reward (happy − sad words)")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [r.win_rate for r in results], color="tab:green")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("win-rate vs base (ties ½)")
    axes[2].bar(names, [r.kl for r in results], color="tab:orange")
    axes[2].set_title("KL(π‖π_base), nats / completion")
    fig.suptitle("trl-dpo-plus demo: stories260K, held-out prompts, fresh samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def win_rate(after: list[list[str]], before: list[list[str]]) -> tuple[float, float]:
    wins = ties = total = 0
    for a_list, b_list in zip(after, before):
        for a, b in zip(a_list, b_list):
            ra, rb = lexicon_reward(a), lexicon_reward(b)
            wins += ra > rb
            ties += ra == rb
            total += 1
    return (wins + 0.5 * ties) / total, ties / total


def mean_reward(samples: list[list[str]]) -> float:
    flat = [lexicon_reward(c) for cs in samples for c in cs]
    return sum(flat) / len(flat)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="trl-dpo-plus demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["sigmoid", "ipo", "simpo", "kto_pair", "kto"],
                        help="paired losses train on the pairs, unpaired ones (kto) on single labelled completions")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--train_prompts", type=int, default=96)
    parser.add_argument("--eval_prompts", type=int, default=24)
    parser.add_argument("--samples_per_prompt", type=int, default=12)
    parser.add_argument("--pairs_per_prompt", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="default 3e-4 for LoRA adapters, 1e-4 with --full_finetune")
    parser.add_argument("--full_finetune", action="store_true", help="train the whole model instead of LoRA adapters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is fully offline
    with _quiet():
        return _run(args)


@contextlib.contextmanager
def _quiet():
    """Only the demo's own output: library logs, warnings and progress bars off, all restored afterwards."""
    import datasets
    import transformers

    package_logger = logging.getLogger("trl_dpo_plus")
    level, verbosity = package_logger.level, transformers.utils.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    package_logger.setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        package_logger.setLevel(level)
        transformers.utils.logging.set_verbosity(verbosity)
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()


def _run(args) -> list[Result]:
    from . import DPOConfig, DPOTrainer, get_loss

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_path).eval()
    print(f"Model: stories260K ({sum(p.numel() for p in base.parameters()):,} params, TinyStories Llama), CPU")
    print(f"Preference rule: +1 per happy word {sorted(HAPPY)}\n                 −1 per sad word {sorted(SAD)}")

    t0 = time.time()
    train_prompts = story_prompts(held_out=False, n=args.train_prompts, seed=args.seed)
    eval_prompts = story_prompts(held_out=True, n=args.eval_prompts, seed=args.seed + 1)
    train_samples = sample(base, tokenizer, train_prompts, args.samples_per_prompt, args.max_new_tokens, args.seed)
    pairs = build_pairs(train_prompts, train_samples, args.pairs_per_prompt)
    before = sample(base, tokenizer, eval_prompts, args.samples_per_prompt, args.max_new_tokens, args.seed + 2)
    print(f"Sampled {sum(map(len, train_samples))} training completions → {len(pairs)} pairs "
          f"({time.time() - t0:.1f}s). Held-out: {len(eval_prompts)} prompts × {args.samples_per_prompt} samples.")
    pairs.to_json(out_dir / "pairs.jsonl")
    unpaired = build_unpaired(train_prompts, train_samples, rows=2 * len(pairs), seed=args.seed)
    weights = balance_weights(unpaired["label"])
    (out_dir / "unpaired.jsonl").unlink(missing_ok=True)
    if any(get_loss(loss).data == "unpaired" for loss in args.losses):
        print(f"Unpaired (kto): {len(unpaired)} single completions labelled by the rule, {sum(unpaired['label'])} "
              f"desirable / {len(unpaired) - sum(unpaired['label'])} undesirable; weights {weights}.")
        unpaired.to_json(out_dir / "unpaired.jsonl")

    lora = not args.full_finetune
    learning_rate = args.learning_rate or (3e-4 if lora else 1e-4)
    results, examples = [], {}
    for loss in tqdm(args.losses, desc="losses", unit="loss"):
        t1 = time.time()
        is_unpaired = get_loss(loss).data == "unpaired"
        config = DPOConfig(
            output_dir=str(out_dir / loss), loss_type=loss, num_train_epochs=args.epochs, learning_rate=learning_rate,
            per_device_train_batch_size=16, lr_scheduler_type="constant", warmup_steps=0, logging_steps=3,
            gradient_checkpointing=False, save_strategy="no", report_to=[], seed=args.seed,
            max_length=128, lora=lora, **(weights if is_unpaired else {}),
        )
        trainer = DPOTrainer(model_path, args=config, train_dataset=unpaired if is_unpaired else pairs,
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_StepBar(loss))
        trainer.train()
        policy = trainer.model.eval()
        after = sample(policy, tokenizer, eval_prompts, args.samples_per_prompt, args.max_new_tokens, args.seed + 2)
        flat_prompts = [p for p, cs in zip(eval_prompts, after) for _ in cs]
        flat_after = [c for cs in after for c in cs]
        kl = (completion_logps(policy, tokenizer, flat_prompts, flat_after)
              - completion_logps(base, tokenizer, flat_prompts, flat_after)).mean().item()
        wr, ties = win_rate(after, before)
        examples[loss] = max(after[0], key=lexicon_reward)
        logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
        seconds = time.time() - t1
        trainer.save_model()  # the model (or adapter) with its model card, next to diagnostics.json/.png
        trainer.create_model_card(dataset_name="trl-dpo-plus demo " + ("labelled completions" if is_unpaired else "pairs")
                                  + " (stories260K samples, happy-words rule)")
        report = json.loads((out_dir / loss / "diagnostics.json").read_text())
        results.append(Result(
            loss=loss, reward_before=mean_reward(before), reward_after=mean_reward(after), win_rate=wr, ties=ties,
            kl=kl, reward_accuracy=logs[-1]["rewards/accuracies"], margin=logs[-1]["rewards/margins"],
            seconds=seconds, flags=len(report["train"]["flags"]),
        ))
        tqdm.write(f"  {loss:<10} {trainer.state.global_step} steps, {seconds:.0f}s, "
                   f"win-rate {wr:.2f}, KL {kl:.1f} nats, flags {results[-1].flags}")

    mode = "LoRA adapters" if lora else "full fine-tuning"
    print(f"\n{mode}, lr {learning_rate:g}, {args.epochs:g} epochs. Held-out prompts, fresh samples; win-rate vs the "
          "base model's samples (ties count ½); KL(π‖π_base) in nats per completion:")
    print(f"{'loss':<10} {'reward before → after':>22} {'win-rate':>9} {'ties':>6} {'KL':>7} {'train acc':>10} "
          f"{'margin':>7} {'flags':>6} {'time':>6}")
    for r in results:
        print(f"{r.loss:<10} {r.reward_before:>10.2f} → {r.reward_after:<9.2f} {r.win_rate:>9.2f} {r.ties:>6.2f} "
              f"{r.kl:>7.1f} {r.reward_accuracy:>10.2f} {r.margin:>7.2f} {r.flags:>6} {r.seconds:>5.0f}s")
    print(f"\nHeld-out prompt: {eval_prompts[0]!r}")
    print(f"  base     ({lexicon_reward(before[0][0]):+d}): {before[0][0].strip()[:150]!r}")
    for loss, text in examples.items():
        print(f"  {loss:<8} ({lexicon_reward(text):+d}): {text.strip()[:150]!r}")
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot = plot_results(results, out_dir / "demo.png")
    data_files = "pairs.jsonl" + (", unpaired.jsonl" if (out_dir / "unpaired.jsonl").exists() else "")
    print(f"\nWritten to {out_dir}/: results.json{', demo.png' if plot else ''}, {data_files}, and per loss the "
          f"trained {'adapter' if lora else 'model'} with its README.md model card and diagnostics.json/.png. "
          f"Total {time.time() - t0:.0f}s.")
    return results


if __name__ == "__main__":
    main()
