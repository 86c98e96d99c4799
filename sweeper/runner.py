"""Running one trial in the current process: stages in order, failures isolated into the trial row, results written.

No Ray here: the scheduler calls :func:`run_trial` inside a Ray Tune trial; tests call it directly.
"""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
import time
import traceback
from contextlib import nullcontext
from typing import Any

from . import precisions
from .environment import device_environment, static_environment
from .errors import StageError
from .measure import process_started_at
from .store import ResultsStore
from .trials import TrialSpec

log = logging.getLogger(__name__)


_PROCESS_TRIALS = [0]  # trials this worker process has run: > 0 means a reused worker (no torch / CUDA start-up)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def classify_error(exc: BaseException) -> str:
    import torch

    if isinstance(exc, StageError):
        return exc.error_type
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return "OutOfMemory"
    if isinstance(exc, MemoryError):
        return "OutOfMemory"
    if isinstance(exc, OSError) and ("does not appear to have" in str(exc) or "not a valid model identifier" in str(exc)
                                      or "Can't load" in str(exc) or "is not a local folder" in str(exc)
                                      or "Repo id must be in the form" in str(exc)):  # a path that is not there
        return "ModelNotFound"
    return type(exc).__name__


def config_row(spec: TrialSpec) -> dict[str, Any]:
    return {
        "trial_id": spec.trial_id, "study": spec.study, "model": spec.model.name, "model_id": spec.model.id,
        "model_revision": spec.model.revision, "model_fingerprint": spec.model_fingerprint,
        "precision": spec.precision, "precision_options": spec.precision_options, "compute_dtype": spec.compute_dtype,
        "is_baseline": spec.is_baseline, "baseline_id": spec.baseline_id, "gpu_share": spec.gpu_share,
        "cpus": spec.cpus, "tasks": [t.name for t in spec.tasks], "config": spec.to_dict(),
    }


def run_trial(spec: TrialSpec, store: ResultsStore, attempt: int = 1, device: str | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage of ``spec``, write its files atomically, and return its trial row.

    A failing stage ends the trial: the row gets status "failed" with the stage, error type and message; metrics
    measured before the failure are kept. Exceptions other than stage failures (KeyboardInterrupt) propagate.
    """
    import torch

    device = device or pick_device()
    torch.manual_seed(spec.seed)
    if device == "cuda":
        # One trial's excess becomes its own OOM, not its neighbour's (reset to 1 for a whole GPU: workers are reused).
        # (every GPU the trial sees: Ray makes visible only the one of a share, or the trial's whole GPUs)
        for i in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec.gpu_share) if spec.gpu_share else 1.0, i)
    row: dict[str, Any] = {**config_row(spec), **static_environment(), **device_environment(device),
                           "attempt": attempt, "started_at": _now(), "status": "done", "error_stage": None,
                           "error_type": None, "error": None, "error_traceback": None,
                           "worker_pid": os.getpid(), "worker_trial_index": _PROCESS_TRIALS[0],
                           "process_started_at": process_started_at(), **(extra or {})}
    _PROCESS_TRIALS[0] += 1
    metrics: list[dict] = []
    samples = None
    stage = "setup"
    t_trial = time.perf_counter()
    loaded = None
    lease = None
    order: list[str] = []  # the stages in the order they started
    try:
        from .stages.load import load_model
        from .timing_lease import TimingLease

        if spec.benchmark.enabled and spec.benchmark.exclusive_timing:
            lease = TimingLease(device)
        stage = "load"
        order.append(stage)
        row["load_started_at"] = time.time()
        t0 = time.perf_counter()
        with (lease.shared() if lease else nullcontext()):
            loaded = load_model(spec, device, store)
        metrics += loaded.metrics
        row.update(loaded.facts)
        row["stage_load_s"] = time.perf_counter() - t0
        if lease:
            lease.guard_forwards(loaded.model)
        for stage, fn in _ordered_stages(spec, lease):
            order.append(stage)
            t0 = time.perf_counter()
            out = fn(spec, loaded, store, lease)
            if out:
                new_metrics, new_row, new_samples = out
                metrics += new_metrics
                row.update(new_row)
                if new_samples is not None:
                    samples = new_samples
            row[f"stage_{stage}_s"] = time.perf_counter() - t0
    except Exception as exc:  # isolate the failure in this trial's row
        row.update(status="failed", error_stage=stage, error_type=classify_error(exc),
                   error=f"{type(exc).__name__}: {exc}".splitlines()[0][:1000],
                   error_traceback="".join(traceback.format_exception(exc))[-8000:])
        log.warning("trial %s (%s) failed in %s: %s", spec.trial_id, spec.cell, stage, row["error"])
    finally:
        if lease is not None:
            lease.close()  # closing the files releases any lock a failed forward left held
        if loaded is not None:
            del loaded
        gc.collect()
        if device == "cuda":
            try:
                torch.cuda.empty_cache()
            except RuntimeError as e:  # after a device-side assert the context is unusable: still write the row
                log.warning("CUDA cleanup after trial %s failed: %s", spec.trial_id, e)
    row["stage_order"] = ",".join(order) or None
    row["finished_at"] = _now()
    row["duration_s"] = time.perf_counter() - t_trial
    for m in metrics:
        m["trial_id"] = spec.trial_id
    store.write_trial(row, metrics, samples)
    return row


def run_request(request: dict[str, Any], store: Any = None) -> dict[str, Any]:
    """Run the trial of ``request`` (``spec`` as a dict, ``store`` root, ``attempt``, ``extra`` row values, ``token``:
    the owning launch's, under which the trial is committed) in this
    process; returns what its Tune trial reports: status, error, error_type, duration_s. How a Ray worker and a warm
    worker (sweeper/warm_worker.py) run a trial. ``store``: what to commit through instead of the folder (a trial off
    the launching node: sweeper/remote_store.py)."""
    from .import_guard import for_precision

    spec = TrialSpec.from_dict(request["spec"])
    for_precision(spec.precision)  # before transformers is imported (a fresh process's first trial)
    import torch

    torch.set_num_threads(max(1, spec.cpus))
    if store is None:
        store = ResultsStore(request["store"], token=request.get("token"))
    row = run_trial(spec, store, attempt=request["attempt"], extra=request["extra"])
    return {"status": row["status"], "error": row["error"] or "", "error_type": row["error_type"] or "",
            "duration_s": row["duration_s"]}


def _benchmark(spec, loaded, store, lease):
    from .stages.benchmark import run_benchmark

    weight_bytes = next(m["value"] for m in loaded.metrics if m["metric"] == "weights_bytes")
    rows, facts = run_benchmark(loaded.model, loaded.tokenizer, spec.benchmark, loaded.device, spec.seed,
                                lease=lease, weight_bytes=weight_bytes,
                                no_graph_capture=precisions.get(spec.precision).no_graph_capture)
    return rows, facts, None


def _perplexity(spec, loaded, store, lease):
    from .stages.perplexity import token_perplexity

    return token_perplexity(loaded.model, loaded.tokenizer, spec.perplexity), {}, None


def _kl(spec, loaded, store, lease):
    """KL to the baseline: the baseline computes and stores the reference (once per identity), every trial compares."""
    from .errors import UserError
    from .stages import kl
    from .store import atomic_write_bytes

    ref_id = kl.reference_id(spec.baseline_spec(), settings=spec.kl)
    path = store.ref_path(ref_id)
    if not path.exists():
        # the same baseline cell in another study (a sibling results dir) already made this reference
        other = store.sibling_ref_path(ref_id)
        if other is not None:
            atomic_write_bytes(path, other.read_bytes())
    ref = None
    if path.exists():
        try:
            ref = kl.read_reference(path)
        except UserError as e:
            if not spec.is_baseline:  # a relaunch quarantines it and reruns the baseline (ResultsStore)
                raise StageError(f"the baseline's KL reference {ref_id} is damaged: {e}", "BaselineMissing") from None
    if ref is None:
        if not spec.is_baseline:
            # failing (not "done without KL") makes a relaunch redo the trial once the baseline has succeeded
            raise StageError(f"the baseline's KL reference {ref_id} does not exist: the baseline trial "
                             f"({spec.baseline_precision}/{spec.baseline_compute_dtype}) failed or has not run",
                             "BaselineMissing")
        kl.write_reference(path, kl.compute_reference(loaded.model, loaded.tokenizer, spec, settings=spec.kl))
        ref = kl.read_reference(path)
    return kl.kl_metrics(loaded.model, loaded.tokenizer, ref, spec), {"kl_reference_id": ref_id}, None


def _tasks(spec, loaded, store, lease):
    """lm-eval tasks on the model already in memory: one evaluation call for all of them."""
    from .stages.tasks import run_tasks

    # lm-eval's "auto" batch probes up to its default cap; on a GPU share its OOM comes at the share's cap already
    rows, samples, row_values = run_tasks(loaded.model, loaded.tokenizer, spec, loaded.device)
    return rows, row_values, samples


def _stages(spec: TrialSpec):
    """The stages after load that this trial has work for (the only place that decides it), in their usual order:
    (name, fn(spec, loaded, store, lease) -> (metrics, row updates, samples))."""
    stages = [("benchmark", _benchmark, spec.benchmark.enabled), ("perplexity", _perplexity, spec.perplexity is not None),
              ("kl", _kl, spec.kl is not None), ("tasks", _tasks, bool(spec.tasks))]
    return [(name, fn) for name, fn, has_work in stages if has_work]


def _ordered_stages(spec: TrialSpec, lease):
    """The stages, with the benchmark deferred while another trial on this device holds or waits for the timing lease.

    Packed trials that reach their benchmark together would otherwise idle in the lease's queue, one timed section
    after another; instead a trial whose benchmark cannot start at once runs its next untimed stage and asks again
    after it, and waits in the queue only when the benchmark is all it has left. What is measured does not change:
    the benchmark still times the same loaded model alone on the device, and its peak memory is its own region's.
    """
    pending = _stages(spec)
    ran_before = False
    while pending:
        name, fn = pending[0]
        if name == "benchmark" and lease is not None and len(pending) > 1 and not lease.try_reserve():
            pending[0], pending[1] = pending[1], pending[0]
            log.info("trial %s: another trial is timing on this device; %s first", spec.trial_id, pending[0][0])
            continue
        pending.pop(0)
        if name == "benchmark" and ran_before:
            gc.collect()  # what earlier stages left behind stays out of the benchmark's peak memory
        ran_before = True
        yield name, fn
