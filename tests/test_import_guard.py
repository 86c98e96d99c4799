"""sweeper.import_guard: a Ray worker hides hqq from transformers until a trial needs it (transformers then does not
import hqq, and through it torch's inductor, at start-up; an hqq trial in the same process still quantizes), and
bitsandbytes is imported with its module-level torch.compile calls deferred to their first call."""
from __future__ import annotations

import subprocess
import sys

import pytest

HIDDEN_THEN_NEEDED = """
import sys
import torch
from sweeper import precisions
from sweeper.import_guard import for_precision
for_precision("fp16")  # the worker's first trial: hqq hidden
from transformers import AutoModelForCausalLM, LlamaConfig
import transformers.cache_utils
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=128)
model = AutoModelForCausalLM.from_config(cfg)
model(torch.tensor([[1, 2, 3]]))
assert sys.modules["hqq"] is None and "hqq.core.quantize" not in sys.modules, "hqq was imported while hidden"
for_precision("hqq4")  # the same worker's next trial
precisions.get("hqq4")  # the trial's own check finds hqq installed
from sweeper.quantize.hqq import quantize_model
quantize_model(model, 4, 64, torch.float32, "cpu")
for_precision("fp16")  # a later fp16 trial leaves the imported hqq alone
assert sys.modules["hqq"] is not None
assert type(model.model.layers[0].mlp.up_proj).__name__ == "HQQLinear"
print(float(model(torch.tensor([[1, 2, 3]])).logits.abs().sum()) > 0)
"""

NOT_HIDDEN = """
import sys
import transformers.cache_utils
print("hqq.core.quantize" in sys.modules)
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_hidden_hqq_is_not_imported_and_shows_again_for_a_trial_that_needs_it():
    pytest.importorskip("hqq")
    r = run(HIDDEN_THEN_NEEDED)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stdout + r.stderr[-3000:]


def test_without_the_guard_transformers_imports_hqq():
    """The control: the guard matters only while transformers imports hqq on its own (if this fails, it no longer
    does, and the guard can go)."""
    pytest.importorskip("hqq")
    r = run(NOT_HIDDEN)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stdout + r.stderr[-3000:]


BNB_DEFERRED = """
import sys, torch
from sweeper.import_guard import for_precision, import_precision_library
for_precision("nf4")  # a worker: hqq hidden, so transformers itself does not import the inductor
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
real_compile = torch.compile
seconds = import_precision_library("bitsandbytes")
assert seconds > 0 and import_precision_library("bitsandbytes") == 0.0
assert torch.compile is real_compile, "torch.compile was not restored"
print("inductor", "torch._inductor.compile_fx" in sys.modules)
"""

BNB_PLAIN = """
import sys
from sweeper.import_guard import for_precision
for_precision("nf4")
from transformers import AutoModelForCausalLM
import bitsandbytes
print("inductor", "torch._inductor.compile_fx" in sys.modules)
"""


def test_bitsandbytes_is_imported_without_compiling_machinery():
    r = run(BNB_DEFERRED)
    assert r.returncode == 0 and r.stdout.strip().endswith("inductor False"), r.stdout + r.stderr[-3000:]
    control = run(BNB_PLAIN)  # a plain import does pull in torch's inductor (else the deferral has nothing to do)
    assert control.returncode == 0 and control.stdout.strip().endswith("inductor True"), control.stdout + control.stderr[-3000:]


def test_deferred_compile_compiles_on_first_call_and_falls_back_when_compile_refuses():
    import torch

    from sweeper.import_guard import deferred_compile

    calls = []
    real = torch.compile
    try:
        torch.compile = lambda fn, **kw: calls.append(kw) or (lambda *a: ("compiled", fn(*a)))
        with deferred_compile():
            f = torch.compile(lambda x: x + 1, dynamic=False)
            g = torch.compile(dynamic=True)(lambda x: x * 2)
        assert calls == [] and torch.compile is not real  # nothing compiled at decoration; our fake restored
        assert f(1) == ("compiled", 2) and g(3) == ("compiled", 6) and f(2) == ("compiled", 3)
        assert calls == [{"dynamic": False}, {"dynamic": True}]  # once per function, with its arguments

        # another thread, and a module, get the real torch.compile even while the deferral is active
        import threading

        calls.clear()
        module = torch.nn.Linear(2, 2)
        with deferred_compile():
            from_thread = []
            th = threading.Thread(target=lambda: from_thread.append(torch.compile(lambda x: x * 3)))
            th.start()
            th.join()
            compiled_module = torch.compile(module)
        assert len(calls) == 2 and from_thread[0](2) == ("compiled", 6) and compiled_module(torch.ones(2))[0] == "compiled"

        def refuse(fn, **kw):
            raise RuntimeError("torch.compile is not supported here")

        torch.compile = refuse
        with deferred_compile():
            h = torch.compile(lambda x: x - 1)
        assert h(5) == 4 and h(6) == 5  # the plain function, as bitsandbytes' own fallback does
    finally:
        torch.compile = real


def test_deferral_only_for_known_bitsandbytes_versions(monkeypatch):
    import importlib.metadata

    from sweeper import import_guard

    for version, defer in (("0.48.0", True), ("0.50.2", True), ("0.51.0", False), ("1.0.0", False)):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
        assert import_guard._may_defer("bitsandbytes") is defer, version
    assert import_guard._may_defer("torchao") is False


SAME_LOGITS = """
import sys, torch
from sweeper.import_guard import import_precision_library
if sys.argv[1] == "deferred":
    assert import_precision_library("bitsandbytes") > 0
else:
    import bitsandbytes
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=128)
AutoModelForCausalLM.from_config(cfg).save_pretrained(sys.argv[2])
out = []
for qc in (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
           BitsAndBytesConfig(load_in_8bit=True)):
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2], quantization_config=qc, dtype=torch.float32)
    with torch.inference_mode():
        out.append(m(torch.tensor([[1, 2, 3, 4, 5]])).logits)
torch.save(out, sys.argv[3])
"""


def test_deferred_and_plain_bitsandbytes_give_the_same_logits(tmp_path):
    import torch

    runs = {}
    for how in ("deferred", "plain"):
        r = subprocess.run([sys.executable, "-c", SAME_LOGITS, how, str(tmp_path / f"m-{how}"),
                            str(tmp_path / f"{how}.pt")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[how] = torch.load(tmp_path / f"{how}.pt")
    assert all(torch.equal(a, b) for a, b in zip(runs["deferred"], runs["plain"]))
