#!/usr/bin/env bash
# Issue 23 GPU proof, one device call: build the Llama-3-8B-shape model, run the seed-000-shaped study through
# `sweep launch`, then `sweep results --vs-baseline` (true memory, both speed kinds), the recommendations and the report.
# Run from the repository root with the wheels installed (docs/performance.md, run33):
#   PYTHONPATH=/tmp/site:$PWD TOKENIZER=<llama-4m folder> SWEEPER_GPU_DATA=<folder with wikitext-2/test.txt> \
#     bash benchmarks/gpu/seed000_run.sh $OUT
set -uo pipefail
out=${1:?usage: seed000_run.sh OUT_DIR}
export SWEEPER_GPU_DATA=${SWEEPER_GPU_DATA:-$PWD/.gpu/h100/data} PYTHONUNBUFFERED=1
res=/tmp/gpu-results/seed000
log=$out/seed000_driver.log
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, bitsandbytes, torchao, ray, polars; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| torchao', torchao.__version__, '| ray', ray.__version__, '| polars', polars.__version__)"
  python3 benchmarks/gpu/make_models.py --out /tmp/gpu-models --tokenizer "${TOKENIZER:-.gpu/h100/llama-4m}" --only llama3-8b-shape
  t0=$(date +%s)
  echo "$ sweep launch benchmarks/gpu/seed000_grid.py --results $res --fresh"
  python3 -m sweeper.cli launch benchmarks/gpu/seed000_grid.py --results $res --fresh
  echo "launch rc=$? wall=$(( $(date +%s) - t0 ))s"
} 2>&1 | tee "$log"
cols="precision,compute_dtype,status,weights_gb,hf_footprint_gb,memory_reduction,compression_ratio,gb_saved,decode_tok_s,speedup_decode,decode_graph_tok_s,speedup_decode_graph,graph_decode_error,batch_size,batch_tok_s,speedup_throughput,peak_gb,load_s,ppl_delta_pct"
{
  echo "$ sweep results $res --vs-baseline --columns $cols --format markdown"
  python3 -m sweeper.cli results $res --vs-baseline --columns "$cols" --format markdown
  echo "$ sweep results $res --view recommendations --format markdown"
  python3 -m sweeper.cli results $res --view recommendations --format markdown
} 2>&1 | tee "$out/seed000_results.md"
python3 -m sweeper.cli results $res --vs-baseline --format csv -o "$out/seed000_compare.csv" >/dev/null
python3 -m sweeper.cli results $res --view metrics --format csv -o "$out/seed000_metrics.csv" >/dev/null
python3 -m sweeper.cli report $res -o "$out/seed000_report.html"
python3 -m sweeper.cli report $res --format markdown -o "$out/seed000_report.md"
