#!/usr/bin/env bash
# One call on a lent GPU machine: install, check, test, benchmark; logs and CSVs into $OUT (or ./gpu-run).
#   bash benchmarks/gpu_run.sh [all|session|test|sanitize|bench-route|bench-queue|bench-infonce|bench-step|bench-lora
#                               [script args...]]
# `session` fits a 15-minute lease: build, check, GPU tests, compute-sanitizer (memcheck on every op, racecheck on
# the queue), the lora_moe benchmark at the headline shape and the training step, then the summary tables.
# The machine has torch/triton but no package registry: the project installs without build isolation or deps.
set -uo pipefail
stage="${1:-all}"; shift || true
out="${OUT:-$PWD/gpu-run}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

# The CUDA extension is built in place (the editable install); a build failure is fatal here, with its log.
TORCH_CUDA_ARCH_LIST="9.0" SPARSEDOCTOR_BUILD_CUDA=1 MAX_JOBS=16 \
  python3 -m pip install --no-build-isolation --no-deps -v -e . >"$out/install.log" 2>&1 \
  || { grep -E "error|Error" "$out/install.log" | head -40; tail -20 "$out/install.log"; exit 1; }
python3 -c "from sparsedoctor_kernels import _C; print(_C.build_info())" | tee "$out/build.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

if [[ "$stage" == all || "$stage" == test || "$stage" == session ]]; then
  sparsedoctor check --device cuda 2>&1 | tee "$out/check.log" || status=1
  python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/test_gpu.log" || status=1
fi
if [[ "$stage" == all || "$stage" == test ]]; then
  python3 -m pytest -q tests -p no:cacheprovider --ignore=tests/test_gpu.py 2>&1 | tail -30 | tee "$out/tests.log" || status=1
fi
if [[ "$stage" == all || "$stage" == sanitize || "$stage" == session ]]; then
  compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize_ops.py 2>&1 \
    | tee "$out/memcheck.log" | tail -25 || status=1
  compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize_ops.py --ops queue 2>&1 \
    | tee "$out/racecheck.log" | tail -25 || status=1
fi
if [[ "$stage" == session ]]; then
  (cd benchmarks && python3 bench_lora_moe.py --shapes gate_proj k_proj --tokens 8192 --configs 8,2,16 64,4,8 \
    --rep-ms 50) 2>&1 | tee "$out/bench_lora_moe.log" || status=1
  (cd benchmarks && python3 bench_step.py --rep-ms 200 --impls base lora dense sparsedoctor) 2>&1 \
    | tee "$out/bench_step.log" || status=1
  # The library's default term (router mode, group_infonce) on the same step: its own rows (mode full-router).
  (cd benchmarks && python3 bench_step.py --rep-ms 200 --impls sparsedoctor --contrastive-mode router) 2>&1 \
    | tee "$out/bench_step_router.log" || status=1
fi
if [[ "$stage" == all || "$stage" == bench-route ]]; then
  (cd benchmarks && python3 bench_route.py "$@") 2>&1 | tee "$out/bench_route.log" || status=1
fi
for op in queue infonce step; do
  if [[ "$stage" == all || "$stage" == "bench-$op" ]]; then
    (cd benchmarks && python3 "bench_$op.py" "$@") 2>&1 | tee "$out/bench_$op.log" || status=1
  fi
done
if [[ "$stage" == all || "$stage" == bench-lora ]]; then
  (cd benchmarks && python3 bench_lora_moe.py "$@") 2>&1 | tee "$out/bench_lora_moe.log" || status=1
fi
cp benchmarks/results/*.csv "$out/" 2>/dev/null || true
exit $status
