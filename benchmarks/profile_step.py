"""Where one training step's time goes, ours vs TRL at its GPU best, on the same batch of HH-RLHF pairs.

"TRL at its GPU best" is `trl.DPOTrainer` with its fused LM head's compact path forced on, as it runs on CUDA and XPU
(on the CPU it scores every position). Each variant trains `--steps` steps (the first is warm-up) under
`torch.profiler`; the operators' self time of the last step is grouped into phases:

    matmul (body)      linear layers of the decoder (mm/addmm/bmm and their backward)
    matmul (LM head)   the vocabulary projection (a matmul with a 32k dimension)
    attention          scaled-dot-product attention kernels, forward and backward
    mask + index       building masks, gathers/scatters/index_put/masked ops, sorting, cat/stack
    elementwise        norms, activations, rotary embeddings, softmax, the loss's arithmetic, optimizer updates
    other              everything else (allocation, copies, autograd bookkeeping)

and the collation of the batch is timed on its own. Row slots are rows × width of the batch the model runs.

    python benchmarks/profile_step.py [--shape body] [--batch 4 --max_length 512] [--variants trl-gpu plus]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trainer as bench  # noqa: E402

INDEX_OPS = ("index", "gather", "scatter", "masked", "nonzero", "sort", "argsort", "cat", "stack", "where", "eq",
             "tril", "eye", "full", "arange", "repeat", "expand", "clamp", "cumsum", "lt", "ge", "logical", "bitwise")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "_efficient_attention", "_safe_softmax")


def phase(name: str, shapes) -> str:
    lowered = name.lower()
    if any(op in lowered for op in ATTENTION_OPS):
        return "attention"
    if any(op in lowered for op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")):
        flat = [d for s in (shapes or []) if isinstance(s, (list, tuple)) for d in s]
        return "matmul (LM head)" if bench.VOCAB in flat else "matmul (body)"
    if any(f"aten::{op}" in lowered for op in INDEX_OPS):
        return "mask + index"
    if lowered.startswith("aten::") and not any(op in lowered for op in ("copy_", "empty", "to", "view", "reshape",
                                                                        "contiguous", "clone", "zero_", "fill_")):
        return "elementwise"
    return "other"


class LastStep(TrainerCallback):
    """Profiles the last step only."""

    def __init__(self, steps: int):
        self.steps, self.prof, self.seconds = steps, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.steps - 1:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.prof.__enter__()
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and self.seconds is None:
            self.seconds = time.perf_counter() - self._t
            self.prof.__exit__(None, None, None)


def run(variant: str, model_path: str, data, config_name: str, steps: int) -> dict:
    trainer = bench.build(variant, model_path, data, config_name, steps)
    batch = next(iter(trainer.get_train_dataloader()))
    collate = trainer.data_collator
    rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
    t = time.perf_counter()
    for _ in range(5):
        collate(rows)
    collation = (time.perf_counter() - t) / 5
    slots = int(batch["input_ids"].numel())
    callback = LastStep(steps)
    trainer.add_callback(callback)
    with bench.variant_context(variant):
        trainer.train()
    phases = defaultdict(float)
    for event in callback.prof.events():  # self times add up to the step's total
        phases[phase(event.name, event.input_shapes)] += event.self_cpu_time_total / 1e6
    total = sum(phases.values())
    scale = callback.seconds / total if total else 1.0  # the profiler's totals, scaled to the step's wall time
    layout = getattr(trainer, "layout", None)
    return {"variant": variant, "step_s": callback.seconds, "collation_s": collation, "row_slots": slots,
            "rows": int(batch["input_ids"].shape[0]), "width": int(batch["input_ids"].shape[1]),
            "layout": getattr(layout, "name", "padded (TRL)"),
            "phases_s": {k: v * scale for k, v in sorted(phases.items(), key=lambda kv: -kv[1])}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="body-b4-L512", choices=list(bench.CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["trl-gpu", "plus"], choices=list(bench.VARIANTS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    bench.quiet()
    model_path = bench.prepare_model(bench.CONFIGS[args.config].shape)
    data = bench.load_pairs(bench.CONFIGS[args.config].prompts)
    results = [run(v, model_path, data, args.config, args.steps) for v in args.variants]
    names = sorted({k for r in results for k in r["phases_s"]}, key=lambda k: -results[-1]["phases_s"].get(k, 0))
    print(f"{args.config}: one step, seconds (share)")
    print(f"{'phase':<18}" + "".join(f"{r['variant']:>20}" for r in results))
    for name in names:
        print(f"{name:<18}" + "".join(
            f"{r['phases_s'].get(name, 0):>12.2f} ({r['phases_s'].get(name, 0) / r['step_s']:>4.0%})" for r in results))
    print(f"{'step':<18}" + "".join(f"{r['step_s']:>20.2f}" for r in results))
    print(f"{'collation':<18}" + "".join(f"{r['collation_s'] * 1e3:>18.1f}ms" for r in results))
    print(f"{'row slots':<18}" + "".join(f"{r['row_slots']:>11} ({r['rows']}×{r['width']})" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
