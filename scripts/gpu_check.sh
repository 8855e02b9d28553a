#!/usr/bin/env bash
# The CUDA path in one short call (for a lent GPU machine): the GPU tests, then the layer benchmark on
# the GPU in float32, bfloat16 and under autocast, and the working memory against the einsum layer.
# Writes JSON under bench_results/ (or $OUT when the device tool sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT:-bench_results}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -m pytest -q -m gpu tests/system/test_gpu.py tests/layer/test_amp.py
"$PY" -m flexmoe.cli bench layer --device cuda --dtype float32 --repeats 10 --warmup 3 --out "$OUT_DIR/layer_cuda_fp32.json"
"$PY" -m flexmoe.cli bench layer --device cuda --dtype bfloat16 --repeats 10 --warmup 3 --out "$OUT_DIR/layer_cuda_bf16.json"
"$PY" -m flexmoe.cli bench layer --device cuda --autocast bfloat16 --repeats 10 --warmup 3 --out "$OUT_DIR/layer_cuda_autocast_bf16.json"
"$PY" -m flexmoe.cli bench layer --device cuda --memory --out "$OUT_DIR/layer_cuda_memory_fp32.json"
"$PY" -m flexmoe.cli bench layer --device cuda --memory --autocast bfloat16 --out "$OUT_DIR/layer_cuda_memory_bf16.json"
