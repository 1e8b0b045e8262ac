#!/usr/bin/env bash
# One device-machine call (GPU tests, benchmarks, training runs) for the figures in benchmarks/RESULTS.md.
# Run from the repository root; the phases named on the command line run in order, each under its own time
# limit, each writing $OUT/<phase>.log (plus tarballs of run metrics, never checkpoints). $OUT is set by the
# device machine; here it defaults to ./out.
#
#   bash benchmarks/device.sh env tests                        OUT=/tmp/out bash benchmarks/device.sh env gemm profile
#   SEEDS=1 STEPS=200 bash benchmarks/device.sh gpu            GPU_RUNS=bf16:0,nvfp4:0 bash benchmarks/device.sh evidence
#
# Phases (a device command may run 10 minutes: pick phases whose limits add up to less):
#   env        GPU, driver, torch/triton versions, compute capability, scaled_mm
#   tests      every @pytest.mark.gpu test in $TEST_FILES (default tests/), spread over $JOBS (8) pytest-xdist
#              workers when pytest-xdist is installed (the `test` extra), one process otherwise; $PYTEST_ARGS
#              adds options (e.g. "-k dual")
#   bench      gemm, quant, linear and wgrad below
#   gemm       benchmarks/bench_gemm.py --parts $GEMM_PARTS (qmm train): NVFP4 qmm at 8192^3 and on the gpu
#              preset's GEMM shapes
#   quant      benchmarks/bench_quantize.py
#   linear     benchmarks/bench_linear.py: quantized Linear forward + backward vs nn.Linear BF16
#   wgrad      benchmarks/bench_wgrad.py: the wgrad-operand kernels vs a device copy
#   profile    benchmarks/profile_step.py --recipes $PROFILE_RECIPES --batch $PROFILE_BATCH (32): step time per
#              recipe vs BF16, kernel groups
#   sweep      benchmarks/sweep_tiles.py: tile sweep of the rowwise and wgrad NVFP4 quantize kernels
#   dual       kernels.quantize_dual: its GPU tests and bench_wgrad
#   graph      CUDA-graph training step: its GPU tests, then profile_step eager vs graphed ($PROFILE_GRAPH_RECIPES)
#   small      fourbit compare --preset small --ablations --seeds $SMALL_SEEDS (3) over $JOBS worker processes
#   gpu        fourbit compare --preset gpu --seeds $SEEDS (3) --steps $STEPS (300) (ABL=1 adds the ablations)
#   evidence   benchmarks/evidence_runs.py: the recipe:seed runs $GPU_RUNS (gpu preset, $GPU_JOBS at once) and
#              $SMALL_RUNS (small preset, $SMALL_JOBS at once) side by side over every GPU; $OUT/gpu.tgz and
#              $OUT/small.tgz for benchmarks/merge_evidence.py, GPU memory sampled into $OUT/gpumem.log
#   multi-gpu  gpu preset (batch $BATCH = 8, $STEPS = 10 steps, every step logged) on one GPU, under DDP and
#              FSDP2 on $NPROC GPUs (default: all), an FSDP2 run cut at step STEPS/2 and resumed on one GPU
#              from its sharded checkpoint; then throughput at the preset's batch, 20 steps, 1 GPU vs DDP.
#              $OUT/multi-gpu.txt: (step, train loss, val loss, tokens/s) of every run
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
export XDG_CACHE_HOME=$PWD/.gpucache  # the carried data cache (gpt2 tokens, PyPI sdists)
DATA=$XDG_CACHE_HOME/fourbit
OUT=${OUT:-./out}
mkdir -p "$OUT"
JOBS=${JOBS:-8}
failed=()

usage() { sed -n '2,/^set -o pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# run NAME LIMIT_S CMD...: CMD under a time limit, output to $OUT/NAME.log; the exit status and the log's tail
run() {
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc$([[ $rc == 124 ]] && echo " (time limit ${limit}s)")"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [[ $rc == 0 ]] || failed+=("$name")
}

# pack DIR: $OUT/<basename>.tgz of a runs directory, metrics and configs only
pack() {
  [[ -d $1 ]] || return 0
  tar czf "$OUT/$(basename "$1").tgz" --exclude='*.pt' --exclude='ckpt*' --exclude='.lock' -C "$(dirname "$1")" "$(basename "$1")"
}

xdist() {  # pytest options that spread over $1 workers, if pytest-xdist is there
  if python3 -c "import xdist" 2>/dev/null; then echo "-n $1"; else echo "pytest-xdist missing: tests run in one process" >&2; fi
}

pytest_gpu() {  # pytest_gpu NAME LIMIT_S WORKERS ARGS...: GPU tests, failures named (-rf)
  local name=$1 limit=$2 workers=$3
  shift 3
  # shellcheck disable=SC2046
  run "$name" "$limit" python3 -m pytest -q -rf -p no:cacheprovider -m gpu --tb=short --durations=5 $(xdist "$workers") "$@"
}

phase_env() {
  { date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, torch.nn.functional as F; print('torch', torch.__version__, 'triton', triton.__version__, \
'cap', torch.cuda.get_device_capability(), 'gpus', torch.cuda.device_count(), 'scaled_mm', hasattr(F, 'scaled_mm'))"
  } 2>&1 | tee "$OUT/env.log"
}

phase_tests() {
  # every GPU test: ~290 s with 8 workers on one H100 (2026-11-23)
  # shellcheck disable=SC2086
  pytest_gpu tests "${T_TESTS:-420}" "$JOBS" ${TEST_FILES:-tests/} ${PYTEST_ARGS:-}
}

phase_gemm() {
  # shellcheck disable=SC2086
  TAIL=30 run gemm "${T_GEMM:-120}" python3 benchmarks/bench_gemm.py --parts ${GEMM_PARTS:-qmm train}
}
phase_quant() { run quant "${T_QUANT:-90}" python3 benchmarks/bench_quantize.py; }
phase_linear() { TAIL=30 run linear "${T_LINEAR:-120}" python3 benchmarks/bench_linear.py; }
phase_wgrad() { TAIL=20 run wgrad "${T_WGRAD:-60}" python3 benchmarks/bench_wgrad.py; }
phase_bench() { phase_gemm; phase_quant; phase_linear; phase_wgrad; }

phase_profile() {
  # shellcheck disable=SC2086
  TAIL=30 run profile "${T_PROFILE:-120}" python3 benchmarks/profile_step.py --recipes ${PROFILE_RECIPES:-bf16 nvfp4 fp8 mxfp4} \
    --steps "${PROFILE_STEPS:-5}" --batch "${PROFILE_BATCH:-32}" --out "$OUT"
}

phase_sweep() { TAIL=60 run sweep "${T_SWEEP:-150}" python3 benchmarks/sweep_tiles.py --out "$OUT/sweep_tiles.md"; }

phase_dual() {
  pytest_gpu dual-tests "${T_DUAL_TESTS:-240}" 4 tests/test_kernels.py -k dual
  TAIL=20 run dual-wgrad "${T_WGRAD:-90}" python3 benchmarks/bench_wgrad.py
}

phase_graph() {
  pytest_gpu graph-tests "${T_GRAPH_TESTS:-300}" 4 tests/test_gpu_training.py tests/test_harness_train.py tests/test_kernels.py \
    -k "graph or bf16_autocast or seed_keys"
  # shellcheck disable=SC2086
  TAIL=30 run graph-profile "${T_PROFILE:-300}" python3 benchmarks/profile_step.py --steps "${PROFILE_STEPS:-10}" --out "$OUT" --recipes \
    ${PROFILE_GRAPH_RECIPES:-bf16 nvfp4 bf16:graph nvfp4:graph fp8:graph fp8-blockwise:graph mxfp4:graph}
}

phase_small() {
  # shellcheck disable=SC2086
  run small "${T_SMALL:-240}" python3 -m fourbit.cli compare --preset small --recipes "${SMALL_RECIPES:-bf16,fp8,fp8-blockwise,mxfp4,nvfp4}" \
    ${SMALL_ABL:---ablations} --seeds "${SMALL_SEEDS:-3}" --jobs "$JOBS" --out /tmp/small --data-dir "$DATA" --no-progress
  pack /tmp/small
}

phase_gpu() {
  local abl=""
  [[ ${ABL:-0} == 1 ]] && abl=--ablations
  # shellcheck disable=SC2086
  run gpu "${T_GPU:-420}" python3 -m fourbit.cli compare --preset gpu --recipes "${GPU_RECIPES:-bf16,fp8,fp8-blockwise,mxfp4,nvfp4}" \
    --seeds "${SEEDS:-3}" --steps "${STEPS:-300}" $abl --jobs "${GPU_JOBS:-1}" --out /tmp/gpu --data-dir "$DATA" --no-progress
  pack /tmp/gpu
}

phase_evidence() {
  # Sizing (2026-11-23/24, H200, 141 GB): a gpu-preset run holds 15-23 GB, so at most 6 per GPU (8 ran out
  # of memory); with 5 per GPU a 600-step run takes 5-6 min, with 8 per GPU 5-8 min.
  local steps="" pids=() preset runs jobs i
  [[ -n ${RUNS_STEPS:-} ]] && steps="--steps $RUNS_STEPS"
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader -l 10 > "$OUT/gpumem.log" &
  local sampler=$!
  for preset in gpu small; do
    if [[ $preset == gpu ]]; then runs=${GPU_RUNS:-} jobs=${GPU_JOBS:-10}; else runs=${SMALL_RUNS:-} jobs=${SMALL_JOBS:-5}; fi
    [[ -z $runs ]] && continue
    # shellcheck disable=SC2086
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${T_RUNS:-540}" python3 benchmarks/evidence_runs.py --preset $preset \
      --runs "$runs" --jobs "$jobs" --out "/tmp/$preset" --data-dir "$DATA" $steps > "$OUT/evidence-$preset.log" 2>&1 &
    pids+=("$!:$preset")
  done
  for i in "${pids[@]}"; do
    wait "${i%%:*}"
    local rc=$?
    preset=${i#*:}
    echo "== evidence-$preset rc=$rc"
    grep -E "^(done|failed)" "$OUT/evidence-$preset.log"
    [[ $rc == 0 ]] || failed+=("evidence-$preset")
    pack "/tmp/$preset"
  done
  kill "$sampler" 2>/dev/null
  sort -t, -k2 -n -r "$OUT/gpumem.log" | head -3
}

phase_multi-gpu() {
  local n=${NPROC:-$(nvidia-smi -L | wc -l)} S=${STEPS:-10} r
  local driver=/tmp/fourbit_multi_gpu.py mg=/tmp/mg
  rm -rf $mg
  # a few steps of the gpu preset, every step logged and evaluated; optionally stopped (as by Ctrl-C) after
  # a given step, which leaves a checkpoint: the library's harness, driven directly (the CLI logs at the
  # preset's cadence and cannot stop at a chosen step)
  cat > $driver <<'PY'
import os, signal, sys
from fourbit.harness.parallel import finish
from fourbit.harness.train import train, train_config
out, recipe, parallel, steps, stop_after, resume = sys.argv[1:7]
cfg = train_config(os.environ.get("MG_PRESET", "gpu"), recipe=recipe, steps=int(steps), batch_size=int(os.environ.get("BATCH", "8")), log_every=1,
                   eval_every=1, eval_tokens=1024, ckpt_every=100, warmup=2, parallel=parallel)
def stop(step):
    if step == int(stop_after):
        os.kill(os.getpid(), signal.SIGINT)  # the loop saves a checkpoint of this step and stops
try:
    train(cfg, out, resume=resume == "resume", progress=False, callback=stop if int(stop_after) else None)
except KeyboardInterrupt:
    pass
finish()
PY
  one() { OMP_NUM_THREADS=4 TAIL=3 run "mg-$1${3:+-$3}" 120 python3 $driver "$mg/$1" "$2" none "$S" 0 "${3:-fresh}"; }
  many() { OMP_NUM_THREADS=4 TAIL=3 run "mg-$1" 150 torchrun --standalone --nproc_per_node "$n" $driver "$mg/$1" "$2" "$3" "$S" "${4:-0}" fresh; }
  one single-bf16 bf16; one single-nvfp4 nvfp4
  many ddp-bf16 bf16 ddp; many ddp-nvfp4 nvfp4 ddp
  many fsdp2-bf16 bf16 fsdp2; many fsdp2-nvfp4 nvfp4 fsdp2
  many cut-nvfp4 nvfp4 fsdp2 $((S / 2))
  one cut-nvfp4 nvfp4 resume  # log: mg-cut-nvfp4-resume.log
  # throughput at the preset's batch (32 sequences of 512 tokens), 20 steps: tokens/s of the second interval
  for r in bf16 nvfp4; do
    OMP_NUM_THREADS=4 TAIL=3 run "mg-tp1-$r" 120 python3 -m fourbit.cli train --recipe $r --preset gpu --steps 20 --out "$mg/tp1-$r" --data-dir "$DATA" --no-progress
    OMP_NUM_THREADS=4 TAIL=3 run "mg-tp$n-$r" 150 torchrun --standalone --nproc_per_node "$n" -m fourbit.cli train --recipe $r --preset gpu --steps 20 \
      --parallel ddp --out "$mg/tp$n-$r" --data-dir "$DATA" --no-progress
  done
  python3 - $mg <<'PY' | tee "$OUT/multi-gpu.txt"
import json, pathlib, sys
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
    print(d.name, json.dumps([(r["step"], r["train_loss"], r["val_loss"], r["tokens_per_s"]) for r in rows if r["step"]]))
PY
}

PHASES=("$@")
[[ ${#PHASES[@]} == 0 ]] && { usage; exit 2; }
for p in "${PHASES[@]}"; do
  if [[ $p == -h || $p == --help || $p == help ]]; then usage; exit 0; fi
  declare -F "phase_$p" > /dev/null || { echo "device.sh: unknown phase '$p'" >&2; usage >&2; exit 2; }
done
for p in "${PHASES[@]}"; do "phase_$p"; done
if [[ ${#failed[@]} != 0 ]]; then echo "device.sh: failed: ${failed[*]}"; exit 1; fi
