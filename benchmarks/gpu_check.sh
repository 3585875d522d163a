#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, in one run (about 10 minutes on one H100/H200):
# the CUDA-graph test, the engine table on the GPU (the seed's code beside it if SEED_CODE is a
# checkout of shaoxiongji/federated-learning outside this repository), and Table 2's CNN runs batched.
#
#   FEDLIB_DATA=/path/to/data SEED_CODE=/tmp/seed/federated-learning bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -m pytest -p no:cacheprovider -q tests/test_engine_batched.py -k cuda
seed=()
if [ -n "${SEED_CODE:-}" ]; then seed=(--seed-code "$SEED_CODE"); fi
"$PY" benchmarks/engine_bench.py --device cuda --rounds 3 --no-memory "${seed[@]}"
"$PY" benchmarks/sweep_bench.py --table 2 --model cnn --device cuda --rounds 4
