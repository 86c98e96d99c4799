"""A Ray worker hides hqq from transformers until a trial needs it (sweeper.import_guard): transformers then does not
import hqq (and through it torch's inductor) at start-up, and an hqq trial in the same process still quantizes."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("hqq")

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
    r = run(HIDDEN_THEN_NEEDED)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stdout + r.stderr[-3000:]


def test_without_the_guard_transformers_imports_hqq():
    """The control: the guard matters only while transformers imports hqq on its own (if this fails, it no longer
    does, and the guard can go)."""
    r = run(NOT_HIDDEN)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stdout + r.stderr[-3000:]
