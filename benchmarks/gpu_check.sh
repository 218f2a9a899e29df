#!/usr/bin/env bash
# GPU check for issue 8 (performance): one prepared script, about 8 minutes on one H100.
#
#   1. the device and software versions;
#   2. the test suite with CUDA in the device-parametrized tests (tests/devices.py: every test
#      taking the `device` fixture or DEVICES runs on "cpu" and "cuda": batched == per pair,
#      CUDA follows CPU in float64, SVD-free core solvers == SVD route, bf16 training,
#      invariance, degenerate starts, non-finite gradients, linalg). Tests that need the
#      all-MiniLM-L6-v2 weights package (88 MB, not carried to the device) are left out;
#   3. benchmarks/gpu_perf.py: the batched r x r solvers and the optimizer step on 224
#      LLaMA-7B-shaped LoRA pairs at r = 8, 16, 64 against fused torch.optim.AdamW;
#   4. benchmarks/scaling.py on CUDA (step time vs layers and vs rank), if time is left.
#
# Results go to $OUT/gpu (the device runner's output folder) or docs/benchmarks/gpu.
# Usage (repo root, a CUDA build of torch):  bash benchmarks/gpu_check.sh
# Packages missing on the device (geoopt, pymanopt) are installed from ./.whl if present.
set -uo pipefail
PY="${PYTHON:-python3}"
DEST="${OUT:-docs/benchmarks}/gpu"
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/geolora-site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/geolora-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
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
  echo "== tests (cpu + cuda) =="
  timeout -k 10 210 "$PY" -m pytest -q -n 8 -p no:cacheprovider -rfE --tb=short \
    --ignore=tests/test_bench_tasks.py tests
  echo "tests: rc=$? after $(( $(date +%s) - start )) s"
} 2>&1 | tee "$DEST/tests.txt"

echo "== perf: 224 LLaMA-7B-shaped pairs vs fused AdamW ==" | tee "$DEST/perf.txt"
timeout -k 10 270 "$PY" benchmarks/gpu_perf.py --out "$DEST" --budget-s 220 2>&1 | tee -a "$DEST/perf.txt"
echo "perf: done after $(( $(date +%s) - start )) s" | tee -a "$DEST/perf.txt"

left=$(( 500 - ($(date +%s) - start) ))
if (( left > 45 )); then
  echo "== scaling (cuda, wall clock), ${left} s left ==" | tee -a "$DEST/perf.txt"
  timeout -k 5 $(( left - 15 )) "$PY" benchmarks/scaling.py --device cuda --clock wall \
    --out "$DEST" 2>&1 | tail -20 | tee -a "$DEST/perf.txt"
fi
echo "total: $(( $(date +%s) - start )) s" | tee -a "$DEST/perf.txt"
