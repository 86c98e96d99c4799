"""The timing lease: exclusive timed sections, shared forwards, no lock left held by a failing forward."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sweeper.timing_lease import TimingLease

HOLD_EXCLUSIVE = textwrap.dedent("""
    import sys, time
    from sweeper.timing_lease import TimingLease
    lease = TimingLease("cpu", lock_dir=sys.argv[1])
    t0 = time.perf_counter()
    with lease.exclusive():
        print(f"acquired {time.perf_counter() - t0:.3f}", flush=True)
        time.sleep(float(sys.argv[2]))
""")


# a neighbour queued for its timed section (it holds the timing queue, not yet the device)
HOLD_QUEUE = textwrap.dedent("""
    import sys, time
    from sweeper.timing_lease import TimingLease
    lease = TimingLease("cpu", lock_dir=sys.argv[1])
    assert lease.try_reserve()
    print("reserved", flush=True)
    time.sleep(float(sys.argv[2]))
""")


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("out of memory (simulated by the test)")


def _exclusive_in_child(lock_dir, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD_EXCLUSIVE, str(lock_dir), str(hold)], stdout=subprocess.PIPE,
                            text=True)


def test_a_forward_that_raises_releases_the_shared_side(tmp_path):
    lease = TimingLease("cpu", lock_dir=str(tmp_path))
    model = Boom()
    lease.guard_forwards(model)
    with pytest.raises(RuntimeError):
        model(torch.zeros(1))  # caught by its caller, as lm-eval's batch-size probe does
    child = _exclusive_in_child(tmp_path, 0)
    out, _ = child.communicate(timeout=20)  # before the fix this waited forever
    assert child.returncode == 0 and float(out.split()[1]) < 5
    lease.close()


def test_forwards_wait_while_a_neighbour_times(tmp_path):
    child = _exclusive_in_child(tmp_path, 1.5)
    assert child.stdout.readline().startswith("acquired")
    lease = TimingLease("cpu", lock_dir=str(tmp_path))
    model = torch.nn.Linear(2, 2)
    lease.guard_forwards(model)
    t0 = time.perf_counter()
    model(torch.zeros(1, 2))  # waits for the neighbour's timed section to end
    waited = time.perf_counter() - t0
    child.wait(timeout=20)
    assert waited > 0.8, waited
    t0 = time.perf_counter()
    model(torch.zeros(1, 2))  # nobody timing: no wait
    assert time.perf_counter() - t0 < 0.5
    lease.close()


def test_try_reserve_says_whether_another_trial_is_timing(tmp_path):
    lease = TimingLease("cpu", lock_dir=str(tmp_path))
    child = _exclusive_in_child(tmp_path, 1.5)
    assert child.stdout.readline().startswith("acquired")
    t0 = time.perf_counter()
    assert not lease.try_reserve()  # a neighbour is timing: told at once, not made to wait
    assert time.perf_counter() - t0 < 0.5
    child.wait(timeout=20)
    assert lease.try_reserve()
    # holding the queue: a neighbour's timed section waits for ours
    other = _exclusive_in_child(tmp_path, 0)
    time.sleep(0.5)
    assert other.poll() is None
    with lease.exclusive() as waited:
        assert waited < 0.5
    out, _ = other.communicate(timeout=20)  # released with our timed section
    assert other.returncode == 0 and out.startswith("acquired")
    lease.close()


def _trial_spec(model_dir, wikitext):
    from sweeper.study import Benchmark, Model, Perplexity, Study
    from sweeper.trials import expand

    study = Study(name="defer", models=[Model(str(model_dir))], precisions=["fp32"], compute_dtypes=["fp32"],
                  baseline="fp32", kl=False,
                  benchmark=Benchmark(prompt_tokens=8, new_tokens=4, batch_sizes=(1,), repeats=2, warmup=0,
                                      graph_decode=False),
                  perplexity=Perplexity(str(wikitext), context=64, max_tokens=256))
    return expand(study)[0][0]


def test_a_trial_defers_its_benchmark_while_a_neighbour_times(tmp_path, tiny_model, shared_data, monkeypatch):
    from sweeper.runner import run_trial
    from sweeper.store import ResultsStore

    locks = tmp_path / "locks"
    monkeypatch.setenv("SWEEPER_LOCK_DIR", str(locks))
    spec = _trial_spec(tiny_model, shared_data / "wikitext-2" / "test.txt")
    # alone: the usual order, no wait
    alone = run_trial(spec, ResultsStore(tmp_path / "alone"), device="cpu")
    assert alone["status"] == "done" and alone["stage_order"] == "load,benchmark,perplexity"
    # a neighbour on the same device is queued to time: perplexity runs first, the benchmark after it
    child = subprocess.Popen([sys.executable, "-c", HOLD_QUEUE, str(locks), "3"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("reserved")
    t0 = time.perf_counter()
    row = run_trial(spec, ResultsStore(tmp_path / "packed"), device="cpu")
    child.wait(timeout=30)
    assert time.perf_counter() - t0 > 2.5 or row["timing_wait_s"] > 0  # the benchmark did wait for the neighbour
    assert row["status"] == "done", row["error"]
    assert row["stage_order"] == "load,perplexity,benchmark"
    assert row["timing_exclusive"] and row["stage_benchmark_s"] > 0 and row["stage_perplexity_s"] > 0
    import pyarrow.parquet as pq

    metrics = {m["metric"] for m in pq.read_table(ResultsStore(tmp_path / "packed").metrics_path(spec.trial_id)).to_pylist()}
    assert {"decode_tok_s", "prefill_ms", "token_perplexity"} <= metrics
