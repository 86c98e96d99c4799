"""Property-based tests of study validation and expansion (hypothesis)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sweeper import Benchmark, Resources, Study
from sweeper.errors import UserError
from sweeper.precisions import COMPUTE_DTYPES, REGISTRY
from sweeper.trials import expand

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
model_ids = st.lists(st.from_regex(r"org/m[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=3, unique=True)
precision_lists = st.lists(st.sampled_from(list(REGISTRY)), min_size=1, max_size=len(REGISTRY), unique=True)
dtype_lists = st.lists(st.sampled_from(COMPUTE_DTYPES), min_size=1, max_size=3, unique=True)


@settings(max_examples=150, deadline=None)
@given(names, model_ids, precision_lists, dtype_lists)
def test_valid_studies_expand_by_the_documented_rules(name, models, precisions, dtypes):
    study = Study(name=name, models=models, precisions=precisions, compute_dtypes=dtypes)
    trials, dropped = expand(study)
    per_model = sum(len(dtypes) if REGISTRY[p].compute_dtype_matters else 1 for p in precisions)
    assert len(trials) == per_model * len(models)
    assert len(trials) + len(dropped) == len(models) * len(precisions) * len(dtypes)
    assert len({t.trial_id for t in trials}) == len(trials)  # no duplicate cells
    for m in study.models:
        mine = [t for t in trials if t.model == m]
        assert mine[0].is_baseline and sum(t.is_baseline for t in mine) == 1  # baseline first, exactly once
        assert all(t.baseline_id == mine[0].trial_id for t in mine)
    assert [t.trial_id for t in expand(study)[0]] == [t.trial_id for t in trials]  # stable


junk = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FIELDS = ["name", "models", "precisions", "compute_dtypes", "tasks", "baseline", "benchmark", "perplexity",
          "resources", "precision_options", "num_fewshot", "limit", "eval_batch_size", "seed", "kl", "description"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS), junk)
def test_any_bad_field_is_a_one_line_user_error(field, value):
    kwargs = dict(name="s", models=["org/m"], precisions=["fp16", "nf4"])
    kwargs[field] = value
    try:
        Study(**kwargs)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        # the message names what was wrong: the field, or the bad value itself
        assert field.rstrip("s") in msg or "study." in msg or "precision" in msg or repr(value)[:10] in msg, msg
    # some junk values are valid (e.g. seed=3, description="x"): constructing is then fine


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["prompt_tokens", "new_tokens", "repeats", "warmup", "batch_sizes"]),
                       st.one_of(st.integers(-3, 3), st.lists(st.integers(-1, 3), max_size=3), st.text(max_size=2)),
                       max_size=3))
def test_benchmark_settings_validate(values):
    try:
        b = Benchmark(**values)
    except UserError as e:
        assert "Benchmark." in str(e) and "\n" not in str(e)
    else:
        assert b.prompt_tokens >= 1 and b.repeats >= 1 and b.warmup >= 0 and all(x >= 1 for x in b.batch_sizes)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.floats(-2, 10), st.text(max_size=4), st.integers(-2, 10)))
def test_gpu_share_validates(g):
    try:
        r = Resources(gpus_per_trial=g)
    except UserError as e:
        assert "Resources.gpus_per_trial" in str(e)
    else:
        assert r.gpus_per_trial == "auto" or 0 < r.gpus_per_trial <= 8
