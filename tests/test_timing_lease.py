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
