#!/usr/bin/env bash
# Issue 21's device call (one H200, < 8 min): the evidence runs that do not fit a 2-core CPU, side by side.
#   1. tiny preset ON THE HOST'S CPU CORES (--device cpu, one thread per run): TINY_RUNS, all at once
#      (default bf16, fp8, fp8-blockwise, mxfp4, nvfp4 x seeds 0-2 = 15 runs; ~5 min on 15 cores)
#   2. gpu preset on the GPU: GPU_RUNS for GPU_STEPS steps (default bf16, nvfp4, mxfp4 x seeds 0-1,
#      300 steps: before the 1.4M-token corpus starts to overfit, see README)
#   3. fourbit diagnose (CPU) on the tiny bf16 seed-0 checkpoint of step 1, blocks 0, 2, 4, 7 recipes,
#      16 seeds: $OUT/diagnose/{diagnose.md,diagnose.json,diagnose.png} -> docs/evidence/diagnose/tiny/
# Both with the presets of this tree (HighPrecision(): last 1 of 6 / last 2 of 12 blocks in BF16).
# Usage, repo root, data cache carried (tokens of gpt2-4k and gpt2 under $DATA/tokens):
#   OUT=/tmp/out DATA=.gpucache/fourbit bash benchmarks/evidence_gpu.sh
# Brings back $OUT/tiny.tgz and $OUT/gpu.tgz (<recipe>/seed<k>/{metrics.jsonl,run.json}, no checkpoints),
# then, here:
#   tar xzf tiny.tgz -C /tmp && python benchmarks/merge_evidence.py --roots /tmp/tiny --out docs/evidence/tiny
#   tar xzf gpu.tgz -C /tmp && python benchmarks/merge_evidence.py --roots /tmp/gpu --out docs/evidence/gpu300 \
#       --recipes bf16,nvfp4,mxfp4 --seeds 2 --steps 150,300 --train-steps 300 --title "gpu preset, 300 steps"
#   fourbit report
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
DATA=${DATA:-.gpucache/fourbit}
T=${T_RUNS:-440}
seeds() { local out=""; for r in $1; do for s in $2; do out="$out,$r:$s"; done; done; echo ${out#,}; }
TINY_RUNS=${TINY_RUNS:-$(seeds "nvfp4 fp8 fp8-blockwise mxfp4 bf16" "0 1 2")}
GPU_RUNS=${GPU_RUNS:-$(seeds "nvfp4 mxfp4 bf16" "0 1")}
{ date -u; nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee $OUT/env.log
n_tiny=$(tr ',' '\n' <<< "$TINY_RUNS" | grep -c .)
CUDA_VISIBLE_DEVICES= timeout $T python3 benchmarks/evidence_runs.py --preset tiny --device cpu --runs "$TINY_RUNS" \
  --jobs $n_tiny --out /tmp/tiny --data-dir $DATA > $OUT/tiny.log 2>&1 &
p1=$!
n_gpu=$(tr ',' '\n' <<< "$GPU_RUNS" | grep -c .)
timeout $T python3 benchmarks/evidence_runs.py --preset gpu --steps ${GPU_STEPS:-300} --runs "$GPU_RUNS" \
  --jobs $n_gpu --out /tmp/gpu --data-dir $DATA > $OUT/gpu.log 2>&1 &
p2=$!
# 3. fourbit diagnose on the trained tiny bf16 seed-0 checkpoint as soon as that run is done (CPU, 2 threads)
( for i in $(seq 1 ${T_DIAG_WAIT:-300}); do grep -q '"step": 200,' /tmp/tiny/bf16/seed0/metrics.jsonl 2>/dev/null && break; sleep 1; done
  sleep 10  # the step-200 checkpoint is saved just after its metrics line
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout ${T_DIAG:-200} python3 -m fourbit.cli diagnose \
    --model /tmp/tiny/bf16/seed0 --layers "${DIAG_LAYERS:-blocks\.(0|2|4)\.}" --trials ${DIAG_TRIALS:-16} \
    --batch-size 2 --seq-len 128 --out $OUT/diagnose --no-progress > $OUT/diagnose.log 2>&1; echo "diagnose rc=$?" ) &
p3=$!
wait $p1; echo "tiny rc=$?"; wait $p2; echo "gpu rc=$?"; wait $p3
for preset in tiny gpu; do
  grep -E "^(done|failed)" $OUT/$preset.log
  [[ -d /tmp/$preset ]] && tar czf $OUT/$preset.tgz --exclude='*.pt' --exclude='ckpt*' --exclude='.lock' -C /tmp $preset
done
for f in /tmp/tiny/*/seed*/metrics.jsonl /tmp/gpu/*/seed*/metrics.jsonl; do
  echo "$f $(grep -v '"val_loss": null' $f | tail -1 | cut -c1-80)"; done
