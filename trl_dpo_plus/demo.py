"""The one-command demo: preference tuning that visibly works, offline, on the CPU, in a few minutes.

1. Sample story continuations from the embedded stories260K model (a real TinyStories Llama).
2. Score them with a transparent rule standing in for a human: a happy-words lexicon (+1 per happy word, −1 per
   sad word; the word lists are printed).
3. Build chosen/rejected pairs per prompt (best vs worst, second best vs second worst), on training prompts and on
   held-out prompts whose names and things never appear in training.
4. Hand them to `trl_dpo_plus.compare`: one LoRA run per loss on the same pairs (`kto` on the same pairs unpaired),
   the reference log-probs computed once for all, every adapter scored on the held-out pairs (reward accuracy,
   margins, log-ratios, length bias, KL to the base), and fresh samples on the held-out prompts scored by the rule
   (reward before → after, win-rate against the base with ties ½, fluency, Monte-Carlo KL).
5. The on-policy row: `trl_dpo_plus.iterate`, sigmoid over 3 rounds on the same prompts and rule, each round
   sampling the previous round's policy, pairing best against worst and training from its weights.

Run: `python -m trl_dpo_plus.demo` (or `make demo`, or `trl-dpo-plus demo`). The same comparison on your own model
and data: `trl-dpo-plus compare` (docs/compare.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import time
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from .assets import default_model_path
from .compare import Comparison, compare, markdown_table, sample
from .iterate import IterateReport, best_vs_worst, iterate
from .iterate import markdown_table as rounds_table

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


def lexicon_rewards(prompts: list[str], completions: list[str], **kwargs) -> list[int]:
    """The rule as a TRL-style reward function, for `compare(reward_fn=...)` and `trl-dpo-plus compare --reward_fn
    trl_dpo_plus.demo:lexicon_rewards`."""
    return [lexicon_reward(c) for c in completions]


def build_pairs(prompts: list[str], samples: list[list[str]], pairs_per_prompt: int) -> Dataset:
    """Best vs worst, second best vs second worst, ...; pairs whose rule rewards tie are skipped."""
    scores = [[lexicon_reward(c) for c in completions] for completions in samples]
    pairs, _ = best_vs_worst(prompts, samples, scores, pairs_per_prompt)
    return pairs.select_columns(["prompt", "chosen", "rejected"])


def main(argv: list[str] | None = None) -> Comparison:
    parser = argparse.ArgumentParser(prog="trl-dpo-plus demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["sigmoid", "ipo", "simpo", "kto_pair", "kto"],
                        help="each trains on the same pairs (unpaired ones, kto, on the pairs unpaired)")
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
    parser.add_argument("--rounds", type=int, default=3, help="on-policy rounds of sigmoid after the comparison (0: none)")
    parser.add_argument("--round_epochs", type=float, default=2 / 3, help="epochs per on-policy round")
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


def _run(args) -> Comparison:
    from . import DPOConfig

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
    held_out_samples = sample(base, tokenizer, eval_prompts, args.samples_per_prompt, args.max_new_tokens, args.seed + 1)
    pairs = build_pairs(train_prompts, train_samples, args.pairs_per_prompt)
    held_out = build_pairs(eval_prompts, held_out_samples, args.pairs_per_prompt)
    print(f"Sampled {sum(map(len, train_samples))} training completions → {len(pairs)} pairs; {len(eval_prompts)} "
          f"held-out prompts → {len(held_out)} held-out pairs ({time.time() - t0:.1f}s).")
    pairs.to_json(out_dir / "pairs.jsonl")
    held_out.to_json(out_dir / "held_out_pairs.jsonl")
    del base

    lora = not args.full_finetune
    learning_rate = args.learning_rate or (3e-4 if lora else 1e-4)
    config = DPOConfig(
        output_dir=str(out_dir), num_train_epochs=args.epochs, learning_rate=learning_rate,
        per_device_train_batch_size=16, lr_scheduler_type="constant", warmup_steps=0, logging_steps=3,
        gradient_checkpointing=False, save_strategy="no", report_to=[], seed=args.seed, max_length=128, lora=lora,
    )
    result = compare(model_path, pairs, held_out, args.losses, config, processing_class=tokenizer,
                     reward_fn=lexicon_rewards, generation_prompts=eval_prompts,
                     samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                     dataset_name="trl-dpo-plus demo pairs (stories260K samples, happy-words rule)")

    mode = "LoRA adapters" if lora else "full fine-tuning"
    print(f"\n{mode}, lr {learning_rate:g}, {args.epochs:g} epochs; every loss on the same {len(pairs)} pairs (kto: "
          f"the same pairs unpaired). Held-out pairs scored by each loss's own reward; fresh samples on the held-out "
          "prompts scored by the rule:\n")
    print(markdown_table(result))
    print(f"\nHeld-out prompt: {eval_prompts[0]!r}")
    example = result.base_generation.get("example", "")
    print(f"  base        ({lexicon_reward(example):+d}): {example.strip()[:150]!r}")
    for run in result.runs:
        text = run.generation.get("example")
        if text is not None:
            print(f"  {run.name:<11} ({lexicon_reward(text):+d}): {text.strip()[:150]!r}")
    written = f"{out_dir}/: {', '.join(result.files.values())}, pairs.jsonl, held_out_pairs.jsonl"
    if args.rounds > 0:
        rounds = _on_policy(args, config, model_path, tokenizer, train_prompts, eval_prompts, result)
        written += f", iterate/ ({', '.join(rounds.files.values())} and round-<r>/)"
    print(f"\nWritten to {written}, and per loss the trained {'adapter' if lora else 'model'} with its README.md model "
          f"card and diagnostics.json/.png. Total {time.time() - t0:.0f}s.")
    return result


def _on_policy(args, config, model_path, tokenizer, train_prompts, eval_prompts, result: Comparison) -> IterateReport:
    """Sigmoid over `args.rounds` on-policy rounds on the same prompts and rule, beside the one-round sigmoid run."""
    import dataclasses

    round_config = dataclasses.replace(config, output_dir=str(Path(config.output_dir) / "iterate"),
                                       num_train_epochs=args.round_epochs, loss_type=["sigmoid"])
    print(f"\nOn-policy: sigmoid over {args.rounds} rounds of {args.round_epochs:.2g} epoch each; every round samples "
          f"the {len(train_prompts)} training prompts × {args.samples_per_prompt} from the previous round's policy, "
          f"pairs best against worst ({args.pairs_per_prompt} per prompt), trains from its weights against the "
          "round-0 base; the same held-out prompts, sampled by each round's policy:\n")
    report = iterate(model_path, train_prompts, eval_prompts, round_config, reward_fn=lexicon_rewards,
                     rounds=args.rounds, samples_per_prompt=args.samples_per_prompt,
                     pairs_per_prompt=args.pairs_per_prompt, max_new_tokens=args.max_new_tokens,
                     processing_class=tokenizer, full_finetune=args.full_finetune)
    print(rounds_table(report))
    one_round = next((run for run in result.runs if run.name == "sigmoid" and run.generation), None)
    last = report.rounds[-1]
    if one_round is not None and last["status"] == "ok" and last["round"] > 0:
        g, base = one_round.generation, report.rounds[0]
        print(f"\nsigmoid, one round of {args.epochs:g} epochs on the base's samples: win-rate {g['win_rate']:.2f}, "
              f"sample KL {g['sample_kl']:.1f}, fluency {g['fluency']:.2f} "
              f"(base {result.base_generation['fluency']:.2f})."
              f"\nsigmoid, on-policy round {last['round']} ({last['round'] * args.round_epochs:.2g} epochs in all): "
              f"win-rate {last['win_rate_vs_base']:.2f}, sample KL {last['sample_kl']:.1f}, fluency "
              f"{last['fluency']:.2f} (base {base['fluency']:.2f}).")
    return report


if __name__ == "__main__":
    main()
