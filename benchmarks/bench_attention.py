"""Attention alone: the shared-prefix layout's dense `[rows, 1, L, L]` mask under SDPA vs the segment attention,
forward + backward, on one packed row of L tokens (float32, 12 heads of 64, 4 key/value heads as in the benchmark's
body-heavy model).

Two row contents per L:
    pairs      pairs of 1,024 tokens (prompt 640, chosen 192, rejected 192) packed into the row (L / 1,024 pairs)
    one pair   one pair whose prompt fills the row but 512 tokens (chosen 256, rejected 256): long-prompt data

Each timing is the median of `--repeats` runs after one warm-up; the dense mask's own size is reported (the segment
path builds none). Outputs are checked equal first.

    python benchmarks/bench_attention.py [--lengths 1024 4096 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trl_dpo_plus.layout import SegmentPlan, SharedPrefixCollator, shared_prefix_mask  # noqa: E402
from trl_dpo_plus.layout.segments import loop_attention  # noqa: E402

HEADS, KV_HEADS, DIM = 12, 4, 64


def row(length: int, content: str) -> dict:
    if content == "pairs":
        pairs = [{"prompt_ids": list(range(640)), "chosen_ids": list(range(192)), "rejected_ids": list(range(191))}
                 for _ in range(length // 1024)]  # 640 + 192 + (1 + 191) = 1,024 tokens a pair
    else:
        pairs = [{"prompt_ids": list(range(length - 512)), "chosen_ids": list(range(256)),
                  "rejected_ids": list(range(255))}]
    return SharedPrefixCollator(pad_token_id=0)(pairs)


def dense(batch, q, k, v):
    mask = shared_prefix_mask(batch["pair_ids"], batch["branch_ids"], "sdpa", q.dtype)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def segments(batch, q, k, v):
    return loop_attention(SegmentPlan.from_batch(batch), q, k, v, kernel="sdpa")


def timed(fn, batch, q, k, v, repeats: int) -> float:
    def once():
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        fn(batch, q, k, v).sum().backward()
        return time.perf_counter() - t0

    once()
    return statistics.median(once() for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"attention forward + backward, float32, {HEADS} heads × {DIM}, {KV_HEADS} kv heads, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'L':>6} {'row':<9} {'dense mask (s)':>15} {'segments (s)':>13} {'speed-up':>9} {'mask MiB':>9}")
    results = []
    for length in args.lengths:
        for content in ("pairs", "one pair"):
            batch = row(length, content)
            width = batch["input_ids"].shape[1]
            torch.manual_seed(0)
            q = torch.randn(1, HEADS, width, DIM, requires_grad=True)
            k, v = (torch.randn(1, KV_HEADS, width, DIM, requires_grad=True) for _ in range(2))
            real = batch["pair_ids"] >= 0
            with torch.no_grad():
                torch.testing.assert_close(segments(batch, q, k, v)[real], dense(batch, q, k, v)[real], rtol=1e-4,
                                           atol=1e-5)
            t_dense, t_segments = (timed(fn, batch, q, k, v, args.repeats) for fn in (dense, segments))
            mask_mib = width * width / 2**20  # bool
            results.append({"length": width, "row": content, "dense_s": t_dense, "segments_s": t_segments,
                            "speedup": t_dense / t_segments, "dense_mask_mib": mask_mib})
            print(f"{width:>6} {content:<9} {t_dense:>15.3f} {t_segments:>13.3f} {t_dense / t_segments:>8.2f}x "
                  f"{mask_mib:>9.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
