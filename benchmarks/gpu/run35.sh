#!/usr/bin/env bash
# Issue 22 on the H100 (run35): time to table with the GPU off the launching node, its idle workers preloaded
# (--node-preload: Ray's RAY_enable_worker_prestart + RAY_preload_python_modules=sweeper.node_preload, as
# cluster.yaml starts nodes) against the same node cold and against the private instance with the warm workers.
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu/run35.sh naive  $OUT   # the 8 lm_eval runs (one call)
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu/run35.sh sweeps $OUT   # the sweeps, each checked against them
set -uo pipefail
mode=${1:?naive|sweeps}; out=${2:?OUT}
export PYTHONUNBUFFERED=1
ttt=(python3 benchmarks/time_to_table.py --model .gpu/h100/llama-4m --data .gpu/h100/data --work /tmp/ttt)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; git rev-parse HEAD 2>/dev/null
  python3 -c "import torch, transformers, bitsandbytes, ray, lm_eval; print('torch', torch.__version__, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| ray', ray.__version__, '| lm_eval', lm_eval.__version__)"
} > "$out/env_h100_run35_$mode.txt" 2>&1
if [ "$mode" = naive ]; then
  "${ttt[@]}" --skip-sweep --report "$out/run35_naive.json" > "$out/run35_naive.log" 2>&1
  exit $?
fi
t0=$(date +%s)
for run in "preload:--ray-head --gpu-node --node-preload" "cold:--ray-head --gpu-node" "pool:" \
           "preload2:--ray-head --gpu-node --node-preload"; do
  name=${run%%:*}; args=${run#*:}
  if [ $(( $(date +%s) - t0 )) -gt 400 ]; then echo "skipped $name: out of call time" >> "$out/run35_skipped.txt"; continue; fi
  echo "== $name $(date -u +%T)" >> "$out/run35_order.txt"
  # shellcheck disable=SC2086
  "${ttt[@]}" --reuse-naive $args --report "$out/run35_$name.json" > "$out/run35_$name.log" 2>&1
done
