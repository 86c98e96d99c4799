"""KL divergence to the baseline's reference and the prompt suite (sweeper/stages/kl.py), on real models, CPU."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sweeper import precisions
from sweeper.errors import UserError
from sweeper.stages import kl
from sweeper.store import ResultsStore
from sweeper.study import Model, Perplexity, Study
from sweeper.trials import expand

from conftest import build_tiny_llama

CATEGORIES = {"code", "math", "summarization", "question_answering", "creative_writing", "logical_reasoning",
              "translation", "sentiment", "information_extraction", "instruction_following", "common_sense",
              "domain_knowledge"}

# Small token set so each reference / metrics call takes about a second on CPU.
SMALL = kl.KLSettings(wiki_tokens=256, wiki_seq_len=128, prompt_max_tokens=48, continuation_tokens=8, gen_tokens=6,
                      max_prompts_per_category=2)


def _specs(model_dir: Path, wikitext: Path | None, name: str = "klstudy", tasks=()) -> dict[str, object]:
    study = Study(name=name, models=[Model(str(model_dir))], precisions=["fp32", "nf4"], compute_dtypes=["fp32"],
                  baseline="fp32", tasks=list(tasks),
                  perplexity=Perplexity(str(wikitext), context=128) if wikitext else None)
    trials, _ = expand(study)
    return {t.precision: t for t in trials}


def _load(model_dir: Path, precision: str = "fp32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = precisions.get(precision).from_pretrained_kwargs("fp32")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _by_key(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["stage"], r["task"], r["metric"]): r for r in rows}


@pytest.fixture(scope="module")
def wikitext(shared_data) -> Path:
    return shared_data / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def specs(real_model, wikitext):
    return _specs(real_model, wikitext)


@pytest.fixture(scope="module")
def base(real_model):
    return _load(real_model, "fp32")


@pytest.fixture(scope="module")
def quant(real_model):
    return _load(real_model, "nf4")


@pytest.fixture(scope="module")
def reference(base, specs):
    model, tok = base
    return kl.compute_reference(model, tok, specs["fp32"], settings=SMALL)


# --- the suite ---------------------------------------------------------------------------------------------------

def test_suite_has_12_categories_of_at_least_8_prompts():
    suite = kl.prompt_suite()
    cats: dict[str, int] = {}
    for p in suite:
        cats[p["category"]] = cats.get(p["category"], 0) + 1
        assert p["prompt"].strip() and p["id"].startswith(p["category"])
    assert set(cats) == CATEGORIES
    assert all(n >= 8 for n in cats.values()), cats
    assert len({p["id"] for p in suite}) == len(suite)
    assert len({p["prompt"] for p in suite}) == len(suite)


# --- the reference -----------------------------------------------------------------------------------------------

def test_reference_token_set(reference, base):
    _, tok = base
    meta = kl.reference_meta(reference)
    assert meta["mode"] == "exact" and meta["vocab_size"] == 4096  # llama-4m: vocab 4096 <= exact_max_vocab
    src = reference.column("source").to_pylist()
    wiki = [ids for s, ids in zip(src, reference.column("input_ids").to_pylist()) if s == "wikitext"]
    assert sum(len(x) for x in wiki) == SMALL.wiki_tokens and len(wiki) == 2
    # The WikiText part is the start of the file, token for token.
    text = (Path(kl.reference_meta(reference)["text_path"])).read_text(encoding="utf-8")
    decoded = tok.decode(wiki[0] + wiki[1])
    assert len(decoded) > 500 and text.startswith(decoded)
    cats = [c for s, c in zip(src, reference.column("category").to_pylist()) if s == "prompt"]
    assert set(cats) == CATEGORIES and len(cats) == 24
    n_pos = sum(len(x) for x in reference.column("input_ids").to_pylist())
    assert meta["n_positions"] == n_pos
    # Rows of log-probs are normalised distributions.
    lp = np.asarray(reference.column("logp")[0].as_py(), dtype=np.float64).reshape(-1, 4096)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)


def test_baseline_against_itself_is_zero(reference, base, specs):
    model, tok = base
    rows = kl.kl_metrics(model, tok, reference, specs["fp32"])
    r = _by_key(rows)
    n_pos = kl.reference_meta(reference)["n_positions"]
    assert abs(r[("kl", None, "kl_mean")]["value"]) <= 1e-6
    assert abs(r[("kl", None, "kl_p95")]["value"]) <= 1e-6
    assert abs(r[("kl", None, "kl_median")]["value"]) <= 1e-6
    assert r[("kl", None, "top1_agreement")]["value"] == 1.0
    assert r[("kl", None, "kl_mean")]["n"] == n_pos
    for cat in CATEGORIES:
        assert abs(r[("prompts", cat, "kl_mean")]["value"]) <= 1e-6
        sr = r[("prompts", cat, "success_rate")]
        assert sr["n"] == 2 and 0.0 <= sr["value"] <= 1.0
        gl = r[("prompts", cat, "avg_generated_tokens")]
        assert 0 < gl["value"] <= SMALL.gen_tokens
    assert all(row["trial_id"] == specs["fp32"].trial_id for row in rows)
    # The trained model writes text for these prompts: generation succeeds.
    assert np.mean([r[("prompts", c, "success_rate")]["value"] for c in CATEGORIES]) > 0.5


def test_nf4_has_positive_kl(reference, quant, specs):
    model, tok = quant
    r = _by_key(kl.kl_metrics(model, tok, reference, specs["nf4"]))
    mean = r[("kl", None, "kl_mean")]["value"]
    assert mean > 1e-3
    assert r[("kl", None, "kl_p95")]["value"] > r[("kl", None, "kl_median")]["value"] > 0
    assert 0.5 < r[("kl", None, "top1_agreement")]["value"] < 1.0
    assert r[("kl", None, "kl_mean")]["stderr"] > 0
    assert all(r[("prompts", c, "kl_mean")]["value"] > 0 for c in CATEGORIES)


def test_other_weights_have_large_kl(tmp_path, real_model):
    # Two random tiny Llamas with different seeds: the same architecture and tokenizer, unrelated weights.
    a = build_tiny_llama(tmp_path / "a", seed=0)
    b = build_tiny_llama(tmp_path / "b", seed=1)
    spec = _specs(a, None)["fp32"]
    settings = replace(SMALL, max_prompts_per_category=1)
    ma, tok = _load(a)
    mb, _ = _load(b)
    ref = kl.compute_reference(ma, tok, spec, settings=settings)
    assert set(ref.column("source").to_pylist()) == {"prompt"}  # no text file: prompts only
    same = _by_key(kl.kl_metrics(ma, tok, ref, spec))
    other = _by_key(kl.kl_metrics(mb, tok, ref, spec))
    assert abs(same[("kl", None, "kl_mean")]["value"]) <= 1e-6
    assert other[("kl", None, "kl_mean")]["value"] > 10 * 1e-3
    assert other[("kl", None, "top1_agreement")]["value"] < 1.0


def test_reference_round_trips_through_parquet(tmp_path, reference, quant, specs):
    model, tok = quant
    store = ResultsStore(tmp_path / "results")
    path = store.ref_path(kl.reference_id(specs["fp32"], settings=SMALL))
    kl.write_reference(path, reference)
    loaded = kl.read_reference(path)
    assert loaded.equals(reference)
    assert kl.reference_meta(loaded) == kl.reference_meta(reference)
    a = kl.kl_metrics(model, tok, reference, specs["nf4"])
    b = kl.kl_metrics(model, tok, loaded, specs["nf4"])
    assert a == b


def test_topk_estimate_is_within_its_bound(base, quant, specs):
    bmodel, tok = base
    qmodel, _ = quant
    exact_s = replace(SMALL, max_prompts_per_category=1)
    topk_s = replace(exact_s, exact_max_vocab=0, top_k=32)
    ref_exact = kl.compute_reference(bmodel, tok, specs["fp32"], settings=exact_s)
    ref_topk = kl.compute_reference(bmodel, tok, specs["fp32"], settings=topk_s)
    assert kl.reference_meta(ref_topk)["mode"] == "topk" and kl.reference_meta(ref_topk)["top_k"] == 32
    assert ref_topk.column("input_ids").to_pylist() == ref_exact.column("input_ids").to_pylist()

    e = kl.token_kl(qmodel, ref_exact)
    t = kl.token_kl(qmodel, ref_topk)
    gap = e.kl - t.kl
    # The top-k estimate is the KL of the coarse-grained distributions: a lower bound, short by at most the bound.
    assert (gap >= -1e-9).all()
    assert (gap <= t.error_bound + 1e-9).all()
    assert np.array_equal(e.top1, t.top1)
    assert (t.tail_mass > 0).all() and gap.max() > 0  # k=32 of 4096 leaves a tail: the test is not vacuous
    # Baseline against its own top-k reference: exactly zero, and a zero bound is not required (tail unknown).
    self_t = kl.token_kl(bmodel, ref_topk)
    assert np.abs(self_t.kl).max() <= 1e-9 and self_t.top1.all()
    r = _by_key(kl.kl_metrics(qmodel, tok, ref_topk, specs["nf4"]))
    assert r[("kl", None, "kl_error_bound")]["value"] == pytest.approx(t.error_bound.mean())
    assert r[("kl", None, "kl_tail_mass")]["value"] == pytest.approx(t.tail_mass.mean())


def test_reference_id_is_shared_across_studies_and_tracks_what_matters(real_model, wikitext, specs):
    other = _specs(real_model, wikitext, name="another-study", tasks=["piqa"])
    assert other["fp32"].trial_id != specs["fp32"].trial_id  # different tasks: different trial ...
    assert kl.reference_id(other["fp32"]) == kl.reference_id(specs["fp32"])  # ... same reference
    ids = {
        kl.reference_id(specs["fp32"]),
        kl.reference_id(specs["nf4"]),  # another cell
        kl.reference_id(specs["fp32"], text_path=None),  # another token set
        kl.reference_id(specs["fp32"], settings=replace(kl.DEFAULT_SETTINGS, top_k=64)),
    }
    assert len(ids) == 4


def test_reference_of_another_model_is_refused(tmp_path, reference, specs):
    tiny = build_tiny_llama(tmp_path / "t", seed=3)
    other_spec = _specs(tiny, None)["fp32"]
    model, tok = _load(tiny)
    with pytest.raises(UserError, match="was made for model"):
        kl.kl_metrics(model, tok, reference, other_spec)


def test_unreadable_reference_is_one_clear_error(tmp_path):
    bad = tmp_path / "refs" / "x.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet")
    with pytest.raises(UserError, match="unreadable"):
        kl.read_reference(bad)
    with pytest.raises(UserError, match="does not exist"):
        kl.read_reference(tmp_path / "refs" / "missing.parquet")
