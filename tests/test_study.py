"""Study validation and expansion rules (no Ray, no models)."""
from __future__ import annotations

import pytest

from sweeper import Benchmark, Model, Resources, Study, Task
from sweeper.errors import UserError
from sweeper.trials import expand


def test_three_line_study_has_defaults():
    s = Study(name="s", models=["org/m"], precisions=["fp16", "nf4"])
    assert s.compute_dtypes == ("fp16",) and s.tasks == () and s.baseline_cell() == ("fp16", "fp16")
    trials, dropped = expand(s)
    assert [(t.precision, t.compute_dtype) for t in trials] == [("fp16", "fp16"), ("nf4", "fp16")]
    assert dropped == []


def test_plain_dtype_is_one_trial_and_quantized_splits_by_compute_dtype():
    s = Study(name="s", models=["org/m"], precisions=["fp32", "fp16", "int8", "nf4", "fp4"],
              compute_dtypes=["fp32", "fp16"])
    trials, dropped = expand(s)
    cells = [(t.precision, t.compute_dtype) for t in trials]
    assert cells == [("fp32", "fp32"), ("fp16", "fp16"), ("int8", "fp32"), ("int8", "fp16"), ("nf4", "fp32"),
                     ("nf4", "fp16"), ("fp4", "fp32"), ("fp4", "fp16")]
    assert {(d.precision, d.compute_dtype) for d in dropped} == {("fp32", "fp16"), ("fp16", "fp32")}
    assert all("same trial" in d.reason for d in dropped)
    assert trials[0].is_baseline and all(t.baseline_id == trials[0].trial_id for t in trials)


def test_trial_id_is_stable_and_ignores_study_name():
    a, _ = expand(Study(name="a", models=["org/m"], precisions=["nf4"]))
    b, _ = expand(Study(name="b", models=["org/m"], precisions=["nf4", "int8"]))
    assert a[0].trial_id == b[0].trial_id  # same cell, same baseline: same trial in another study
    c, _ = expand(Study(name="c", models=["org/m"], precisions=["int8", "nf4"], kl=False))
    d, _ = expand(Study(name="d", models=["org/m"], precisions=["nf4"], kl=False))
    assert c[1].trial_id == d[0].trial_id  # without KL the baseline does not matter either
    c, _ = expand(Study(name="a", models=["org/m"], precisions=["nf4"], benchmark=Benchmark(new_tokens=5)))
    assert c[0].trial_id != a[0].trial_id
    d, _ = expand(Study(name="a", models=["org/m"], precisions=["nf4"], precision_options={"nf4": {"double_quant": True}}))
    assert d[0].trial_id != a[0].trial_id


def test_explicit_baseline_goes_first():
    s = Study(name="s", models=["org/m"], precisions=["nf4", "fp16"], compute_dtypes=["fp16", "bf16"], baseline="nf4/bf16")
    trials, _ = expand(s)
    assert (trials[0].precision, trials[0].compute_dtype) == ("nf4", "bf16") and trials[0].is_baseline


def test_spec_round_trips_through_dict():
    from sweeper.trials import TrialSpec

    s = Study(name="s", models=[Model("org/m", revision="abc")], precisions=["int8"], tasks=["piqa", Task("gsm8k", limit=5)])
    t = expand(s)[0][0]
    assert TrialSpec.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("kwargs, needle", [
    (dict(precisions=["int3"]), "unknown precision 'int3'; allowed: fp32"),
    (dict(compute_dtypes=["fp8"]), "unknown compute dtype 'fp8'"),
    (dict(precisions=[]), "study.precisions must be a non-empty list"),
    (dict(models=[]), "study.models must be a non-empty list"),
    (dict(precisions=["nf4", "nf4"]), "study.precisions has duplicates"),
    (dict(models=["a/m", "b/m"]), "share the label"),
    (dict(baseline="fp32"), "study.baseline 'fp32' names precision 'fp32', which is not in study.precisions"),
    (dict(resources=Resources(gpus_per_trial="auto"), precision_options={"nf4": {"bogus": 1}}), "unknown option(s) bogus"),
])
def test_bad_studies_raise_one_line(kwargs, needle):
    base = dict(name="s", models=["org/m"], precisions=["fp16", "nf4"])
    base.update(kwargs)
    with pytest.raises(UserError) as e:
        Study(**base)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("ctor, needle", [
    (lambda: Benchmark(batch_sizes=(0,)), "Benchmark.batch_sizes"),
    (lambda: Benchmark(repeats=0), "Benchmark.repeats"),
    (lambda: Resources(gpus_per_trial=1.5), "Resources.gpus_per_trial"),
    (lambda: Resources(cpus_per_trial=0), "Resources.cpus_per_trial"),
    (lambda: Task("piqa", limit=-1), "Task('piqa').limit"),
])
def test_bad_settings_raise(ctor, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ctor()


def test_baseline_is_part_of_the_identity_when_kl_is_on():
    a, _ = expand(Study(name="s", models=["org/m"], precisions=["fp32", "fp16", "nf4"]))
    b, _ = expand(Study(name="s", models=["org/m"], precisions=["fp32", "fp16", "nf4"], baseline="fp16"))
    assert {t.trial_id for t in a}.isdisjoint({t.trial_id for t in b})  # KL against another baseline: new numbers
    c, _ = expand(Study(name="s", models=["org/m"], precisions=["fp32", "fp16", "nf4"], kl=False))
    d, _ = expand(Study(name="s", models=["org/m"], precisions=["fp32", "fp16", "nf4"], kl=False, baseline="fp16"))
    assert {t.trial_id for t in c} == {t.trial_id for t in d}  # without KL the baseline changes no number


def test_only_keeps_the_baseline_kl_needs():
    from sweeper.launch import narrow, parse_only

    trials, _ = expand(Study(name="s", models=["org/m"], precisions=["fp32", "int8", "nf4"]))
    kept = narrow(trials, parse_only(("precision=nf4",)))
    assert [t.precision for t in kept] == ["fp32", "nf4"]
    no_kl, _ = expand(Study(name="s", models=["org/m"], precisions=["fp32", "int8", "nf4"], kl=False))
    assert [t.precision for t in narrow(no_kl, parse_only(("precision=nf4",)))] == ["nf4"]


def test_local_model_fingerprint_follows_weights_and_tokenizer(tmp_path):
    import os

    from sweeper.trials import model_fingerprint

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 10)
    (d / "tokenizer.json").write_text("{}")
    m = Model(str(d))
    first = model_fingerprint(m)
    os.utime(d / "model.safetensors", ns=(1, 1))  # same size, rewritten weights
    second = model_fingerprint(m)
    (d / "tokenizer.json").write_text('{"a": 1}')
    assert len({first, second, model_fingerprint(m)}) == 3
