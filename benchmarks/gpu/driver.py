"""One command per device call: builds the random-weight models if missing, runs a measurement set, writes logs and CSV
summaries under --out (at most 8 files: driver.log, trials.csv, metrics.csv, summary.txt, env.txt, timing.csv, ...).

    export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu/driver.py --out $OUT grid          # points 1, 4, 5: the 0.5B + 8B grid through sweep launch
    python3 benchmarks/gpu/driver.py --out $OUT pack oom timing   # points 2, 3, 4
    python3 benchmarks/gpu/driver.py --out $OUT ttt           # point 6: benchmarks/time_to_table.py
    python3 benchmarks/gpu/driver.py --out $OUT ttt --ttt-part naive   # then, in the next call: --ttt-part sweep
    python3 benchmarks/gpu/driver.py --out $OUT ttt --ttt-part sweep --ttt-no-warm   # the sweep without warm workers
    python3 benchmarks/gpu/driver.py --out $OUT ttt --ttt-part sweep --ttt-ray-as-is # its Ray as Ray comes
    python3 benchmarks/gpu/driver.py --out $OUT ttt --ttt-part sweep --ttt-no-fork   # warm workers not forked
    python3 benchmarks/gpu/driver.py --out $OUT tttprobe startup   # point 6: the sweep side alone; a fresh process's start-up
    python3 benchmarks/gpu/driver.py --out $OUT multi --multi-models 2   # point 7: 16 trials on 1 GPU vs all GPUs

Every sweep runs as `python3 -m sweeper.cli launch <study> --results <dir> --fresh` in a subprocess (local Ray on this
machine), and its wall time is taken around that subprocess.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODELS = Path(os.environ.get("SWEEPER_GPU_MODELS", "/tmp/gpu-models"))
RESULTS = Path(os.environ.get("SWEEPER_GPU_RESULTS", "/tmp/gpu-results"))


class Out:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder / "driver.log", "a")
        self.summary = open(folder / "summary.txt", "a")
        self.deadline = time.time() + 1e9

    def say(self, msg: str, summary: bool = False) -> None:
        line = f"[{dt.datetime.now(dt.timezone.utc).strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()
        if summary:
            self.summary.write(msg + "\n")
            self.summary.flush()

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, float, str]:
        """Run ``cmd``, streaming its output into driver.log as it comes (a killed call still brings it back)."""
        timeout = max(5.0, min(timeout, self.deadline - time.time() - 5))
        self.say("$ " + " ".join(cmd) + f"  (timeout {timeout:.0f}s)")
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        lines: list[str] = []
        import threading

        def pump():
            for line in p.stdout:  # stamped as it arrives, so a hang after the last line shows in the log
                lines.append(line)
                self.log.write(f"{dt.datetime.now(dt.timezone.utc).strftime('%H:%M:%S')} {line}")
                self.log.flush()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = 124
            lines.append("[TIMEOUT]\n")
        th.join(5)
        wall = time.perf_counter() - t0
        self.say(f"rc={rc} wall={wall:.1f}s")
        return rc, wall, "".join(lines)


def env_info(out: Out) -> None:
    with open(out.folder / "env.txt", "w") as fh:
        for cmd in (["nvidia-smi"], ["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit",
                                     "--format=csv"], ["date", "-u"], ["nproc"]):
            try:
                fh.write("$ " + " ".join(cmd) + "\n" + subprocess.run(cmd, capture_output=True, text=True).stdout + "\n")
            except OSError as e:
                fh.write(f"{cmd}: {e}\n")
        code = ("import torch, transformers, importlib\n"
                "print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())\n"
                "for m in ('transformers','accelerate','bitsandbytes','ray','lm_eval','polars','pyarrow','torchao','hqq'):\n"
                "    try: print(m, importlib.import_module(m).__version__)\n"
                "    except Exception as e: print(m, 'missing', e)\n")
        fh.write(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)


def ensure_models(out: Out, names: list[str]) -> None:
    args = [sys.executable, str(HERE / "make_models.py"), "--out", str(MODELS)]
    for n in names:
        args += ["--only", n]
    rc, wall, text = out.run(args, timeout=900)
    out.say("\n".join(l for l in text.splitlines() if "params" in l or "exists" in l))
    if rc != 0:
        raise SystemExit(f"building models failed (rc {rc})")


# ------------------------------------------------------------------------------------------------ reading results
def read_results(root: Path) -> tuple[list[dict], list[dict], dict[str, list[float]]]:
    from datetime import datetime

    from sweeper.results import open_results
    from sweeper.store import ResultsStore

    # the committed rows (docs/store.md); a row's write time is its per-trial file's mtime (compaction merges those
    # into segments only past 64 trials: then the row's finish time, to the second, plus its write stage)
    res = open_results(str(root))
    live = ResultsStore(root).state().trials
    rows = sorted(res.trials.collect().to_dicts(), key=lambda r: r["trial_id"])
    for r in rows:
        f = live[r["trial_id"]].files["trials"]
        r["_row_mtime"] = ((root / f).stat().st_mtime if not f.startswith("data/seg-")
                           else datetime.fromisoformat(r["finished_at"]).timestamp() + (r.get("stage_write_s") or 0.0))
    metrics = res.metrics.sort("trial_id", maintain_order=True).collect().to_dicts()
    events: dict[str, list[float]] = {}
    ev = root / "_tune" / "events.jsonl"
    if ev.exists():
        for line in ev.read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "scheduled":
                events.setdefault(e["trial_id"], []).append(e["at"])
    return rows, metrics, events


TRIAL_COLS = ["run", "trial_id", "model", "precision", "compute_dtype", "status", "error_stage", "error_type", "error",
              "gpu_share", "attempt", "worker_pid", "worker_trial_index", "scheduled_at", "load_started_at",
              "overhead_s", "write_s", "stage_write_s", "duration_s", "stage_load_s", "stage_benchmark_s",
              "stage_perplexity_s", "stage_tasks_s", "timing_exclusive", "timing_wait_s", "graph_decode_error",
              "device_name", "device_uuid", "torch_version", "transformers_version", "bitsandbytes_version", "ray_version"]


def trial_records(run: str, rows, events) -> list[dict]:
    out = []
    for r in rows:
        rec = {k: r.get(k) for k in TRIAL_COLS}
        rec["run"] = run
        ls = r.get("load_started_at")
        sched = [t for t in events.get(r["trial_id"], []) if ls is None or t <= ls + 1e-3]
        rec["scheduled_at"] = max(sched) if sched else None
        rec["overhead_s"] = (ls - rec["scheduled_at"]) if ls and rec["scheduled_at"] else None
        # the trial's stages end at load_started_at + duration_s (setup before it takes microseconds); the row file's
        # mtime is the end of writing: metrics (and samples) first, then the row
        rec["write_s"] = (r["_row_mtime"] - (ls + r["duration_s"])) if ls and r.get("duration_s") is not None else None
        out.append(rec)
    return out


def append_csv(path: Path, records: list[dict], cols: list[str] | None = None) -> None:
    import csv

    if not records:
        return
    cols = cols or sorted({k for r in records for k in r})
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(records)


METRIC_COLS = ["run", "trial_id", "model", "precision", "compute_dtype", "stage", "task", "metric", "batch_size", "value",
               "stderr", "n", "min", "max", "unit"]


def save_run(out: Out, run: str, root: Path) -> tuple[list[dict], list[dict]]:
    rows, metrics, events = read_results(root)
    trials = trial_records(run, rows, events)
    cell = {r["trial_id"]: r for r in rows}
    mrecs = []
    for m in metrics:
        t = cell.get(m["trial_id"], {})
        mrecs.append({**m, "run": run, "model": t.get("model"), "precision": t.get("precision"),
                      "compute_dtype": t.get("compute_dtype")})
    append_csv(out.folder / "trials.csv", trials, TRIAL_COLS)
    append_csv(out.folder / "metrics.csv", mrecs, METRIC_COLS)
    return trials, mrecs


def overhead_lines(run: str, trials: list[dict]) -> list[str]:
    lines = []
    ov = [t["overhead_s"] for t in trials if t["overhead_s"] is not None]
    reused = [t["overhead_s"] for t in trials if t["overhead_s"] is not None and (t["worker_trial_index"] or 0) > 0]
    fresh = [t["overhead_s"] for t in trials if t["overhead_s"] is not None and (t["worker_trial_index"] or 0) == 0]
    wr = [t["write_s"] for t in trials if t["write_s"] is not None]
    pids = {t["worker_pid"] for t in trials}
    if ov:
        lines.append(f"{run}: scheduled->load start median {statistics.median(ov):.3f}s (n={len(ov)}, max {max(ov):.3f}); "
                     f"reused workers median {statistics.median(reused):.3f}s (n={len(reused)})" if reused else
                     f"{run}: scheduled->load start median {statistics.median(ov):.3f}s (n={len(ov)}, max {max(ov):.3f}); no reused worker")
        if fresh:
            lines.append(f"{run}: fresh workers (first trial of a process) median {statistics.median(fresh):.3f}s (n={len(fresh)})")
    if wr:
        lines.append(f"{run}: result writing median {statistics.median(wr):.3f}s (max {max(wr):.3f}); "
                     f"{len(trials)} trials on {len(pids)} worker processes")
    return lines


def metric_table(trials: list[dict], mrecs: list[dict]) -> list[str]:
    by = {}
    for m in mrecs:
        key = (m["trial_id"], m["metric"], m.get("batch_size"))
        by[key] = m["value"]
    lines = [f"{'model':20} {'prec':5} {'cd':4} {'status':6} {'share':5} {'load_s':>6} {'wGB':>6} {'peakGB':>6} "
             f"{'pre_ms':>7} {'eager':>6} {'graph':>7} {'roof':>7} {'frac':>5} {'b8tok/s':>8} {'ppl':>9} {'wait_s':>6}  "
             f"error / graph error"]
    for t in sorted(trials, key=lambda t: (t["model"], t["precision"], t["compute_dtype"])):
        tid = t["trial_id"]

        def g(name, b=None, scale=1.0, fmt="{:.1f}"):
            v = by.get((tid, name, b))
            if v is None and b is None:
                v = by.get((tid, name, 1))
            return fmt.format(v * scale) if v is not None else "-"
        err = (t.get("error") or "")[:120] or (t.get("graph_decode_error") or "")[:160]
        lines.append(f"{t['model'][:20]:20} {t['precision']:5} {t['compute_dtype']:4} {t['status']:6} "
                     f"{t['gpu_share'] or 0:5.2f} {g('load_s'):>6} {g('weights_bytes', scale=1e-9, fmt='{:.2f}'):>6} "
                     f"{g('peak_memory_bytes', scale=1e-9, fmt='{:.2f}'):>6} {g('prefill_ms', 1, fmt='{:.2f}'):>7} "
                     f"{g('decode_tok_s', 1):>6} {g('decode_graph_tok_s', 1):>7} {g('decode_roofline_tok_s', 1):>7} "
                     f"{g('decode_roofline_fraction', 1, fmt='{:.2f}'):>5} {g('throughput_tok_s', 8):>8} "
                     f"{g('token_perplexity', fmt='{:.0f}'):>9} {(t.get('timing_wait_s') or 0):6.1f}  {err}")
    bw = [m["value"] for m in mrecs if m["metric"] == "device_bandwidth_bytes_per_s"]
    if bw:
        lines.append(f"measured device-to-device copy bandwidth (read+write): median {statistics.median(bw) / 1e12:.2f} TB/s "
                     f"over {len(bw)} trials (min {min(bw) / 1e12:.2f}, max {max(bw) / 1e12:.2f})")
    return lines


def launch(out: Out, run: str, study: str, extra: list[str], timeout: float,
           env: dict | None = None) -> tuple[float, list[dict], list[dict], int]:
    root = RESULTS / run
    cmd = [sys.executable, "-m", "sweeper.cli", "launch", study, "--results", str(root), "--fresh", "--retries", "0", *extra]
    rc, wall, text = out.run(cmd, timeout=timeout, env=env)
    out.say(f"{run}: `sweep launch {study} {' '.join(extra)}` rc={rc}, wall {wall:.1f}s", summary=True)
    for line in text.splitlines():
        if line.startswith("summary:") or "FAILED" in line or "retrying" in line or line.startswith("ray:"):
            out.say(f"  {run}: {line.strip()}", summary=True)
    trials, mrecs = save_run(out, run, root) if (root / "_log").exists() else ([], [])
    return wall, trials, mrecs, rc


# ------------------------------------------------------------------------------------------------------ the sets
def do_grid(out: Out, a) -> None:
    ensure_models(out, ["qwen2.5-0.5b-shape", "llama3-8b-shape"])
    wall, trials, mrecs, rc = launch(out, "grid", "benchmarks/gpu/grid.py", [], timeout=a.grid_timeout)
    for line in metric_table(trials, mrecs) + overhead_lines("grid", trials):
        out.say(line, summary=True)


def trials_phase_s(root: Path) -> float | None:
    """First trial scheduled -> last result file written: the sweep's wall time without its launch overhead."""
    rows, _, events = read_results(root)
    first = min((t for ts in events.values() for t in ts), default=None)
    return max(r["_row_mtime"] for r in rows) - first if rows and first else None


def do_pack(out: Out, a) -> None:
    """Point 2: 8 trials packed (auto shares) vs one whole GPU per trial; point 4: overhead on reused workers.
    One-per-GPU runs first so that both packed runs find warm caches; the lease-off run shows the lease's cost."""
    ensure_models(out, ["qwen2.5-0.5b-shape"])
    runs = (("pack-one", ["--gpus-per-trial", "1"], {}), ("pack-auto", [], {}),
            ("pack-auto-nolease", [], {"SWEEPER_GPU_LEASE": "0"}))
    res = {}
    for run, extra, env in runs:
        if out.deadline - time.time() < 90:
            out.say(f"{run}: skipped (deadline)", summary=True)
            continue
        wall, trials, mrecs, rc = launch(out, run, "benchmarks/gpu/packing.py", extra, timeout=240, env=env)
        res[run] = (wall, trials_phase_s(RESULTS / run), trials, mrecs)
    for run, (wall, phase, trials, mrecs) in res.items():
        shares = sorted({t["gpu_share"] for t in trials})
        done = sum(t["status"] == "done" for t in trials)
        out.say(f"{run}: {done}/{len(trials)} done, shares {shares}, launch wall {wall:.1f}s, trials phase "
                f"{phase or float('nan'):.1f}s, trial durations sum {sum(t['duration_s'] or 0 for t in trials):.1f}s, "
                f"timing waits sum {sum(t['timing_wait_s'] or 0 for t in trials):.1f}s", summary=True)
        for line in overhead_lines(run, trials) + metric_table(trials, mrecs):
            out.say(line, summary=True)
    if "pack-one" in res:
        for run in ("pack-auto", "pack-auto-nolease"):
            if run in res and res[run][1] and res["pack-one"][1]:
                out.say(f"packing: {run} vs pack-one: launch wall x{res['pack-one'][0] / res[run][0]:.2f}, "
                        f"trials phase x{res['pack-one'][1] / res[run][1]:.2f} (>1: packed is faster)", summary=True)


def do_grid8b(out: Out, a) -> None:
    ensure_models(out, ["qwen2.5-0.5b-shape", "llama3-8b-shape"])  # the study names both folders; --only narrows later
    wall, trials, mrecs, rc = launch(out, "grid8b", "benchmarks/gpu/grid.py", ["--only", "model=llama3-8b-shape"],
                                     timeout=a.grid_timeout)
    for line in metric_table(trials, mrecs) + overhead_lines("grid8b", trials):
        out.say(line, summary=True)


def do_torchao(out: Out, a) -> None:
    ensure_models(out, ["qwen2.5-0.5b-shape"])
    wall, trials, mrecs, rc = launch(out, "torchao", "benchmarks/gpu/torchao_grid.py", [], timeout=a.grid_timeout)
    for line in metric_table(trials, mrecs) + overhead_lines("torchao", trials):
        out.say(line, summary=True)


def do_prec(out: Out, a) -> None:
    """Issue 7: torchao / awq4 / hqq on the 8B shape, then hqq on the 0.5B shape."""
    ensure_models(out, ["qwen2.5-0.5b-shape", "llama3-8b-shape"])
    for run, only, share_of_time in (("prec8b", ["--only", "model=llama3-8b-shape"], 0.72),
                                     ("prec05", ["--only", "model=qwen2.5-0.5b-shape", "--only",
                                                 "precision=bf16,hqq4,hqq8"], 1.0)):
        left = out.deadline - time.time() - 10
        wall, trials, mrecs, rc = launch(out, run, "benchmarks/gpu/precisions_grid.py", only, timeout=left * share_of_time)
        for line in metric_table(trials, mrecs) + overhead_lines(run, trials):
            out.say(line, summary=True)


def do_rest8b(out: Out, a) -> None:
    """Issue 6 point 1: the 8B bitsandbytes cells run3 did not reach (int8 x2, nf4, fp4 x2; nf4/fp16 again)."""
    ensure_models(out, ["qwen2.5-0.5b-shape", "llama3-8b-shape"])
    wall, trials, mrecs, rc = launch(out, "rest8b", "benchmarks/gpu/grid.py",
                                     ["--only", "model=llama3-8b-shape", "--only", "precision=int8,nf4,fp4"],
                                     timeout=a.grid_timeout)
    for line in metric_table(trials, mrecs) + overhead_lines("rest8b", trials):
        out.say(line, summary=True)


def do_multi(out: Out, a) -> None:
    """Issue 6 point 7: the same trials (8, 16 or 32: --multi-models) with one GPU visible and with all of them,
    whole GPU per trial and packed."""
    import torch

    n = torch.cuda.device_count()
    ensure_models(out, ["qwen2.5-0.5b-shape"] + (["qwen2.5-0.5b-body-v4k"] if a.multi_models >= 2 else []))
    if a.multi_models == 4:  # the same two models under a second path: 16 more trials of the same work
        for name in ("qwen2.5-0.5b-shape", "qwen2.5-0.5b-body-v4k"):
            again = MODELS / f"{name}-again"
            if not again.exists():
                again.symlink_to(MODELS / name, target_is_directory=True)
    walls = {}
    modes = {"whole": ["--gpus-per-trial", "1"], "auto": []}
    for mode, extra in ((m, modes[m]) for m in a.multi_modes):
        for gpus in (1, n):
            run = f"multi-{mode}-{gpus}gpu"
            env_gpus = ",".join(str(i) for i in range(gpus))
            left = out.deadline - time.time() - 10
            if left < 60:
                out.say(f"{run}: skipped, {left:.0f}s left", summary=True)
                continue
            wall, trials, _, rc = launch(out, run, "benchmarks/gpu/packing.py", extra, timeout=left,
                                         env={"CUDA_VISIBLE_DEVICES": env_gpus,
                                              "SWEEPER_GPU_PACK_MODELS": str(a.multi_models)})
            done = sum(t["status"] == "done" for t in trials)
            phase = trials_phase_s(RESULTS / run) if trials else None
            walls[(mode, gpus)] = (wall, phase)
            out.say(f"{run}: CUDA_VISIBLE_DEVICES={env_gpus} rc={rc}, {done}/{len(trials)} done, launch wall "
                    f"{wall:.1f}s, trials phase {phase or float('nan'):.1f}s, {done / wall * 60:.2f} trials/min, "
                    f"{len({t['worker_pid'] for t in trials})} worker processes, "
                    f"{len({t.get('device_name') for t in trials})} device name(s); trials per GPU "
                    f"{sorted(Counter(str(t.get('device_uuid'))[-8:] for t in trials).items())}, shares "
                    f"{sorted({t['gpu_share'] for t in trials})}", summary=True)
            for line in overhead_lines(run, trials):
                out.say(line, summary=True)
        if (mode, 1) in walls and (mode, n) in walls:
            (w1, p1), (wn, pn) = walls[(mode, 1)], walls[(mode, n)]
            out.say(f"multi {mode}: {n} GPUs vs 1: launch wall x{w1 / wn:.2f}, trials phase "
                    f"x{(p1 / pn) if p1 and pn else float('nan'):.2f} (target >= {0.9 * n:.1f})", summary=True)


def do_oom(out: Out, a) -> None:
    ensure_models(out, ["qwen2.5-0.5b-shape", "llama3-8b-shape"])
    wall, trials, mrecs, rc = launch(out, "oom", "benchmarks/gpu/oom.py", [], timeout=400)
    for t in trials:
        out.say(f"oom: {t['model']} {t['precision']} share {t['gpu_share']} attempt {t['attempt']}: {t['status']} "
                f"{t['error_type'] or ''} {(t['error'] or '')[:200]}", summary=True)


def do_timing(out: Out, a) -> None:
    ensure_models(out, ["qwen2.5-0.5b-shape"])
    cmd = [sys.executable, str(HERE / "timing_spread.py"), "--model", str(MODELS / "qwen2.5-0.5b-shape"),
           "--rounds", str(a.rounds), "--csv", str(out.folder / "timing.csv"), "--neighbours", "2",
           "--neighbour-tokens", "256", "--new-tokens", "16"]
    if os.environ.get("SWEEPER_GPU_GRAPH", "1") != "1":
        cmd.append("--no-graph")
    rc, wall, text = out.run(cmd, timeout=a.timing_timeout)
    for line in text.splitlines():
        if line.strip() and not line.startswith(("Warning", "warn", "  warn")):
            out.say("timing: " + line, summary=True)


def do_ttt(out: Out, a) -> None:
    # the real small model (llama-4m, trained weights): its accuracy numbers mean something, as in the seed's table
    model = REPO / ".gpu" / "h100" / "llama-4m"
    cmd = [sys.executable, str(REPO / "benchmarks" / "time_to_table.py"), "--model", str(model),
           "--work", "/tmp/ttt", "--report", str(out.folder / "time_to_table.json"), "--limit", str(a.ttt_limit),
           "--share", str(a.ttt_share)] + {"both": [], "naive": ["--skip-sweep"], "sweep": ["--reuse-naive"]}[a.ttt_part] \
        + (["--ray-head"] if a.ttt_ray_head else []) + (["--no-warm-workers"] if a.ttt_no_warm else []) \
        + (["--ray-as-is"] if a.ttt_ray_as_is else []) + (["--no-warm-fork"] if a.ttt_no_fork else [])
    rc, wall, text = out.run(cmd, timeout=max(10.0, min(a.ttt_timeout, out.deadline - time.time() - 5)))
    report = out.folder / "time_to_table.json"
    if a.ttt_ray_head and report.exists():  # its own name, beside a plain ttt's report
        report.rename(report.with_name("time_to_table_ray_head.json"))
    for line in text.splitlines()[-60:]:
        out.say("ttt: " + line, summary=True)


def do_tttprobe(out: Out, a) -> None:
    """The time-to-table study's sweep side alone at several GPU shares (how many trials share the GPU at once)."""
    model = REPO / ".gpu" / "h100" / "llama-4m"
    for share in a.ttt_probe_shares:
        left = out.deadline - time.time() - 10
        if left < 60:
            out.say(f"tttprobe share {share}: skipped, {left:.0f}s left", summary=True)
            continue
        cmd = [sys.executable, str(REPO / "benchmarks" / "time_to_table.py"), "--model", str(model), "--work",
               f"/tmp/ttt-probe-{share}", "--report", str(out.folder / f"ttt_probe_{share}.json"), "--limit",
               str(a.ttt_limit), "--share", str(share), "--skip-naive"]
        rc, wall, text = out.run(cmd, timeout=left)
        for line in text.splitlines():
            if line.startswith(("sweep:", "  trial stage", "    ")):
                out.say(f"tttprobe share {share}: " + line, summary=True)


def do_startup(out: Out, a) -> None:
    """Where a fresh process's seconds go (imports, CUDA context, first load, task index, Ray), with importtime."""
    model = REPO / ".gpu" / "h100" / "llama-4m"
    rc, wall, text = out.run([sys.executable, "-X", "importtime", str(HERE / "startup_profile.py"), "--model",
                              str(model), "--ray"], timeout=240)
    imports = []
    for line in text.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cum, name = line.split("|", 2)
            if cum.strip().isdigit():
                imports.append((int(cum.strip()), name.rstrip()))
        elif line.strip():
            out.say("startup: " + line, summary=True)
    for cum, name in sorted(imports, reverse=True)[:40]:
        out.say(f"startup import {cum / 1e6:6.2f}s {name}", summary=True)


SETS = {"grid": do_grid, "grid8b": do_grid8b, "prec": do_prec, "rest8b": do_rest8b, "multi": do_multi, "torchao": do_torchao, "pack": do_pack, "oom": do_oom, "timing": do_timing, "ttt": do_ttt, "tttprobe": do_tttprobe, "startup": do_startup}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sets", nargs="+", choices=sorted(SETS))
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--grid-timeout", type=float, default=480)
    ap.add_argument("--ttt-timeout", type=float, default=540)
    ap.add_argument("--ttt-limit", type=int, default=16)
    ap.add_argument("--multi-modes", nargs="+", choices=["whole", "auto"], default=["whole", "auto"])
    ap.add_argument("--multi-models", type=int, choices=[1, 2, 4], default=1,
                    help="multi: 8 trials (1), 16 (2) or 32 (4)")
    ap.add_argument("--ttt-share", type=float, default=0.1, help="ttt: the sweep's GPU share per trial")
    ap.add_argument("--ttt-ray-head", action="store_true", help="ttt: the sweep against a Ray head already up")
    ap.add_argument("--ttt-no-warm", action="store_true", help="ttt: the sweep launched with --no-warm-workers")
    ap.add_argument("--ttt-no-fork", action="store_true",
                    help="ttt: each warm worker imports everything itself (SWEEPER_WARM_FORK=0)")
    ap.add_argument("--ttt-ray-as-is", action="store_true",
                    help="ttt: the sweep's private Ray started as Ray comes (SWEEPER_RAY_AS_IS=1)")
    ap.add_argument("--ttt-part", choices=["both", "naive", "sweep"], default="both",
                    help="ttt: both sides in this call, or the naive cells now and the sweep (reusing them) in a "
                         "later call on the same machine")
    ap.add_argument("--ttt-probe-shares", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--timing-timeout", type=float, default=300)
    ap.add_argument("--deadline", type=float, default=585, help="seconds from start: every command ends before")
    a = ap.parse_args()
    out = Out(Path(a.out))
    out.deadline = time.time() + a.deadline
    env_info(out)
    for s in a.sets:
        t0 = time.perf_counter()
        try:
            SETS[s](out, a)
        except Exception as e:  # keep going: what is under --out still comes back
            out.say(f"{s}: driver error {type(e).__name__}: {e}", summary=True)
        out.say(f"set {s} took {time.perf_counter() - t0:.1f}s", summary=True)


if __name__ == "__main__":
    main()
