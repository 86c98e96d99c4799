#!/usr/bin/env bash
# Issue 22 on the H100: time to table with the GPU off the launching node (time_to_table.py --ray-head --gpu-node),
# its idle workers preloaded (--node-preload: Ray's RAY_enable_worker_prestart + RAY_preload_python_modules=
# sweeper.node_preload, as cluster.yaml starts nodes), against the same node cold and against the private instance
# with the warm workers.
#   run35: preloaded, cold, pool, preloaded again on fresh nodes
#   run36: the StoreWriter started as the launch joins Ray; preloaded with a second launch once the nodes preloaded
#          again (sweeper/node_refill.py), pool, cold
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu/node_preload_runs.sh run36 naive  $OUT   # 8 lm_eval runs (one call)
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu/node_preload_runs.sh run36 sweeps $OUT   # the sweeps, checked against them
#   mode sweeps-only: the same sweeps without the naive loop (--skip-naive: walls side by side, no ratio to naive),
#   for a lease too short for both
#   run37: the private instance's trials in Ray's idle workers preloaded with sweeper.node_preload
#          (SWEEPER_PRIVATE_PRELOAD=1, benchmarks/logs/private_preload.patch: "ray") against the socket pool ("pool"),
#          alternated
#   run38: the current code's pool against the naive loop (issue 22's check), and run37's "ray" between its launches
#   run39: the current code's pool three times against the naive loop, on an H100 (issue 22's check on its own host)
set -uo pipefail
tag=${1:?run35|run36|run37|run38|run39}; mode=${2:?naive|sweeps|sweeps-only}; out=${3:?OUT}
export PYTHONUNBUFFERED=1
ttt=(python3 benchmarks/time_to_table.py --model .gpu/h100/llama-4m --data .gpu/h100/data --work /tmp/ttt)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; git rev-parse HEAD 2>/dev/null
  python3 -c "import torch, transformers, bitsandbytes, ray, lm_eval; print('torch', torch.__version__, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| ray', ray.__version__, '| lm_eval', lm_eval.__version__)"
} > "$out/env_h100_${tag}_$mode.txt" 2>&1
if [ "$mode" = naive ]; then
  "${ttt[@]}" --skip-sweep --report "$out/${tag}_naive.json" > "$out/${tag}_naive.log" 2>&1
  exit $?
fi
case $tag:$mode in
  run37:*) runs=("pool:" "ray:RAY" "pool2:" "ray2:RAY" "pool3:" "ray3:RAY") ;;
  run38:*) runs=("pool:" "ray:RAY" "pool2:" "ray2:RAY") ;;
  run39:*) runs=("pool:" "pool2:" "pool3:") ;;
  run35:*) runs=("preload:--ray-head --gpu-node --node-preload" "cold:--ray-head --gpu-node" "pool:"
               "preload2:--ray-head --gpu-node --node-preload") ;;
  *) runs=("preload:--ray-head --gpu-node --node-preload --launches 2" "pool:" "cold:--ray-head --gpu-node") ;;
esac
naive=--reuse-naive; [ "$mode" = sweeps-only ] && naive=--skip-naive
limit=${RUN_S:-400}
t0=$(date +%s)
for run in "${runs[@]}"; do
  name=${run%%:*}; args=${run#*:}
  if [ $(( $(date +%s) - t0 )) -gt "$limit" ]; then echo "skipped $name: out of call time" >> "$out/${tag}_skipped.txt"; continue; fi
  echo "== $name $(date -u +%T)" >> "$out/${tag}_order.txt"
  cmd=("${ttt[@]}")
  if [ "$args" = RAY ]; then cmd=(env SWEEPER_PRIVATE_PRELOAD=1 "${ttt[@]}"); args=; fi
  # shellcheck disable=SC2086
  "${cmd[@]}" $naive $args --report "$out/${tag}_$name.json" > "$out/${tag}_$name.log" 2>&1
done
