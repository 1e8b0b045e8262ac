#!/usr/bin/env bash
# One device call that trains chosen evidence runs of the gpu and small presets side by side, spread over
# every GPU of the machine (benchmarks/evidence_runs.py), and brings back their metrics (no checkpoints):
#   OUT=/tmp/out GPU_RUNS=bf16:0,nvfp4:0 SMALL_RUNS=mxfp4:0 GPU_JOBS=10 bash benchmarks/evidence_session.sh
# $OUT/gpu.tgz and $OUT/small.tgz hold <recipe>/seed<k>/{metrics.jsonl,run.json} for
# benchmarks/merge_evidence.py; $OUT/gpumem.log samples the GPUs' memory every 10 s.
# Sizing (2026-11-23/24, H200, 141 GB): a gpu-preset run holds 15-23 GB, so at most 6 per GPU (8 ran out
# of memory); with 5 per GPU a 600-step run takes 5-6 min, with 8 per GPU 5-8 min.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export XDG_CACHE_HOME=$PWD/.gpucache  # the carried data cache (gpt2 tokens, PyPI sdists)
DATA=$XDG_CACHE_HOME/fourbit
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/env.log
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/env.log
nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader -l 10 > $OUT/gpumem.log &
pids=()
run() {  # preset runs jobs
  [[ -z $2 ]] && return
  timeout ${T_RUNS:-540} python3 benchmarks/evidence_runs.py --preset $1 --runs "$2" --jobs $3 --out /tmp/$1 \
    --data-dir $DATA > $OUT/$1.log 2>&1 &
  pids+=($!)
}
run gpu "${GPU_RUNS:-}" ${GPU_JOBS:-10}
run small "${SMALL_RUNS:-}" ${SMALL_JOBS:-5}
for p in "${pids[@]}"; do wait $p; echo "evidence_runs rc=$?"; done
kill %1 2>/dev/null
for preset in gpu small; do
  [[ -d /tmp/$preset ]] || continue
  grep -E "^(done|failed)" $OUT/$preset.log
  tar czf $OUT/$preset.tgz --exclude='*.pt' --exclude='ckpt*' --exclude='.lock' -C /tmp $preset
done
sort -t, -k2 -n -r $OUT/gpumem.log | head -3
