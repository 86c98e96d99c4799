"""Time to the seed's table: one `sweep launch` vs the naive way (one `lm_eval` run per configuration, one after another).

The study is shaped like ../shared/seeds/003_dfccaded11cca29d.txt: one model, 8 precision / compute-dtype cells
(fp32, fp16, and nf4 / fp4 / int8 each with fp32 and fp16 compute), 3 lm-eval tasks with one item limit, and
perplexity. The offline task data (piqa, gsm8k, wikitext) is the same files on both sides.

- sweep:  `python3 -m sweeper.cli launch <study> --results <dir> --fresh`, then `sweep results <dir> --format csv`;
          the sweep also measures load time, footprint, peak memory, latency and token perplexity, which the naive
          way does not (so the comparison favours the naive way).
- naive:  for each cell, `python3 -m lm_eval --model hf --model_args pretrained=<checkpoint>,dtype=<compute> --tasks
          piqa,gsm8k,wikitext --include_path <yamls> --limit N --batch_size B --seed S,S,S,S`, one after another.
          lm-eval 0.4.13 on transformers 5 cannot quantize through model_args (see tests/test_faithfulness.py), so each
          quantized cell reads a checkpoint saved from the model loaded with that cell's precision arguments; making
          those checkpoints is timed separately ("prep") and NOT counted in the naive time.
          Task YAMLs `include` lm-eval's built-in ones and read JSON written from the same published files.

Before either side is timed, one throwaway process imports what both sides import (torch, transformers' model
classes, lm-eval, bitsandbytes, Ray and Tune), so neither pays for reading those files from disk the first time
(`--no-warm-imports` leaves this out). The naive cells can be run in one call (`--skip-sweep`) and reused by a later
one on the same machine (`--reuse-naive`: a cell with its results and its recorded time, run with the same
checkpoint, limit, batch, seed and device, is not run again), so the
two sides fit in separate device calls; the report says which cells were reused.

`--ray-head` measures the sweep as run against a Ray head that is already up (`ray start --head` first and
`ray stop` after the table, neither counted; `sweep launch --address auto`): what a user who keeps a head running on the machine sees, without the
seconds `sweep launch` spends starting a private Ray instance. With `--gpu-node` the head has no GPU and a second
node started on the same host has them all: every trial runs off the launching node, as on a cluster of GPU worker
machines (run34 in docs/performance.md compared warm actors there with cold trials). `--node-preload` starts those
nodes as cluster.yaml does (Ray's idle workers preload sweeper.node_preload) and waits for their preload first.

The sweep starts with a cold lm-eval task index cache (its own SWEEPER_TASK_INDEX_CACHE folder, emptied), so it pays
for building lm-eval's task index once, as on a fresh machine; each naive run builds it too, as lm-eval always does.
The sweep's output is printed with the seconds since launch, and its trials' start-up times (the Ray worker process
of the Tune trial, the process that ran the trial, Tune trial, load; whether that process was a warm worker) and stage
times go into the report. `--no-warm-workers` launches the sweep without warm workers (sweeper/warm_pool.py), as
before they existed; `--ray-as-is` with its private Ray instance started as Ray comes (sweeper/local_ray.py);
`--no-warm-fork` with warm workers that each import everything themselves (sweeper/warm_pool_parent.py).

Both sides use the same lm-eval batch size, limit and seeds, so the accuracy numbers must be equal; the report checks
every (cell, task, metric) pair.

    python3 benchmarks/time_to_table.py --model .gpu/h100/llama-4m --work /tmp/ttt --report ttt.json   (run10)
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the --gpu-node node's own ports (the head keeps Ray's defaults); they differ from every default port of the head
GPU_NODE_PORTS = {"node-manager-port": 6912, "object-manager-port": 6913, "dashboard-agent-listen-port": 6915,
                  "metrics-export-port": 6916, "runtime-env-agent-port": 6917, "dashboard-agent-grpc-port": 6918,
                  "min-worker-port": 17000, "max-worker-port": 17999}

CELLS = [("fp32", "fp32"), ("fp16", "fp16"), ("nf4", "fp32"), ("nf4", "fp16"), ("fp4", "fp32"), ("fp4", "fp16"),
         ("int8", "fp32"), ("int8", "fp16")]
TASKS = ("piqa", "gsm8k", "wikitext")
TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# what the two sides import; run once before timing so that neither reads these files from disk the first time
WARM_IMPORTS = ("import torch, bitsandbytes, transformers, lm_eval, ray, ray.tune; "
                "from transformers import AutoModelForCausalLM, AutoTokenizer; "
                "import lm_eval.models.huggingface, lm_eval.tasks, sweeper.cli, sweeper.runner")


def say(msg: str) -> None:
    print(msg, flush=True)


def write_study(path: Path, model: str, data: Path, limit: int, batch: int, seed: int, share: float,
                lease: bool = True) -> None:
    path.write_text(f'''"""time_to_table.py: a study shaped like ../shared/seeds/003 (8 cells, 3 tasks with a limit, perplexity)."""
from sweeper import Benchmark, Model, Perplexity, Resources, Study, Task

study = Study(
    name="time-to-table",
    models=[Model({model!r}, label={Path(model).name!r})],
    precisions=["fp32", "fp16", "nf4", "fp4", "int8"],
    compute_dtypes=["fp32", "fp16"],
    baseline="fp32",
    kl=False,
    tasks=[Task("piqa", data={str(data / "piqa" / "valid.jsonl")!r}),
           Task("gsm8k", num_fewshot=0, data={str(data / "gsm8k" / "test.jsonl")!r}),
           Task("wikitext", data={str(data / "wikitext-2" / "test.txt")!r})],
    limit={limit}, eval_batch_size={batch}, seed={seed},
    benchmark=Benchmark(prompt_tokens=128, new_tokens=32, batch_sizes=(1,), repeats=3, warmup=1, graph_decode=False,
                        exclusive_timing={lease}),
    perplexity=Perplexity({str(data / "wikitext-2" / "test.txt")!r}, context=512, max_tokens=16384),
    resources=Resources(gpus_per_trial={share}),
)
''')


# --------------------------------------------------------------------------------------------- naive side: inputs
def _jsonl(path: Path, rows) -> str:
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def naive_yamls(data: Path, folder: Path) -> Path:
    """lm-eval YAMLs that include the built-in tasks and read hub-format JSON written from the published files."""
    import lm_eval

    from sweeper.taskdata import wikitext_pages

    folder.mkdir(parents=True, exist_ok=True)
    piqa_rows = [json.loads(x) for x in (data / "piqa" / "valid.jsonl").read_text().splitlines() if x.strip()]
    labels = (data / "piqa" / "valid-labels.lst").read_text().split()
    files = {
        "piqa": {"validation": _jsonl(folder / "piqa_validation.jsonl",
                                      [{**r, "label": int(lab)} for r, lab in zip(piqa_rows, labels)])},
        "gsm8k": {"test": str(data / "gsm8k" / "test.jsonl")},
        "wikitext": {"test": _jsonl(folder / "wikitext_test.jsonl",
                                    [{"page": p} for p in wikitext_pages((data / "wikitext-2" / "test.txt").read_text().split("\n"))])},
    }
    builtin = Path(lm_eval.__file__).parent / "tasks"
    specs = {
        "piqa": ("piqa/piqa.yaml", {"training_split": None}),
        "gsm8k": ("gsm8k/gsm8k.yaml", {"training_split": None, "fewshot_split": None, "num_fewshot": 0}),
        "wikitext": ("wikitext/wikitext.yaml", {"training_split": None, "validation_split": None}),
    }
    for task, (base, extra) in specs.items():
        doc = {"include": str(builtin / base), "task": task, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": files[task]}, **extra}
        (folder / f"{task}.yaml").write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return folder


def naive_checkpoints(model: str, folder: Path, device: str = "cuda") -> dict[tuple[str, str], str]:
    """One folder per cell: the original for plain dtypes, a saved bitsandbytes checkpoint for quantized cells."""
    import torch
    from transformers import AutoModelForCausalLM

    from sweeper import precisions

    out = {}
    for p, cd in CELLS:
        if p in ("fp32", "fp16", "bf16"):
            out[(p, cd)] = model
            continue
        dst = folder / f"{p}-{cd}"
        if not (dst / "config.json").exists():
            kwargs = precisions.get(p).from_pretrained_kwargs(cd)
            m = AutoModelForCausalLM.from_pretrained(model, device_map={"": 0} if device == "cuda" else None, **kwargs)
            m.save_pretrained(dst)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(Path(model) / f, dst / f)
            del m
            if device == "cuda":
                torch.cuda.empty_cache()
        out[(p, cd)] = str(dst)
    return out


def read_naive(folder: Path) -> dict[tuple[str, str], float]:
    files = sorted(glob.glob(str(folder / "**" / "results_*.json"), recursive=True))
    if not files:
        return {}
    res = json.loads(Path(files[-1]).read_text())["results"]
    out = {}
    for task, entry in res.items():
        for key, val in entry.items():
            if "," in key and not key.split(",")[0].endswith("_stderr") and isinstance(val, (int, float)):
                metric, filt = key.split(",", 1)
                out[(task, metric if filt == "none" else key)] = float(val)
    return out


def read_sweep(root: Path) -> tuple[dict[tuple[str, str], dict[tuple[str, str], float]], list[dict]]:
    from sweeper.results import open_results

    res = open_results(str(root))  # the committed rows (docs/store.md)
    rows = res.trials.collect().to_dicts()
    cell = {r["trial_id"]: (r["precision"], r["compute_dtype"]) for r in rows}
    out: dict = {}
    for m in res.metrics.filter(pl.col("stage") == "tasks").collect().to_dicts():
        if m["trial_id"] in cell and m["value"] is not None:
            out.setdefault(cell[m["trial_id"]], {})[(m["task"], m["metric"])] = float(m["value"])
    return out, rows


def stream(cmd: list[str], env: dict, t0: float) -> int:
    """Run ``cmd``, printing each output line with the seconds since ``t0`` (where the launch's time goes)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if not any(skip in line for skip in ("│", "┆", "Warning", "warn(")):  # the plan table and library warnings
            say(f"  [{time.perf_counter() - t0:6.1f}s] {line.rstrip()}")
    return p.wait()


STAGE_COLUMNS = ("stage_load_s", "stage_benchmark_s", "timing_wait_s", "stage_perplexity_s", "stage_tasks_s",
                 "stage_write_s", "duration_s")


START_COLUMNS = ("ray_worker_started_at", "process_started_at", "warm_worker_ready_at", "ray_worker_preloaded_at",
                 "trainable_started_at", "load_started_at")
LOAD_METRICS = ("load_s", "library_import_s")


def trial_times(root: Path, launched_at: float) -> list[dict]:
    """Each trial's start-up (seconds since the launch began: the Ray worker process of its Tune trial started, the
    process that ran it started (a warm worker, or the same), its Tune trial began, its load began) and stage times
    from the results store, printed as a table."""
    from sweeper.results import open_results

    res = open_results(str(root))  # the committed rows (docs/store.md)
    rows = sorted(res.trials.collect().to_dicts(), key=lambda r: (r["precision"], r["compute_dtype"]))
    loads = res.metrics.filter((pl.col("stage") == "load") & pl.col("metric").is_in(LOAD_METRICS)).collect()

    def load_metrics(trial_id: str) -> dict:
        ms = loads.filter(pl.col("trial_id") == trial_id).to_dicts()
        return {m["metric"]: m["value"] for m in ms}

    out = [{"cell": f"{r['precision']}/{r['compute_dtype']}", "warm_worker": r.get("warm_worker"),
            **{c.removesuffix("_started_at").removesuffix("_at") + "_at_s": None if r.get(c) is None else r[c] - launched_at
               for c in START_COLUMNS},
            **{c: r.get(c) for c in STAGE_COLUMNS}, **{c: None for c in LOAD_METRICS},
            **load_metrics(r["trial_id"])} for r in rows]
    say("  trial start-up (s since launch): cell ray_worker process warm_ready preloaded trainable load | load_s "
        "library_import_s | warm worker")
    for r in out:
        say(f"    {r['cell']:10s} " + " ".join("-" if r[c] is None else f"{r[c]:.1f}"
                                             for c in ("ray_worker_at_s", "process_at_s", "warm_worker_ready_at_s",
                                                       "ray_worker_preloaded_at_s", "trainable_at_s", "load_at_s"))
            + " | " + " ".join("-" if r[c] is None else f"{r[c]:.2f}" for c in LOAD_METRICS)
            + f" | {'yes' if r['warm_worker'] else 'no'}")
    say("  trial stage times (s): cell " + " ".join(c.removesuffix("_s").removeprefix("stage_") for c in STAGE_COLUMNS))
    for r in out:
        say(f"    {r['cell']:10s} " + " ".join("-" if r[c] is None else f"{r[c]:.1f}" for c in STAGE_COLUMNS))
    return out


def warm_pool_logs(root: Path, launched_at: float, say) -> dict:
    """What the launch's warm workers said (kept in <results>/_warm/): the parent's line and each worker's ready
    message (its warm-up steps, when it was ready), printed and returned for the report."""
    import json

    out: dict = {"parent": None, "workers": []}
    for folder in sorted((root / "_warm").glob("*"))[-1:]:
        parent = folder / "parent.log"
        lines = parent.read_text(errors="replace").splitlines() if parent.exists() else []
        out["parent"] = next((line for line in reversed(lines) if line.startswith("warm pool ")), None)
        for log in sorted(folder.glob("worker-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if " ready: {" in line:
                    ready = json.loads(line.split(" ready: ", 1)[1])
                    out["workers"].append({**ready, "ready_at_s": ready["ready_at"] - launched_at})
    say(f"  warm pool: {out['parent']}")
    for w in out["workers"]:
        say(f"    worker {w['pid']} {w['key']}: ready at {w['ready_at_s']:.1f}s, warm-up {w['warm_up_s']:.1f}s "
            f"{json.dumps(w['steps'])}")
    return out


def processes_taken(root: Path) -> int:
    """How many Ray processes a launch's trials ran in, on all nodes (the refill starts as many again)."""
    from sweeper.results import open_results

    rows = open_results(str(root)).trials.collect()
    return rows.select("ray_node_id", "ray_worker_started_at").unique().height


def wait_preloaded(want: int, timeout_s: float = 180.0) -> dict:
    """Until ``want`` idle workers of this machine's Ray session (one per CPU of each node) have logged the end of
    their preload, or ``timeout_s``: how many did, and when."""
    from sweeper.local_ray import preloaded_idle_workers

    t0 = time.perf_counter()
    ready = 0
    while time.perf_counter() - t0 < timeout_s:
        ready = preloaded_idle_workers(Path("/tmp/ray/session_latest/logs"))  # both nodes of this host log there
        if ready >= want:
            break
        time.sleep(1)
    return {"ready": ready, "wanted": want, "waited_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a local model folder (fp16 or fp32 weights, with a tokenizer)")
    ap.add_argument("--data", default=str(REPO / ".gpu" / "h100" / "data"),
                    help="folder with piqa/valid.jsonl(+valid-labels.lst), gsm8k/test.jsonl, wikitext-2/test.txt")
    ap.add_argument("--work", default="/tmp/ttt")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--share", type=float, default=0.1, help="GPU share per trial (the estimate ignores lm-eval batches)")
    ap.add_argument("--no-lease", action="store_true",
                    help="time the benchmark without the exclusive timing lease (to measure what the lease costs)")
    ap.add_argument("--report", default="time_to_table.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="the naive runs' device")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--reuse-naive", action="store_true",
                    help="reuse naive cells already run in --work (their results and recorded seconds)")
    ap.add_argument("--ray-head", action="store_true",
                    help="start a Ray head first (not counted) and launch the sweep with --address auto")
    ap.add_argument("--gpu-node", action="store_true",
                    help="with --ray-head: the head has no GPU and a second node on this host has them all, so every "
                         "trial runs on a node other than the launching one (as on a cluster of GPU worker machines)")
    ap.add_argument("--node-preload", action="store_true",
                    help="with --ray-head: start the Ray node(s) as cluster.yaml does (idle workers that preload "
                         "sweeper.node_preload, the sweeper-preload label) and wait, uncounted, for their preload")
    ap.add_argument("--launches", type=int, default=1, choices=range(1, 10), metavar="1-9",
                    help="launch the study this many times on the same Ray (each into its own results folder; with "
                         "--node-preload, each next one once the nodes preloaded again); the first is the one timed "
                         "against the naive loop")
    ap.add_argument("--no-warm-workers", action="store_true",
                    help="launch the sweep with --no-warm-workers (every trial runs in a fresh Ray worker)")
    ap.add_argument("--ray-as-is", action="store_true",
                    help="launch the sweep with SWEEPER_RAY_AS_IS=1 (its private Ray started as Ray comes: "
                         "sweeper/local_ray.py)")
    ap.add_argument("--no-warm-fork", action="store_true",
                    help="launch the sweep with SWEEPER_WARM_FORK=0 (each warm worker imports everything itself: "
                         "sweeper/warm_pool_parent.py)")
    ap.add_argument("--no-warm-imports", action="store_true",
                    help="do not import the libraries once in a throwaway process before timing")
    a = ap.parse_args()

    work, data = Path(a.work).resolve(), Path(a.data).resolve()
    if Path(a.model).exists():  # the study file resolves relative paths against its own folder, not the cwd
        a.model = str(Path(a.model).resolve())
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": a.model, "limit": a.limit, "batch": a.batch, "seed": a.seed, "cells": CELLS,
                    "share": a.share, "lease": not a.no_lease}
    study = work / "study_time_to_table.py"
    write_study(study, a.model, data, a.limit, a.batch, a.seed, a.share, lease=not a.no_lease)
    py = sys.executable
    # a cold lm-eval task index cache: the sweep pays for building the index once, as on a fresh machine
    index_cache = work / "lm-eval-index"
    shutil.rmtree(index_cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SWEEPER_TASK_INDEX_CACHE": str(index_cache)}

    if not a.no_warm_imports:
        t0 = time.perf_counter()
        subprocess.run([py, "-c", WARM_IMPORTS], cwd=REPO, env=env, capture_output=True, text=True)
        report["warm_imports_s"] = time.perf_counter() - t0
        say(f"warm imports (a throwaway process; not counted): {report['warm_imports_s']:.1f}s")

    # ---------------------------------------------------------------- the sweep
    if not a.skip_sweep:
        from sweeper.local_ray import preloaded_idle_workers

        ray_cli = [py, "-m", "ray.scripts.scripts"]
        if a.ray_head:
            t0 = time.perf_counter()
            node_env, preload = env, []
            if a.node_preload:  # as cluster.yaml's start commands (docs/cluster.md)
                node_env = {**env, "RAY_enable_worker_prestart": "1", "RAY_preload_python_modules": "sweeper.node_preload",
                            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
                preload = ["--labels=sweeper-preload=1"]
            head = subprocess.run(ray_cli + ["start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
                                  + (["--num-gpus=0"] if a.gpu_node else []) + preload,
                                  cwd=REPO, env=node_env, capture_output=True, text=True)
            if head.returncode == 0 and a.gpu_node:  # a second node on this host, with the GPUs: ports of its own
                head = subprocess.run(ray_cli + ["start", "--address=127.0.0.1:6379", "--disable-usage-stats"]
                                      + [f"--{k}={v}" for k, v in GPU_NODE_PORTS.items()] + preload,
                                      cwd=REPO, env=node_env, capture_output=True, text=True)
            if head.returncode == 0 and a.node_preload:
                report["node_preload"] = wait_preloaded((2 if a.gpu_node else 1) * (os.cpu_count() or 1))
                say(f"idle workers preloaded (not counted): {report['node_preload']}")
            report["ray_head_start_s"] = time.perf_counter() - t0
            say(f"ray head{' and GPU node' if a.gpu_node else ''} started (not counted): "
                f"{report['ray_head_start_s']:.1f}s, rc {head.returncode}")
            if head.returncode != 0:
                raise SystemExit(f"`ray start` failed:\n{head.stdout[-1500:]}{head.stderr[-1500:]}")
        launches = []
        try:
            for i in range(a.launches):
                name = "sweep" if i == 0 else f"sweep{i + 1}"
                if i and a.node_preload:  # a next launch comes once the nodes preloaded again (sweeper/node_refill.py)
                    refill = wait_preloaded(ready + processes_taken(work / launches[-1]["name"]))
                    say(f"nodes preloaded again (not counted): {refill}")
                    if refill["ready"] < refill["wanted"]:
                        raise SystemExit(f"the nodes did not preload again: {refill}")
                ready = preloaded_idle_workers(Path("/tmp/ray/session_latest/logs")) if a.node_preload else 0
                t0, launched_at = time.perf_counter(), time.time()
                rc = stream([py, "-m", "sweeper.cli", "launch", str(study), "--results", str(work / name), "--fresh"]
                            + (["--address", "auto"] if a.ray_head else [])
                            + (["--no-warm-workers"] if a.no_warm_workers else []),
                            {**env, "SWEEPER_RAY_AS_IS": "1" if a.ray_as_is else "0",
                             "SWEEPER_WARM_FORK": "0" if a.no_warm_fork else "1",
                             # --gpu-node: the launching machine has no GPU (as a cluster's head), so no warm worker here
                             **({"CUDA_VISIBLE_DEVICES": ""} if a.gpu_node else {})}, t0)
                t_launch = time.perf_counter() - t0
                tab = subprocess.run([py, "-m", "sweeper.cli", "results", str(work / name), "--format", "csv"],
                                     cwd=REPO, env=env, capture_output=True, text=True)
                t_sweep = time.perf_counter() - t0
                launches.append(dict(name=name, sweep_s=t_sweep, sweep_launch_s=t_launch, sweep_rc=rc,
                                     sweep_table=tab.stdout, sweep_trials=trial_times(work / name, launched_at),
                                     warm_pool=warm_pool_logs(work / name, launched_at, say),
                                     refill=refill if i and a.node_preload else None))
                say(tab.stdout[-3000:])
                say(f"{name}: {t_sweep:.1f}s to the table (launch {t_launch:.1f}s, rc {rc})")
        finally:  # the head was up before the clock and is stopped after it (its stop is not the sweep's time)
            if a.ray_head:
                subprocess.run(ray_cli + ["stop"], cwd=REPO, env=env, capture_output=True, text=True)
        first = launches[0]
        report.update({k: v for k, v in first.items() if k not in ("name", "refill")}, ray_head=a.ray_head,
                      gpu_node=a.gpu_node, warm_workers=not a.no_warm_workers, ray_as_is=a.ray_as_is,
                      warm_fork=not a.no_warm_fork, node_preload=report.get("node_preload"))
        t_sweep = first["sweep_s"]
        for later in launches[1:]:  # the same study again: the same values as the first launch's
            later["same_values_as_first"] = read_sweep(work / later["name"])[0] == read_sweep(work / "sweep")[0]
            say(f"{later['name']}: same values as the first launch: {later['same_values_as_first']}")
        report["later_launches"] = launches[1:]

    # ---------------------------------------------------------------- the naive way
    if not a.skip_naive:
        t0 = time.perf_counter()
        yamls = naive_yamls(data, work / "yamls")
        ckpts = naive_checkpoints(a.model, work / "ckpt", a.device)
        report["naive_prep_s"] = time.perf_counter() - t0
        say(f"naive prep (quantized checkpoints, task YAMLs; not counted): {report['naive_prep_s']:.1f}s")
        per_cell, reused = {}, []
        t0 = time.perf_counter()
        for p, cd in CELLS:
            dest = work / "naive" / f"{p}-{cd}"
            seconds = work / "naive" / f"{p}-{cd}.seconds.json"
            ran_with = {"checkpoint": ckpts[(p, cd)], "limit": a.limit, "batch": a.batch, "seed": a.seed,
                        "device": a.device}
            rec = json.loads(seconds.read_text()) if a.reuse_naive and seconds.exists() else None
            if rec and rec.get("ran_with") == ran_with and read_naive(dest):
                per_cell[f"{p}/{cd}"] = rec["seconds"]
                reused.append({"cell": f"{p}/{cd}", **rec})
                say(f"naive {p}/{cd}: reused, {rec['seconds']:.1f}s (measured at {rec['at']})")
                continue
            shutil.rmtree(dest, ignore_errors=True)
            cmd = [py, "-m", "lm_eval", "--model", "hf", "--model_args",
                   f"pretrained={ckpts[(p, cd)]},dtype={TORCH_DTYPE[cd]}", "--device", "cuda:0" if a.device == "cuda" else "cpu",
                   "--tasks", ",".join(TASKS), "--include_path", str(yamls), "--limit", str(a.limit),
                   "--batch_size", str(a.batch), "--seed", ",".join([str(a.seed)] * 4), "--output_path", str(dest)]
            c0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            per_cell[f"{p}/{cd}"] = time.perf_counter() - c0
            say(f"naive {p}/{cd}: rc {r.returncode}, {per_cell[f'{p}/{cd}']:.1f}s")
            if r.returncode != 0:
                say(r.stdout[-1500:] + r.stderr[-2500:])
            else:
                seconds.write_text(json.dumps({"seconds": per_cell[f"{p}/{cd}"], "ran_with": ran_with,
                                               "at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        # the sum of the cells: equal to the wall time when none is reused (the loop does nothing else)
        report["naive_s"] = sum(per_cell.values())
        report["naive_wall_s"] = time.perf_counter() - t0
        report["naive_cell_s"] = per_cell
        report["naive_reused"] = reused
        say(f"naive: {report['naive_s']:.1f}s for 8 lm_eval runs" + (f" ({len(reused)} reused)" if reused else ""))

    # ---------------------------------------------------------------- the check
    if not a.skip_sweep and not a.skip_naive:
        sweep_vals, _ = read_sweep(work / "sweep")
        compared, mismatches = 0, []
        for p, cd in CELLS:
            naive = read_naive(work / "naive" / f"{p}-{cd}")
            mine = sweep_vals.get((p, cd), {})
            if not naive or not mine:
                mismatches.append({"cell": f"{p}/{cd}", "problem": f"missing: naive {len(naive)} / sweep {len(mine)} metrics"})
                continue
            for key in sorted(set(naive) | set(mine)):
                x, y = naive.get(key), mine.get(key)
                compared += 1
                same = x is not None and y is not None and (x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12))
                if not same:
                    mismatches.append({"cell": f"{p}/{cd}", "task": key[0], "metric": key[1], "naive": x, "sweep": y})
        report.update(compared=compared, mismatches=mismatches,
                      values={f"{p}/{cd}": {f"{t}:{m}": v for (t, m), v in sweep_vals.get((p, cd), {}).items()}
                              for p, cd in CELLS})
        report["ratio"] = report["naive_s"] / report["sweep_s"]
        say(f"time to table: sweep {report['sweep_s']:.1f}s vs naive {report['naive_s']:.1f}s "
            f"(+ {report['naive_prep_s']:.1f}s prep not counted): x{report['ratio']:.2f}")
        say(f"accuracy check: {compared} (cell, task, metric) values compared, {len(mismatches)} differ")
        for m in mismatches[:20]:
            say(f"  differs: {m}")
        for cell, vals in report["values"].items():
            say(f"  {cell}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(vals.items())))
    Path(a.report).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
