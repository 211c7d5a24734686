"""`compare` with the reference pass shared (once, through the reference cache) vs paid by every run, side by side.

Same model, data, seed and schedule for both variants: a random-init Llama with a 32k vocabulary (about 35 M parameters,
the one `bench_trainer.py` builds) and a 32k BPE trained on the pairs, LoRA adapters, HH-RLHF harmless pairs from
../shared/data, one epoch per run. Losses: three reference-based (sigmoid, ipo, kto_pair) and one reference-free
(simpo). Without sharing, each reference-based run precomputes its own reference log-probs (TRL's
`precompute_ref_log_probs=True`, the cheapest way TRL offers). Reported: reference forward rows (counted by the
trainer), the whole comparison's wall time, and the held-out numbers of both variants (they must agree: the cache
changes where the reference log-probs come from, not what they are).

    python benchmarks/bench_compare.py [--train_pairs 48 --held_out_pairs 16 --max_length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import HH, load_pairs, make_model, make_tokenizer  # noqa: E402

from trl_dpo_plus import DPOConfig  # noqa: E402
from trl_dpo_plus.compare import compare  # noqa: E402

LOSSES = ["sigmoid", "ipo", "kto_pair", "simpo"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_pairs", type=int, default=48)
    parser.add_argument("--held_out_pairs", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output", default="benchmarks/results/compare_reference.json")
    args = parser.parse_args()
    if not HH.exists():
        sys.exit(f"needs the HH-RLHF pairs at {HH}")
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    tokenizer = make_tokenizer(work / "model")
    params = make_model(work / "model", tokenizer)
    pairs = load_pairs(short=False).shuffle(seed=0)
    train = pairs.select(range(args.train_pairs))
    held_out = pairs.select(range(args.train_pairs, args.train_pairs + args.held_out_pairs))

    results = {}
    for shared in (True, False):
        name = "shared" if shared else "per_run"
        config = DPOConfig(
            output_dir=str(work / name), lora=True, num_train_epochs=1, per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=args.batch, learning_rate=5e-4, max_length=args.max_length, seed=0,
            save_strategy="no", report_to=[], logging_steps=4, gradient_checkpointing=False,
            precompute_ref_log_probs=True,
        )
        start = time.perf_counter()
        result = compare(str(work / "model"), train, held_out, LOSSES, config, processing_class=tokenizer,
                         share_reference=shared, progress=False)
        seconds = time.perf_counter() - start
        results[name] = {
            "seconds": round(seconds, 1), "reference_forward_rows": result.reference["forward_rows"],
            "runs": {r.name: {"seconds": round(r.seconds, 1), "reference_rows": r.reference_rows,
                              "reward_accuracy": r.held_out.get("reward_accuracy"),
                              "margin_mean": r.held_out.get("margin_mean")} for r in result.runs},
        }
        print(f"{name:>8}: {seconds:6.1f} s, reference forward rows {result.reference['forward_rows']}", flush=True)
    shared, per_run = results["shared"], results["per_run"]
    agree = max(abs(shared["runs"][n]["margin_mean"] - per_run["runs"][n]["margin_mean"]) for n in LOSSES)
    summary = {
        "model_params": params, "train_pairs": args.train_pairs, "held_out_pairs": args.held_out_pairs,
        "max_length": args.max_length, "batch": args.batch, "losses": LOSSES, "cpu_threads": os.cpu_count(),
        "results": results, "wall_time_ratio_per_run_over_shared": round(per_run["seconds"] / shared["seconds"], 3),
        "reference_rows_ratio": per_run["reference_forward_rows"] / max(shared["reference_forward_rows"], 1),
        "max_held_out_margin_difference": agree,
    }
    print(json.dumps(summary, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
