#!/usr/bin/env bash
# Two-GPU session (issue 9, kind nvidia-h200-x2): gpu preset under DDP and FSDP2 vs one GPU, and a
# sharded checkpoint saved on 2 GPUs resumed on 1. Logs and metrics under $OUT.
#   OUT=/tmp/out bash benchmarks/multi_gpu.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XDG_CACHE_HOME=$PWD/.gpucache FOURBIT_PRESET=gpu FOURBIT_BATCH=${BATCH:-8} OMP_NUM_THREADS=4
S=${STEPS:-10}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/env.log
one() { timeout 120 python3 tests/_dist_train.py /tmp/mg/$1 $2 none $S 0 fresh > $OUT/$1.log 2>&1; }
two() { timeout 150 torchrun --standalone --nproc_per_node 2 tests/_dist_train.py /tmp/mg/$1 $2 $3 $S ${4:-0} fresh > $OUT/$1.log 2>&1; }
one single-bf16 bf16; one single-nvfp4 nvfp4
two ddp-bf16 bf16 ddp; two ddp-nvfp4 nvfp4 ddp
two fsdp2-bf16 bf16 fsdp2; two fsdp2-nvfp4 nvfp4 fsdp2
two cut-nvfp4 nvfp4 fsdp2 $((S / 2))
timeout 120 python3 tests/_dist_train.py /tmp/mg/cut-nvfp4 nvfp4 none $S 0 resume > $OUT/resume.log 2>&1
# throughput at the preset's batch (32 sequences of 512 tokens), 20 steps, tokens/s of the second interval
export FOURBIT_BATCH=32
for r in bf16 nvfp4; do
  timeout 120 python3 -m fourbit.cli train --recipe $r --preset gpu --steps 20 --out /tmp/mg/tp1-$r --no-progress > $OUT/tp1-$r.log 2>&1
  timeout 150 torchrun --standalone --nproc_per_node 2 -m fourbit.cli train --recipe $r --preset gpu --steps 20 --parallel ddp --out /tmp/mg/tp2-$r --no-progress > $OUT/tp2-$r.log 2>&1
done
python3 - <<'PY' > $OUT/summary.txt
import json, pathlib
for d in sorted(pathlib.Path("/tmp/mg").iterdir()):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
    print(d.name, json.dumps([(r["step"], r["train_loss"], r["val_loss"], r["tokens_per_s"]) for r in rows if r["step"]]))
PY
cat $OUT/summary.txt
