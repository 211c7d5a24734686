"""DPOPlusTrainer vs trl.DPOTrainer on real preference pairs, side by side in one run: same model, data and seed.

The data are the Anthropic HH-RLHF harmless pairs in ../shared/data (prompt/chosen/rejected). The model is a random-init
Llama with a 32k vocabulary (about 35 M parameters: hidden 384, 6 layers), tokenized with a 32k byte-level BPE trained
here on the same pairs' text (no Hub download). Configurations, each a separate A/B comparison:

    b8-L1024        batch 8, max_length 1024 (HH-RLHF)
    b4-L512         batch 4, max_length 512 (HH-RLHF)
    b4-L512-short   batch 4, max_length 512, prompts cut to their last 16 words (prefix sharing gains little there)
    b4-L512-lora    batch 4, max_length 512, LoRA r=16 on all linear layers (reference = adapter-disabled base)

Timing: the two variants train in alternating blocks (A B A B ...) in one process, on the same pairs in the same order;
the first step of each block is dropped as warm-up, and the ratio of median step times is reported with the spread of
the per-round ratios. Loss equality: the loss of every step of our run against TRL's run on the same pairs. Peak
memory: each variant trains once more in a fresh subprocess (VmHWM on the CPU, `max_memory_allocated` on CUDA). The
floor is the arithmetic the batch needs at least (policy forward + backward and reference forward over the real tokens
with the prompt counted once, the LM head at completion tokens only; attention and checkpoint recompute left out)
divided by this machine's measured matmul rate. Ratios are what to read; absolute times on a shared machine are noise.

    python benchmarks/bench_trainer.py [--configs b8-L1024 b4-L512 ...] [--rounds 3 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback

import trl_dpo_plus

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"
CONFIGS = {  # name: (batch, max_length, short prompts, lora)
    "b8-L1024": (8, 1024, False, False),
    "b4-L512": (4, 512, False, False),
    "b4-L512-short": (4, 512, True, False),
    "b4-L512-lora": (4, 512, False, True),
}
VARIANTS = ("trl", "plus")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def load_pairs(short: bool) -> Dataset:
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    if short:
        rows = [{**r, "prompt": " ".join(r["prompt"].split()[-16:])} for r in rows]
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A 32k byte-level BPE trained on the pairs' own text (deterministic), saved as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    text = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, tokenizer) -> int:
    config = LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def build(variant: str, model_path: str, data: Dataset, config_name: str, steps: int, seed: int = 0):
    batch, max_length, _, lora = CONFIGS[config_name]
    trainer_cls, config_cls = (trl.DPOTrainer, trl.DPOConfig) if variant == "trl" else (
        trl_dpo_plus.DPOTrainer, trl_dpo_plus.DPOConfig)
    cuda = torch.cuda.is_available()
    config = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                        learning_rate=1e-5, use_cpu=not cuda, bf16=cuda, report_to=[], save_strategy="no",
                        logging_steps=1, disable_tqdm=True, seed=seed, data_seed=seed, max_length=max_length,
                        dataloader_drop_last=True, **({} if variant == "trl" else {"diagnostics": False}))
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0) if lora else None
    trainer = trainer_cls(model_path, args=config, train_dataset=data, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    return trainer


def matmul_rate() -> float:
    """FLOP/s of a float32 (bfloat16 on CUDA) 2048² matmul on this device, best of 5."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(2048, 2048, device=device, dtype=dtype), torch.randn(2048, 2048, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * 2048**3 / best


def floor_flops(trainer, model_params: int, vocab: int, hidden: int, steps: int) -> float:
    """Least arithmetic per step: 8·N_body·T (policy fwd+bwd, reference fwd) + 8·V·H·C (LM head at completion
    tokens), T = real tokens with the prompt once, C = completion tokens, averaged over the first `steps` batches."""
    body = model_params - 2 * vocab * hidden
    loader = iter(trainer.get_train_dataloader())
    totals = []
    for _ in range(steps):
        batch = next(loader)
        tokens = int((batch["pair_ids"] >= 0).sum())
        completion = int(batch["gather_index"].numel())
        totals.append(8 * body * tokens + 8 * vocab * hidden * completion)
    return statistics.mean(totals)


def peak_memory(variant: str, model_path: str, config_name: str, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--_memory_child", variant, "--_model", model_path,
                          "--configs", config_name, "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def vm_hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def compare(config_name: str, model_path: str, model_params: int, rounds: int, steps: int) -> dict:
    short = CONFIGS[config_name][2]
    data = load_pairs(short)
    times = {v: [] for v in VARIANTS}
    round_ratios, losses, tokens = [], {}, {}
    for r in range(rounds):
        medians = {}
        for variant in VARIANTS:
            trainer = build(variant, model_path, data, config_name, steps)
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
            if r == 0:
                losses[variant] = [h["loss"] for h in logs]
                tokens[variant] = logs[-1]["num_tokens"] / len(logs)
                if variant == "plus":
                    layout = trainer.layout.name
                    floor = floor_flops(trainer, model_params, 32000, 384, steps)
            times[variant] += timer.times[1:]
            medians[variant] = statistics.median(timer.times[1:])
            del trainer
        round_ratios.append(medians["trl"] / medians["plus"])
    median = {v: statistics.median(t) for v, t in times.items()}
    memory = {v: peak_memory(v, model_path, config_name, 2) for v in VARIANTS}
    return {
        "config": config_name, "layout": layout,
        "step_s": median, "speedup": median["trl"] / median["plus"],
        "speedup_rounds": [round(x, 3) for x in round_ratios],
        "tokens_per_s": {v: tokens[v] / median[v] for v in VARIANTS},
        "peak_mib": memory, "memory_ratio": memory["plus"] / memory["trl"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["trl"], losses["plus"])),
        "losses": losses, "floor_flops": floor,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3, help="A/B blocks per variant")
    parser.add_argument("--steps", type=int, default=4, help="steps per block (the first is warm-up)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_memory_child")
    parser.add_argument("--_model")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if not HH.exists():
        sys.exit(f"needs the HH-RLHF pairs at {HH} (../shared/data beside the checkout)")

    if args._memory_child:  # child process: one short training run, then report peak memory
        config_name = args.configs[0]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        build(args._memory_child, args._model, load_pairs(CONFIGS[config_name][2]), config_name, args.steps).train()
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else vm_hwm_mib()
        print(json.dumps({"peak_mib": peak}))
        return

    model_path = Path(tempfile.mkdtemp())
    tokenizer = make_tokenizer(model_path)
    params = make_model(model_path, tokenizer)
    rate = matmul_rate()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model: random-init Llama, {params / 1e6:.1f} M parameters, vocab 32000 (BPE trained on the pairs); {device}")
    print(f"trl {trl.__version__} vs trl_dpo_plus {trl_dpo_plus.__version__} (sigmoid, defaults); "
          f"{args.rounds} alternating blocks of {args.steps} steps; matmul rate {rate / 1e9:.0f} GFLOP/s")
    results = []
    print(f"\n{'config':<15} {'layout':<14} {'speedup':>8} {'per round':>20} {'tok/s TRL→ours':>18} "
          f"{'peak mem':>9} {'loss diff':>10} {'floor/ours':>10}")
    for name in args.configs:
        res = compare(name, str(model_path), params, args.rounds, args.steps)
        res["floor_s"] = res["floor_flops"] / rate
        results.append(res)
        rounds = ", ".join(f"{x:.2f}" for x in res["speedup_rounds"])
        print(f"{name:<15} {res['layout']:<14} {res['speedup']:>7.2f}x {rounds:>20} "
              f"{res['tokens_per_s']['trl']:>8.0f}→{res['tokens_per_s']['plus']:<8.0f} {res['memory_ratio']:>8.2f}x "
              f"{res['max_loss_diff']:>10.1e} {res['floor_s'] / res['step_s']['plus']:>9.2f}", flush=True)
    print("(speedup: TRL's median step time / ours; peak mem: ours / TRL's; loss diff: max over steps of |loss ours − "
          "TRL| on the same pairs; floor/ours: the floor's time / our step time, 1.0 = no waste)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
