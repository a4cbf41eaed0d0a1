#!/usr/bin/env bash
# The GPU check, for the GPU test machine (see README "GPU verification"): installs the carried
# abi3 wheel from dist/, runs every `gpu` test, then the kernel benchmarks (Newton–Schulz and MoE,
# then MLA). Under 8 minutes on an H200 or H100 (time limits 300 + 120 + 60 s). Build the wheel
# here first with `make wheel`, then carry `dist`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/k2-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

wheel=$(ls -t dist/k2_train-*.whl | head -n 1)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/k2site "$wheel"
export PYTHONPATH=/tmp/k2site
python3 -c "import k2, torch; print('k2', k2.__version__, '| torch', torch.__version__, '|', torch.cuda.get_device_name(0))"

status=0
# Only the files that hold gpu tests: the others import test dependencies (jsonschema, mcp, ...)
# that the GPU machine lacks and cannot install (no network), which would stop collection.
mapfile -t gpu_files < <(grep -rlE "mark\.gpu|pytestmark = .*gpu" tests --include="test_*.py" | sort)
echo "gpu test files: ${gpu_files[*]}"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider "${gpu_files[@]}" 2>&1 | tee "$OUT/gpu_tests.txt" || status=$?
timeout 120 python3 bench/cuda_kernels.py --part ns-moe 2>&1 | tee "$OUT/kernels.txt" || status=$?
# MLA decode and training forward (issue 24), in their own process and time limit.
timeout 60 python3 bench/cuda_kernels.py --part mla 2>&1 | tee "$OUT/kernels_mla.txt" || status=$?
exit $status
