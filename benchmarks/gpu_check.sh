#!/usr/bin/env bash
# The GPU checks of the segment attention in one command, under 8 minutes on one GPU:
#   1. the layout exactness tests on CUDA in bf16 (sdpa, and flash-attention 2 if it installs) and a QLoRA step with
#      CUDA bitsandbytes (tests/test_gpu.py);
#   2. the benchmark at batch 8 / max_length 1024 and the long-prompt configuration, with peak memory
#      (max_memory_allocated), against trl.DPOTrainer as it runs on CUDA (its fused LM head is already compact there).
# Results land in $OUT (default benchmarks/results/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PY:-python}"
if ! "$PY" -c "import trl_dpo_plus" 2>/dev/null; then
  "$PY" -m pip install -q -e ".[test]"
fi
"$PY" -m pip install -q flash-attn --no-build-isolation 2>/dev/null || echo "flash-attn did not install: sdpa only"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 180 "$PY" -m pytest -q tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 300 "$PY" benchmarks/bench_trainer.py --configs body-b8-L1024 body-long-b2-L4096 --variants trl plus \
  --rounds 2 --steps 3 --json "$OUT/bench.json" 2>&1 | grep -v "it/s" | tail -12 | tee "$OUT/bench.txt"
