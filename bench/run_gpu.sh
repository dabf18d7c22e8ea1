#!/usr/bin/env bash
# Everything that needs a GPU, in one command, bounded to ~8 minutes on an H200:
#   bash bench/run_gpu.sh OUT_DIR            # run from anywhere; OUT_DIR gets the logs and tables
#   bash bench/run_gpu.sh OUT_DIR --dry-run  # print the steps; run only the CPU-safe ones, briefly
# Each step has its own `timeout`; a failing step is logged and the script goes on. The summary
# (step, exit status, seconds) is in OUT_DIR/steps.tsv; every step's output in OUT_DIR/<step>.log.
set -u
OUT="${1:?usage: bash bench/run_gpu.sh OUT_DIR [--dry-run]}"
DRY="${2:-}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
START=$(date +%s)
BUDGET=470  # seconds for all steps together (8 minutes less a margin)
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

step() {  # step NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 15 )); then
    printf '%s\tskipped (time)\t0\n' "$name" >> "$OUT/steps.tsv"; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$(date +%s) rc=0
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  tail -n 25 "$OUT/$name.log"
}

if [[ "$DRY" == "--dry-run" ]]; then
  # CPU-safe checks of the same commands, tiny sizes, so the script itself is exercised.
  step env 60 "$PY" -c "import torch, neuslice; print(torch.__version__, torch.cuda.is_available())"
  step overhead_dry 300 "$PY" bench/bench_overhead.py --quick --models mlp --repeats 1 \
    --no-finish --out "$OUT"
  step build_m_dry 120 "$PY" bench/bench_build_m.py --device cpu --models vgg16-cifar \
    --repeats 1 --out "$OUT"
  cat "$OUT/steps.tsv"
  exit 0
fi

step env 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)"
# 1. the extension for sm_90 (H200); --no-build-isolation keeps the installed torch
step build 200 env TORCH_CUDA_ARCH_LIST=9.0 NEUSLICE_FORCE_EXT=1 MAX_JOBS=16 \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
step info 30 "$PY" -m neuslice.info
# 2. backend tests on CUDA (the Triton tests compile real kernels: no interpreter)
step tests 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -x tests/test_dispatch.py \
  tests/test_extension.py tests/test_triton_kernels.py
# 3. block_gram_norms per backend vs torch (cuBLAS, TF32 off) at VGG-16 / ResNet-50 shapes,
#    with the fraction of the measured fp32 matmul rate
step build_m 90 "$PY" bench/bench_build_m.py --device cuda --repeats 5 --out "$OUT"
# 4. profiling overhead vs a plain epoch on the GPU, 224 px
step overhead 150 "$PY" bench/bench_overhead.py --device cuda --size 224 --threads 16 \
  --models vgg16 resnet50 --repeats 3 --no-finish --out "$OUT"
# 5. ResNet-50, 1,000 classes, grouped order: images/s, peak GPU memory vs the estimate
step scale 120 "$PY" bench/bench_scale.py --device cuda --models resnet50 --size 224 \
  --images 512 1024 --classes 1000 --per-cat 1 --batch 64 --cka-batch 8 --out "$OUT"
echo "total $(( $(date +%s) - START )) s"
cat "$OUT/steps.tsv"
