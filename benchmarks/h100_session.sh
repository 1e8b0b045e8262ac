#!/usr/bin/env bash
# One device call on a single H100 for the figures in benchmarks/RESULTS.md; each phase has its own time
# limit and writes its log under $OUT (the device tool brings $OUT back).
#   OUT=/tmp/out PHASES="env tests gemm profile small" bash benchmarks/h100_session.sh
# Phases:
#   env      GPU, driver, torch/triton versions
#   tests    every @pytest.mark.gpu test (kernels bit-exact against the CPU reference, training on CUDA)
#   gemm     benchmarks/bench_gemm.py (NVFP4 qmm methods at 8192^3 and on the gpu preset's GEMM shapes)
#   quant    benchmarks/bench_quantize.py
#   linear   benchmarks/bench_linear.py (quantized Linear 8192 forward + backward vs nn.Linear BF16)
#   wgrad    benchmarks/bench_wgrad.py (fused wgrad-operand kernel vs a device copy)
#   profile  benchmarks/profile_step.py (step time per recipe vs BF16, kernel-group profile)
#   small    fourbit compare --preset small --ablations --seeds 3, runs spread over $JOBS worker processes
#   runs     benchmarks/evidence_runs.py --preset $RUNS_PRESET --runs $RUNS (chosen recipe:seed runs), to /tmp/runs
#   gpu      fourbit compare --preset gpu --seeds $SEEDS --steps $STEPS (main recipes; ABL=1 adds ablations)
#   dual     kernels.quantize_dual: its GPU tests, bench_wgrad (dual vs separate kernels), profile_step
#            with nvfp4 vs nvfp4:dual (kernels.DUAL_OPERANDS on) at batch 32
#   graph    CUDA-graph training step: its GPU tests (graphed == eager bit for bit, harness --cuda-graph run and
#            resume), then profile_step eager vs graphed for every recipe (PROFILE_GRAPH_RECIPES)
# Compare runs keep metrics.jsonl and config files only (tarred to $OUT/<phase>.tgz): no checkpoints.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export XDG_CACHE_HOME=$PWD/.gpucache  # the carried data cache (gpt2 tokens, PyPI sdists)
DATA=$XDG_CACHE_HOME/fourbit
PHASES=${PHASES:-env tests gemm profile}
has() { [[ " $PHASES " == *" $1 "* ]]; }
pack() { tar czf $OUT/$1.tgz --exclude='*.pt' --exclude='ckpt*' --exclude='.lock' -C /tmp $1 2>/dev/null; }

if has env; then
  { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cap', torch.cuda.get_device_capability())"
  } 2>&1 | tee $OUT/env.log
fi
if has tests; then
  # every GPU test: ~290 s with PYTEST_ARGS="-n 8" on one H100 (2026-11-23); -rf names the failures
  timeout ${T_TESTS:-420} python3 -m pytest -q -rf -p no:cacheprovider -m gpu ${TEST_FILES:-tests/} ${PYTEST_ARGS:--n 8} --tb=short --durations=5 \
    > $OUT/tests.log 2>&1; echo "tests rc=$?"; tail -25 $OUT/tests.log
fi
if has gemm; then
  timeout ${T_GEMM:-120} python3 benchmarks/bench_gemm.py --parts ${GEMM_PARTS:-qmm train} > $OUT/bench_gemm.log 2>&1
  echo "gemm rc=$?"; grep -E "^\|" $OUT/bench_gemm.log | tail -30
fi
if has quant; then
  timeout ${T_QUANT:-90} python3 benchmarks/bench_quantize.py > $OUT/bench_quantize.log 2>&1
  echo "quant rc=$?"; tail -25 $OUT/bench_quantize.log
fi
if has linear; then
  timeout ${T_LINEAR:-120} python3 benchmarks/bench_linear.py > $OUT/bench_linear.log 2>&1
  echo "linear rc=$?"; tail -30 $OUT/bench_linear.log
fi
if has wgrad; then
  timeout ${T_WGRAD:-60} python3 benchmarks/bench_wgrad.py > $OUT/bench_wgrad.log 2>&1
  echo "wgrad rc=$?"; tail -20 $OUT/bench_wgrad.log
fi
if has profile; then
  timeout ${T_PROFILE:-120} python3 benchmarks/profile_step.py --recipes ${PROFILE_RECIPES:-bf16 nvfp4 fp8 mxfp4} \
    --steps ${PROFILE_STEPS:-5} --out $OUT > $OUT/profile.log 2>&1; echo "profile rc=$?"; head -30 $OUT/profile.log
fi
if has small; then
  timeout ${T_SMALL:-240} python3 -m fourbit.cli compare --preset small --recipes ${SMALL_RECIPES:-bf16,fp8,fp8-blockwise,mxfp4,nvfp4} \
    ${SMALL_ABL:---ablations} --seeds ${SMALL_SEEDS:-3} --jobs ${JOBS:-8} --out /tmp/small --data-dir $DATA --no-progress > $OUT/small.log 2>&1
  echo "small rc=$?"; tail -25 $OUT/small.log; pack small
fi
if has runs; then
  steps=""; [[ -n ${RUNS_STEPS:-} ]] && steps="--steps $RUNS_STEPS"
  timeout ${T_RUNS:-420} python3 benchmarks/evidence_runs.py --preset ${RUNS_PRESET:-small} --runs "$RUNS" $steps \
    --jobs ${RUNS_JOBS:-4} --out /tmp/runs --data-dir $DATA > $OUT/runs.log 2>&1
  echo "runs rc=$?"; tail -25 $OUT/runs.log; pack runs
fi
if has gpu; then
  abl=""; [[ ${ABL:-0} == 1 ]] && abl=--ablations
  timeout ${T_GPU:-420} python3 -m fourbit.cli compare --preset gpu --recipes ${GPU_RECIPES:-bf16,fp8,fp8-blockwise,mxfp4,nvfp4} \
    --seeds ${SEEDS:-3} --steps ${STEPS:-300} $abl \
    --jobs ${GPU_JOBS:-1} --out /tmp/gpu --data-dir $DATA --no-progress > $OUT/gpu.log 2>&1
  echo "gpu rc=$?"; tail -25 $OUT/gpu.log; pack gpu
fi
if has dual; then
  timeout ${T_DUAL_TESTS:-240} python3 -m pytest -q -rf -p no:cacheprovider -m gpu tests/test_kernels.py -k dual -n 4 --tb=short \
    > $OUT/dual_tests.log 2>&1; echo "dual tests rc=$?"; tail -5 $OUT/dual_tests.log
  timeout ${T_WGRAD:-90} python3 benchmarks/bench_wgrad.py > $OUT/bench_wgrad.log 2>&1; echo "wgrad rc=$?"; grep -E "dual|separate" $OUT/bench_wgrad.log
  timeout ${T_PROFILE:-120} python3 benchmarks/profile_step.py --recipes bf16 nvfp4 nvfp4:dual --steps 5 --out $OUT \
    > $OUT/profile_dual.log 2>&1; echo "profile rc=$?"; grep -E "^\| (bf16|nvfp4)" $OUT/profile_dual.log | head -3
fi
if has graph; then
  timeout ${T_GRAPH_TESTS:-300} python3 -m pytest -q -rf -p no:cacheprovider -m gpu tests/test_gpu_training.py \
    tests/test_harness_train.py tests/test_kernels.py -k "graph or bf16_autocast or seed_keys" -n 4 --tb=short > $OUT/graph_tests.log 2>&1
  echo "graph tests rc=$?"; tail -8 $OUT/graph_tests.log
  timeout ${T_PROFILE:-300} python3 benchmarks/profile_step.py --steps ${PROFILE_STEPS:-10} --out $OUT --recipes \
    ${PROFILE_GRAPH_RECIPES:-bf16 nvfp4 bf16:graph nvfp4:graph nvfp4:dual:graph fp8:graph fp8-blockwise:graph mxfp4:graph} \
    > $OUT/profile_graph.log 2>&1; echo "profile rc=$?"; grep -E "^\| [a-z0-9-]+(:[a-z:]+)? \|" $OUT/profile_graph.log | head -12
fi
