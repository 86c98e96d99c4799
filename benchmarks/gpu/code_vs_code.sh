#!/usr/bin/env bash
# Issue 22 on the H100: the code run32 measured (x5.67-x6.12) against this tree, on one warm machine, alternated,
# each against the naive loop of the same machine (run `node_preload_runs.sh TAG naive` first, same /tmp/ttt).
#   git archive 0447985 | tar -x -C .old        # run32's code, carried as an ignored folder
#   PYTHONPATH=/tmp/site bash benchmarks/gpu/code_vs_code.sh .old run39 $OUT
set -uo pipefail
old=${1:?old tree}; tag=${2:?tag}; out=${3:?OUT}
here=$PWD; export PYTHONUNBUFFERED=1
args=(--model "$here/.gpu/h100/llama-4m" --data "$here/.gpu/h100/data" --work /tmp/ttt --reuse-naive)
base=$PYTHONPATH
for run in old new old2 new2; do
  tree=$here; [ "${run#old}" != "$run" ] && tree=$(cd "$old" && pwd)
  echo "== $run $(date -u +%T) $tree" >> "$out/${tag}_code_order.txt"
  (cd "$tree" && PYTHONPATH="$tree:$base" python3 benchmarks/time_to_table.py "${args[@]}" \
     --report "$out/${tag}_code_$run.json" > "$out/${tag}_code_$run.log" 2>&1)
  grep "time to table" "$out/${tag}_code_$run.log" | tail -1
done
