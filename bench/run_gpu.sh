#!/usr/bin/env bash
# Everything that needs a GPU, in one command (run from the repository root on a CUDA machine
# whose Python has torch with CUDA; triton is used when installed):
#   bash bench/run_gpu.sh
# Builds the extension with its CUDA kernels, runs the backend tests on the GPU, then the
# benchmarks; tables print to stdout and rows go to bench/results/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
NEUSLICE_FORCE_EXT=1 pip install -q --no-build-isolation -e ".[test,bench]"
python -m neuslice.info
python -m pytest -q tests/test_extension.py tests/test_triton_kernels.py tests/test_dispatch.py
python bench/bench_build_m.py --device cuda
python bench/bench_build_m.py --device cuda --dtype bfloat16
python bench/bench_scan.py --n 1000 --d 512
python bench/bench_vgg16.py --device cuda --per-class 1000
