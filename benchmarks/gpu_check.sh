#!/usr/bin/env bash
# GPU check for issue 8 (performance) — PREPARED, NOT RUN YET.
#
# This script has not been run on a GPU yet: it was written in a session without a device.
# Nothing in docs/benchmarks/ comes from it until a session with a CUDA device runs it and
# commits docs/benchmarks/gpu/ (or copies it from $OUT).
#
# What it does (about 6-10 minutes on one H100):
#   1. prints the device and torch build;
#   2. runs the precision / batching tests on CUDA (tests/test_precision.py parametrizes over
#      "cuda" when available: bf16 training, batched == per pair across buffer invalidation,
#      CUDA follows CPU in float64) and the CUDA cases of tests/test_hf_peft.py;
#   3. times the optimizer step on 224 LLaMA-7B-shaped LoRA pairs
#      (geolora.bench.perf.LLAMA7B_SHAPES) at r = 8, 16, 64 against fused torch.optim.AdamW
#      (benchmarks/gpu_perf.py; dense-state optimizers on 28 of the pairs).
# Results: $OUT/gpu (when the device runner sets $OUT) else docs/benchmarks/gpu/.
# Needs a CUDA build of torch: PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -uo pipefail
PY="${PYTHON:-python3}"
DEST="${OUT:-docs/benchmarks}/gpu"
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$DEST/env.txt"

echo "== tests on CUDA ==" | tee "$DEST/tests.txt"
timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_precision.py \
  2>&1 | tail -25 | tee -a "$DEST/tests.txt"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_hf_peft.py -k cuda \
  2>&1 | tail -10 | tee -a "$DEST/tests.txt"

echo "== perf: 224 LLaMA-7B-shaped pairs vs fused AdamW ==" | tee "$DEST/perf.txt"
timeout 480 "$PY" benchmarks/gpu_perf.py --out "$DEST" --budget-s 400 2>&1 | tee -a "$DEST/perf.txt"
