"""DPOPlusTrainer vs trl.DPOTrainer, side by side in one run: same random-init model, data and seed.

Timing: the variants train in alternating blocks (A B A B ...) in one process; the median step time of each is
compared, so drift in the machine's load hits both alike. Peak memory: each variant trains once more in a fresh
subprocess (peak RSS on the CPU, `max_memory_allocated` on CUDA). Ratios are what to read; absolute times on a
shared machine are noise.

    python benchmarks/bench_trainer.py [--vocab 32000 --hidden 256 --layers 4 --seq 256 --batch 4 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback

import trl_dpo_plus

VARIANTS = {  # name: (trainer class, config class, loss)
    "trl-sigmoid": ("trl", "sigmoid"),
    "plus-sigmoid": ("plus", "sigmoid"),
    "plus-simpo": ("plus", "simpo"),
}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def make_model(path, vocab, hidden, layers, seq):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=seq * 2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(trl_dpo_plus.default_model_path())
    tokenizer.save_pretrained(path)


def make_data(vocab, seq, n, seed=0):
    """Pairs of random-token texts: prompt seq/2 tokens, completions seq/2 tokens each, all within the vocab."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(trl_dpo_plus.default_model_path())
    words = [tokenizer.decode([i]) for i in range(3, 500)]
    pick = lambda k: "".join(words[i] for i in torch.randint(len(words), (k,), generator=g))  # noqa: E731
    return Dataset.from_list([{"prompt": pick(seq // 2), "chosen": pick(seq // 2), "rejected": pick(seq // 2)} for _ in range(n)])


def build(variant, model_path, data, args, steps):
    kind, loss = VARIANTS[variant]
    trainer_cls, config_cls = (trl.DPOTrainer, trl.DPOConfig) if kind == "trl" else (trl_dpo_plus.DPOTrainer, trl_dpo_plus.DPOConfig)
    extra = {} if kind == "trl" else {"loss_type": loss}
    config = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=steps,
                        learning_rate=1e-5, use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=10**6,
                        disable_tqdm=True, seed=0, max_length=args.seq, **extra)
    trainer = trainer_cls(model_path, args=config, train_dataset=data)
    trainer.remove_callback(PrinterCallback)
    return trainer


def peak_rss_mib() -> float:
    """This process's peak resident memory. Not ru_maxrss: Linux keeps that across execve, so a child started from a
    big parent would report the parent's peak; VmHWM belongs to the new address space."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(variant, model_path, args):
    """Train once in a fresh process; its peak memory and the weights it holds (policy + reference), in MiB."""
    out = subprocess.run([sys.executable, __file__, "--_memory_child", variant, "--_model", model_path,
                          *[f"--{k}={v}" for k, v in vars(args).items() if not k.startswith("_")]],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="A/B blocks per variant")
    parser.add_argument("--_memory_child")
    parser.add_argument("--_model")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    if args._memory_child:  # child process: one training run, then report peak memory
        data = make_data(args.vocab, args.seq, args.batch * args.steps)
        trainer = build(args._memory_child, args._model, data, args, args.steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()
        models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
        weights = sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()]) / 2**20
        print(json.dumps({"peak_mib": peak, "weights_mib": weights}))
        return

    model_path = tempfile.mkdtemp()
    make_model(model_path, args.vocab, args.hidden, args.layers, args.seq)
    data = make_data(args.vocab, args.seq, args.batch * args.steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers}; seq={args.seq} batch={args.batch}; {device}")
    print(f"trl {trl.__version__}, trl_dpo_plus {trl_dpo_plus.__version__}; {args.rounds} alternating blocks of {args.steps} steps")

    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            trainer = build(variant, model_path, data, args, args.steps)
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            times[variant] += timer.times[1:]  # the first step of a block warms up
            del trainer
    median = {v: statistics.median(t) for v, t in times.items()}
    memory = {v: peak_memory(v, model_path, args) for v in VARIANTS}

    base = "trl-sigmoid"
    peak_label = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    print(f"\n{'variant':<14} {'median step':>12} {'speed':>7} {peak_label:>16} {'ratio':>6} {'weights held':>13} {'ratio':>6}")
    for v in VARIANTS:
        peak, weights = memory[v]["peak_mib"], memory[v]["weights_mib"]
        print(f"{v:<14} {median[v] * 1000:>10.0f}ms {median[base] / median[v]:>6.2f}x {peak:>13.0f}MiB "
              f"{peak / memory[base]['peak_mib']:>6.2f} {weights:>10.0f}MiB {weights / memory[base]['weights_mib']:>6.2f}")
    print("(speed: >1 is faster than trl-sigmoid; memory ratios: <1 uses less. Weights held = policy + reference.)")


if __name__ == "__main__":
    main()
