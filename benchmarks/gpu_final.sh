#!/usr/bin/env bash
# One device call for the end-to-end GPU checks recorded in benchmarks/RESULTS.md:
#   1. every @pytest.mark.gpu test (kernels bit-exact against the CPU reference, compile, recipes on CUDA)
#   2. `torchrun --nproc_per_node 1` of the gpu preset under FSDP2 with NCCL
#   3. `fourbit compare --preset gpu` (5 recipes, a shortened run), tarred without checkpoints
# Usage (on the GPU machine, repo root, data cache in DATA): OUT=/tmp/out DATA=.gpucache bash benchmarks/gpu_final.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
DATA=${DATA:-.gpucache/fourbit}
export XDG_CACHE_HOME=$(cd "$(dirname "$DATA")" && pwd)  # default_data_dir() = $XDG_CACHE_HOME/fourbit, for the tests
STEPS=${STEPS:-200}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cap', torch.cuda.get_device_capability())"
} 2>&1 | tee $OUT/env.log

timeout ${T_TESTS:-170} python3 -m pytest -q -p no:cacheprovider -m gpu tests/ --tb=short > $OUT/tests.log 2>&1; tail -15 $OUT/tests.log

[[ ${PHASES:-all} == tests ]] && { timeout 120 python3 -c "
from fourbit.harness.train import train, train_config
train(train_config('gpu', recipe='nvfp4', steps=3, data_dir='$DATA'), '/tmp/diag', progress=False)
print(open('/tmp/diag/metrics.jsonl').read())" > $OUT/diag.log 2>&1; tail -30 $OUT/diag.log; exit 0; }

timeout ${T_FSDP:-100} torchrun --standalone --nproc_per_node 1 -m fourbit.cli train --recipe nvfp4 --preset gpu \
  --parallel fsdp2 --steps 20 --out /tmp/fsdp2 --data-dir $DATA --no-progress > $OUT/fsdp2.log 2>&1; tail -5 $OUT/fsdp2.log
tail -2 /tmp/fsdp2/metrics.jsonl >> $OUT/fsdp2.log

timeout ${T_COMPARE:-300} python3 -m fourbit.cli compare --preset gpu --steps $STEPS --out /tmp/cmp --data-dir $DATA --no-progress \
  > $OUT/compare.log 2>&1; tail -30 $OUT/compare.log
tar czf $OUT/compare.tgz --exclude='*.pt' --exclude='ckpt_dcp' --exclude='.lock' -C /tmp cmp
