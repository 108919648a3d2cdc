#!/usr/bin/env bash
# The GPU check of lowbit's Triton W4A16 kernel, for a CUDA machine with torch and triton
# (lowbit need not be installed): its tests, then its benchmark against fp16 matmul.
# Run from anywhere; results go to $OUT (default /tmp/lowbit_gpu_check): versions, the test log,
# the benchmark's markdown table and JSON. About 3 minutes (most of it Triton compiling), 6.5 at most.
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lowbit_gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# lowbit's C++ CPU kernels take a minute to compile and nothing here needs them
# (tests/test_qlinear.py skips its native-kernel tests without them)
export LOWBIT_DISABLE_CPP=1

python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton
from lowbit.kernels import triton_w4a16
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
print(f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), "
      f"triton_w4a16.available() = {triton_w4a16.available()}")
EOF

# the benchmark runs even when a test fails: its numbers (and its own correctness column) still say something
timeout 240 python3 -m pytest -q -x -rs tests/test_triton_w4a16.py tests/test_qlinear.py 2>&1 | tee "$OUT/pytest.txt"
tests=${PIPESTATUS[0]}
timeout 60 python3 benchmarks/gpu_fused_decode.py 2>&1 | tee "$OUT/fused_decode.txt"
timeout 150 python3 benchmarks/gemv.py --cuda --json "$OUT/gemv_cuda.json" 2>&1 | tee "$OUT/gemv_cuda.md"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, benchmark exit $bench (124: timed out)" | tee "$OUT/status.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
