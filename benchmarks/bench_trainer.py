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
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import datasets
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback

import trl_dpo_plus

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"
VOCAB = 32000


@dataclasses.dataclass(frozen=True)
class Shape:
    """A random-init Llama: `head` is head-heavy like the original benchmark's (LM head 12.3 M of 34 M parameters),
    `body` is body-heavy like real LLMs (body 62.9 M : LM head 24.6 M ≈ 2.6 : 1, as in Qwen2.5-0.5B)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SHAPES = {"head": Shape(384, 6, 6, 2, 1024), "body": Shape(768, 10, 12, 4, 2048)}


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    max_length: int
    prompts: str = "full"  # "full" HH prompts, "short" (their last 16 words) or "long" (dialogues joined, 2-4k tokens)
    lora: bool = False
    shape: str = "head"


CONFIGS = {
    "b8-L1024": Config(8, 1024),
    "b4-L512": Config(4, 512),
    "b4-L512-short": Config(4, 512, "short"),
    "b4-L512-lora": Config(4, 512, lora=True),
    "body-b4-L512": Config(4, 512, shape="body"),
    "body-b8-L1024": Config(8, 1024, shape="body"),
    "body-b4-L512-short": Config(4, 512, "short", shape="body"),
    "body-long-b2-L4096": Config(2, 4096, "long", shape="body"),
}
# "trl": trl.DPOTrainer as it runs here; "trl-gpu": with its fused LM head's compact path forced on (scoring completion
# positions only), as it runs on CUDA and XPU; "plus": trl_dpo_plus.DPOTrainer
VARIANTS = ("trl", "trl-gpu", "plus")


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


def load_pairs(prompts: str = "full") -> Dataset:
    """HH-RLHF harmless pairs. `long`: each prompt is the dialogues of consecutive pairs joined in front of the pair's
    own (about 12k-14k characters, 2-4k tokens with the benchmark's tokenizer), for where attention matters."""
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    if prompts == "short":
        rows = [{**r, "prompt": " ".join(r["prompt"].split()[-16:])} for r in rows]
    elif prompts == "long":
        joined = []
        for i, row in enumerate(rows):
            context, j = [], i
            while sum(map(len, context)) < 12000:
                j = (j + 1) % len(rows)
                context.append(rows[j]["prompt"] + rows[j]["chosen"])
            joined.append({**row, "prompt": "".join(context) + row["prompt"]})
        rows = joined
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


def make_model(path: Path, tokenizer, shape: Shape) -> int:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


_MODELS: dict[str, tuple[str, int]] = {}


def prepare_model(shape: str) -> str:
    """The shape's model and the tokenizer, saved once per process; returns the folder."""
    if shape not in _MODELS:
        path = Path(tempfile.mkdtemp())
        tokenizer = make_tokenizer(path)
        _MODELS[shape] = (str(path), make_model(path, tokenizer, SHAPES[shape]))
    return _MODELS[shape][0]


@contextlib.contextmanager
def variant_context(variant: str):
    """For `trl-gpu`, TRL's fused LM head takes its compact path (completion positions only), as on CUDA/XPU."""
    if variant != "trl-gpu":
        yield
        return
    from trl.trainer import utils as trl_utils

    with mock.patch.object(trl_utils, "_use_triton", lambda device: True):
        yield


def build(variant: str, model_path: str, data: Dataset, config_name: str, steps: int, seed: int = 0):
    config = CONFIGS[config_name]
    trainer_cls, config_cls = (trl_dpo_plus.DPOTrainer, trl_dpo_plus.DPOConfig) if variant == "plus" else (
        trl.DPOTrainer, trl.DPOConfig)
    cuda = torch.cuda.is_available()
    args = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=config.batch, max_steps=steps,
                      learning_rate=1e-5, use_cpu=not cuda, bf16=cuda, report_to=[], save_strategy="no",
                      logging_steps=1, disable_tqdm=True, seed=seed, data_seed=seed, max_length=config.max_length,
                      dataloader_drop_last=True, **({"diagnostics": False} if variant == "plus" else {}))
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0) if config.lora else None
    trainer = trainer_cls(model_path, args=args, train_dataset=data, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    return trainer


def quiet() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if not HH.exists():
        sys.exit(f"needs the HH-RLHF pairs at {HH} (../shared/data beside the checkout)")


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


def batch_counts(trainer, steps: int) -> dict[str, float]:
    """Mean per batch over the first `steps` batches of our run: real tokens with the prompt counted once, completion
    tokens, and the row slots (rows × width) of the batch the model runs."""
    loader = iter(trainer.get_train_dataloader())
    counts = []
    for _ in range(steps):
        batch = next(loader)
        counts.append((int((batch["pair_ids"] >= 0).sum()), int(batch["gather_index"].numel()),
                       int(batch["input_ids"].numel())))
    return {key: statistics.mean(c[i] for c in counts) for i, key in enumerate(("tokens", "completion", "slots"))}


def trl_slots(trainer, steps: int) -> float:
    """Mean row slots (2B × the longest sequence) of TRL's padded batches."""
    loader = iter(trainer.get_train_dataloader())
    return statistics.mean(int(next(loader)["input_ids"].numel()) for _ in range(steps))


def floor_flops(counts: dict, body_params: int, hidden: int) -> float:
    """Least arithmetic per step: 8·N_body·T (policy forward + backward, reference forward) + 8·V·H·C (the LM head
    at completion tokens), T = real tokens with the prompt counted once, C = completion tokens."""
    return 8 * body_params * counts["tokens"] + 8 * VOCAB * hidden * counts["completion"]


def peak_memory(variant: str, model_path: str, config_name: str, steps: int) -> dict[str, float]:
    """`peak_mib` of a fresh process training `steps` steps, and `setup_mib`, its peak once the trainer is built (the
    weights, a reference copy, the data): `peak_mib - setup_mib` is what training itself adds (activations,
    gradients, optimizer state)."""
    out = subprocess.run([sys.executable, __file__, "--_memory_child", variant, "--_model", model_path,
                          "--configs", config_name, "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vm_hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def compare(config_name: str, rounds: int, steps: int, variants=VARIANTS) -> dict:
    config = CONFIGS[config_name]
    model_path = prepare_model(config.shape)
    shape = SHAPES[config.shape]
    params = _MODELS[config.shape][1]
    data = load_pairs(config.prompts)
    times = {v: [] for v in variants}
    round_ratios = {v: [] for v in variants if v != "plus"}
    losses, extra = {}, {}
    for r in range(rounds):
        medians = {}
        for variant in variants:
            trainer = build(variant, model_path, data, config_name, steps)
            timer = StepTimer()
            trainer.add_callback(timer)
            if r == 0:
                extra[variant] = batch_counts(trainer, steps) if variant == "plus" else {"slots": trl_slots(trainer,
                                                                                                          steps)}
                if variant == "plus":
                    extra["layout"] = f"{trainer.layout.name} ({getattr(trainer.layout, 'attention', '-')})"
            with variant_context(variant):
                trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
            if r == 0:
                losses[variant] = [h["loss"] for h in logs]
            times[variant] += timer.times[1:]
            medians[variant] = statistics.median(timer.times[1:])
            del trainer
        for variant in round_ratios:
            round_ratios[variant].append(medians[variant] / medians["plus"])
    median = {v: statistics.median(t) for v, t in times.items()}
    memory = {v: peak_memory(v, model_path, config_name, 2) for v in variants}
    body = params - 2 * VOCAB * shape.hidden
    counts = extra["plus"]
    return {
        "config": config_name, "shape": config.shape, "params_m": params / 1e6, "body_m": body / 1e6,
        "head_m": VOCAB * shape.hidden / 1e6, "layout": extra["layout"], "step_s": median,
        "speedup": {v: median[v] / median["plus"] for v in round_ratios},
        "speedup_rounds": {v: [round(x, 3) for x in xs] for v, xs in round_ratios.items()},
        "peak_mib": {v: m["peak_mib"] for v, m in memory.items()},
        "training_mib": {v: m["peak_mib"] - m["setup_mib"] for v, m in memory.items()},
        "memory_ratio": {v: memory["plus"]["peak_mib"] / memory[v]["peak_mib"] for v in round_ratios},
        "training_memory_ratio": {v: (memory["plus"]["peak_mib"] - memory["plus"]["setup_mib"])
                                  / max(memory[v]["peak_mib"] - memory[v]["setup_mib"], 1.0) for v in round_ratios},
        "max_loss_diff": {v: max(abs(a - b) for a, b in zip(losses[v], losses["plus"])) for v in round_ratios},
        "losses": losses, "slots": {v: extra[v]["slots"] for v in variants},
        "real_tokens": counts["tokens"], "floor_flops": floor_flops(counts, body, shape.hidden),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["body-b4-L512", "body-b8-L1024", "body-b4-L512-short",
                                                         "body-long-b2-L4096", "b8-L1024", "b4-L512"],
                        choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2, help="A/B blocks per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per block (the first is warm-up)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--_memory_child")
    parser.add_argument("--_model")
    args = parser.parse_args()
    quiet()

    if args._memory_child:  # child process: one short training run, then report peak memory
        config_name = args.configs[0]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        measure = (lambda: torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else vm_hwm_mib
        with variant_context(args._memory_child):
            trainer = build(args._memory_child, args._model, load_pairs(CONFIGS[config_name].prompts), config_name,
                            args.steps)
            setup = measure()
            trainer.train()
        print(json.dumps({"peak_mib": measure(), "setup_mib": setup}))
        return

    rate = matmul_rate()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"trl {trl.__version__} vs trl_dpo_plus {trl_dpo_plus.__version__} (sigmoid, defaults) on {device}; "
          f"{args.rounds} alternating blocks of {args.steps} steps; matmul rate {rate / 1e9:.0f} GFLOP/s")
    print("variants: trl = trl.DPOTrainer as it runs here; trl-gpu = with its fused LM head's compact path forced on, "
          "as on CUDA/XPU; ours = trl_dpo_plus.DPOTrainer")
    results = []
    others = [v for v in args.variants if v != "plus"]
    print(f"\n{'config':<20} {'layout':<26} " + " ".join(f"{'vs ' + v:>16}" for v in others)
          + f" {'mem vs trl-gpu':>14} {'train mem':>9} {'loss diff':>9} {'slots trl/ours':>14} {'floor/ours':>10}")
    for name in args.configs:
        res = compare(name, args.rounds, args.steps, args.variants)
        res["floor_s"] = res["floor_flops"] / rate
        results.append(res)
        cells = " ".join(f"{res['speedup'][v]:>6.2f}x ({'/'.join(f'{x:.2f}' for x in res['speedup_rounds'][v])})"
                         .rjust(16) for v in others)
        base = "trl-gpu" if "trl-gpu" in others else others[0]
        print(f"{name:<20} {res['layout']:<26} {cells} {res['memory_ratio'][base]:>13.2f}x "
              f"{res['training_memory_ratio'][base]:>8.2f}x "
              f"{max(res['max_loss_diff'].values()):>9.1e} {res['slots'][base] / res['slots']['plus']:>13.2f}x "
              f"{res['floor_s'] / res['step_s']['plus']:>10.2f}", flush=True)
        if args.json:  # after every configuration, so a long sweep stopped early keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    print("(vs X: X's median step time / ours, per round in brackets; mem: our peak / X's; train mem: what training "
          "adds to the peak once the trainer is built, ours / X's; loss diff: max over steps "
          "of |loss ours − X| on the same pairs; slots: rows × width of the batch the model runs; floor/ours: the "
          "floor's time / our step time, 1.0 = no waste)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
