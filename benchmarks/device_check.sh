#!/usr/bin/env bash
# The checks that need a CUDA device, as one run of the device tool (its `run` verb), from the repository root:
#   bash benchmarks/device_check.sh                 # the CUDA tests, then benchmarks/latency_cuda.py (writes
#                                                   # benchmarks/LATENCY_CUDA.md; both copied to $OUT with logs)
#   bash benchmarks/device_check.sh --only stack    # a rerun of part of the benchmark (printed only)
# The device's python3 holds PyTorch, timm, transformers, tabulate and networkx; fxdeco runs from the tree.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FXDECO_CACHE_DIR="${TMPDIR:-/tmp}/fxdeco-cache"
out="${OUT:-/tmp/fxdeco-device}"
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
python3 -m benchmarks.latency_cuda "$@" 2>&1 | tee "$out/latency_cuda.log"
bench=${PIPESTATUS[0]}
cp benchmarks/LATENCY_CUDA.md "$out/" 2>/dev/null || true
echo "device checks: tests rc=$tests, benchmark rc=$bench"
exit $(( tests || bench ))
