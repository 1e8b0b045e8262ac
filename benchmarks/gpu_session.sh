#!/usr/bin/env bash
# One device call: environment facts, GPU tests, benchmarks; logs under $OUT (see benchmarks/RESULTS.md).
#   OUT=/tmp/out bash benchmarks/gpu_session.sh [tests|bench|all]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
what=${1:-all}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, torch.nn.functional as F; print('torch', torch.__version__, 'triton', triton.__version__, 'cap', torch.cuda.get_device_capability(), 'scaled_mm', hasattr(F, 'scaled_mm'))"
} 2>&1 | tee $OUT/env.log
if [[ $what == tests || $what == all ]]; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py --durations=8 2>&1 | tee $OUT/tests.log
fi
if [[ $what == bench || $what == all ]]; then
  timeout 150 python3 benchmarks/bench_quantize.py 2>&1 | tee $OUT/bench_quantize.log
  timeout 200 python3 benchmarks/bench_gemm.py 2>&1 | tee $OUT/bench_gemm.log
fi
