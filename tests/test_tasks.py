"""Tasks stage: lm-eval tasks on an in-memory model with offline task data (real lm-eval, real data, CPU)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import FULL
from sweeper.errors import UserError
from sweeper.study import Study, Task
from sweeper.taskdata import data_fingerprint, family_for, prepare_dataset, wikitext_pages
from sweeper.trials import expand

TASKS_DATA = Path(__file__).parent / "data" / "tasks"
ARC_TEST = TASKS_DATA / "arc" / "ARC-Easy-Test.jsonl"
ARC_TRAIN = TASKS_DATA / "arc" / "ARC-Easy-Train.jsonl"


@pytest.fixture(autouse=True)
def _taskdata_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SWEEPER_TASKDATA_CACHE", str(tmp_path_factory.getbasetemp() / "taskdata-cache"))


def _spec(model_dir: Path, tasks, **study_kw):
    study = Study(name="tasks-test", models=[str(model_dir)], precisions=["fp32"], tasks=tasks, kl=False, **study_kw)
    return expand(study)[0][0]


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def _rows(rows, task):
    return {r["metric"]: r for r in rows if r["task"] == task}


# ---------------------------------------------------------------------------------------------------- run_tasks
def test_run_tasks_piqa_gsm8k_arc_on_local_data(tiny_model, shared_data):
    from sweeper.stages.tasks import run_tasks

    model, tok = _load(tiny_model)
    spec = _spec(tiny_model, [
        Task("piqa", data=str(shared_data / "piqa" / "valid.jsonl"), limit=5),
        Task("gsm8k", data=str(shared_data / "gsm8k" / "test.jsonl"), num_fewshot=0, limit=2),
        Task("arc_easy", data={"test": str(ARC_TEST), "train": str(ARC_TRAIN)}, num_fewshot=2),  # all 8 items
    ], eval_batch_size="auto", seed=3)
    rows, samples, _ = run_tasks(model, tok, spec, "cpu", max_batch_size=4)

    assert {r["stage"] for r in rows} == {"tasks"} and {r["trial_id"] for r in rows} == {spec.trial_id}
    piqa, gsm, arc = _rows(rows, "piqa"), _rows(rows, "gsm8k"), _rows(rows, "arc_easy")
    assert set(piqa) == {"acc", "acc_norm"} and set(arc) == {"acc", "acc_norm"}
    assert set(gsm) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    for r, n in [*((r, 5) for r in piqa.values()), *((r, 2) for r in gsm.values()), *((r, 8) for r in arc.values())]:
        assert r["n"] == n and 0.0 <= r["value"] <= 1.0
        assert r["stderr"] is not None and r["stderr"] >= 0.0

    import polars as pl

    df = pl.from_arrow(samples)
    assert set(df["trial_id"]) == {spec.trial_id}
    for task, metric, limit in [("piqa", "acc", 5), ("piqa", "acc_norm", 5), ("arc_easy", "acc", 8), ("gsm8k", "exact_match", 2)]:
        sub = df.filter((pl.col("task") == task) & (pl.col("metric") == metric))
        if task == "gsm8k":
            sub = sub.filter(pl.col("filter") == "strict-match")
        assert sub.height == limit, (task, metric)
        assert sorted(sub["doc_id"].to_list()) == list(range(limit))  # per-task limits take the first items
        # the per-item records reproduce the aggregate lm-eval reports (paired statistics rest on this)
        key = metric if task != "gsm8k" else "exact_match,strict-match"
        assert sub["value"].mean() == pytest.approx(_rows(rows, task)[key]["value"])
        assert sub["correct"].to_list() == [v == 1.0 for v in sub["value"].to_list()]
    mc = df.filter(pl.col("task").is_in(["piqa", "arc_easy"]))
    assert mc["gold_loglik"].null_count() == 0 and (mc["gold_loglik"] < 0).all()
    assert df.filter(pl.col("task") == "gsm8k")["gold_loglik"].null_count() == 4  # generation: no gold log-likelihood
    assert set(df.filter(pl.col("task") == "gsm8k")["filter"]) == {"strict-match", "flexible-extract"}


def test_wikitext_word_byte_perplexity_and_hellaswag(tiny_model, shared_data):
    from sweeper.stages.tasks import run_tasks

    model, tok = _load(tiny_model)
    test_txt = shared_data / "wikitext-2" / "test.txt"
    spec = _spec(tiny_model, [
        Task("wikitext", data=str(test_txt)),
        Task("hellaswag", data=str(TASKS_DATA / "hellaswag" / "hellaswag_val.jsonl")),
    ], limit=2, eval_batch_size=4)
    rows, samples, _ = run_tasks(model, tok, spec, "cpu")
    wt = _rows(rows, "wikitext")
    assert set(wt) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(r["n"] == 2 and r["stderr"] is None for r in wt.values())  # lm-eval reports no stderr for these
    hs = _rows(rows, "hellaswag")
    assert set(hs) == {"acc", "acc_norm"} and hs["acc"]["n"] == 2

    # lm-eval's definitions, recomputed from the per-document records and the pages themselves
    import polars as pl

    df = pl.from_arrow(samples).filter(pl.col("task") == "wikitext")
    pages = wikitext_pages(test_txt.read_text(encoding="utf-8").split("\n"))[:2]
    words = [len(re.split(r"\s+", p)) for p in pages]
    nbytes = [len(p.encode("utf-8")) for p in pages]
    wp = df.filter(pl.col("metric") == "word_perplexity").sort("doc_id")
    bp = df.filter(pl.col("metric") == "bits_per_byte").sort("doc_id")
    assert wp["weight"].to_list() == words and bp["weight"].to_list() == nbytes
    ll = wp["value"].to_list()
    assert wp["gold_loglik"].to_list() == ll and all(x < 0 for x in ll)
    assert wt["word_perplexity"]["value"] == pytest.approx(math.exp(-sum(ll) / sum(words)))
    assert wt["byte_perplexity"]["value"] == pytest.approx(math.exp(-sum(ll) / sum(nbytes)))
    assert wt["bits_per_byte"]["value"] == pytest.approx(-sum(ll) / sum(nbytes) / math.log(2))


def test_mmlu_group_from_hendrycks_csv(tiny_model, tmp_path):
    """All 57 subjects (hendrycks/test layout; the anatomy items reused per subject), grouped as lm-eval groups them."""
    from sweeper.stages.tasks import run_tasks, task_manager

    subjects = sorted(n[len("mmlu_"):] for n in task_manager().task_index["mmlu_stem_tasks"].tags
                      | task_manager().task_index["mmlu_humanities_tasks"].tags
                      | task_manager().task_index["mmlu_other_tasks"].tags
                      | task_manager().task_index["mmlu_social_sciences_tasks"].tags)
    assert len(subjects) == 57
    for split in ("test", "dev"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for s in subjects:
            shutil.copy(TASKS_DATA / "mmlu" / split / f"anatomy_{split}.csv", tmp_path / "data" / split / f"{s}_{split}.csv")
    model, tok = _load(tiny_model)
    spec = _spec(tiny_model, [Task("mmlu", data=str(tmp_path / "data"), num_fewshot=1, limit=1)], eval_batch_size=8)
    rows, samples, row_values = run_tasks(model, tok, spec, "cpu")
    by_task = {r["task"]: r for r in rows if r["metric"] == "acc"}
    index = task_manager().task_index
    # lm-eval's group structure is recorded for the trial row; from it every subject and subgroup belongs to mmlu
    from sweeper.results import _tops_of

    groups = row_values["task_groups"]
    assert sorted(groups["mmlu"]) == ["mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem"]
    tops = _tops_of(groups, {r["task"] for r in rows})
    assert set(tops) == set(by_task) - {"mmlu"} and set(tops.values()) == {"mmlu"}
    assert by_task["mmlu"]["n"] == 57
    for group in ("mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences"):
        assert by_task[group]["n"] == len(index[f"{group}_tasks"].tags), group
    assert by_task["mmlu_anatomy"]["n"] == 1
    assert samples.num_rows == 57 and set(samples.column("doc_id").to_pylist()) == {0}
    assert len(set(samples.column("task").to_pylist())) == 57
    # the subject's description is part of each prompt (lm-eval's YAML), so the same item reads differently per subject
    assert len(set(samples.column("prompt_hash").to_pylist())) == 57


# ---------------------------------------------------------------------------------------------------- validation
def test_validate_unknown_task_names_close_ones():
    from sweeper.stages.tasks import validate_tasks

    with pytest.raises(UserError) as e:
        validate_tasks((Task("arc_easyy"),))
    msg = str(e.value)
    assert "\n" not in msg and "'arc_easyy'" in msg and "arc_easy" in msg.split("close names:")[1]


def test_validate_missing_and_malformed_files(tmp_path, shared_data):
    from sweeper.stages.tasks import validate_tasks

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as e:
        validate_tasks((Task("arc_easy", data=str(missing)),))
    assert str(missing) in str(e.value) and "expected ARC jsonl" in str(e.value) and "\n" not in str(e.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(UserError) as e:
        validate_tasks((Task("gsm8k", data=str(bad), num_fewshot=0),))
    assert f"{bad} line 2 is not JSON" in str(e.value) and "GSM8K jsonl" in str(e.value) and "\n" not in str(e.value)

    wrong_cols = tmp_path / "arc.jsonl"
    wrong_cols.write_text(json.dumps({"stem": "x"}) + "\n")
    with pytest.raises(UserError, match=r"arc\.jsonl row 1 lacks question, choices"):
        validate_tasks((Task("arc_easy", data=str(wrong_cols)),))

    # PIQA without its labels file next to it
    (tmp_path / "valid.jsonl").write_text((shared_data / "piqa" / "valid.jsonl").read_text())
    with pytest.raises(UserError, match=r"valid-labels\.lst is missing"):
        validate_tasks((Task("piqa", data=str(tmp_path / "valid.jsonl")),))

    with pytest.raises(UserError, match=r"lacks .*_test\.csv"):
        validate_tasks((Task("mmlu", data=str(TASKS_DATA / "mmlu")),))


def test_validate_splits_and_fewshot_sources(shared_data):
    from sweeper.stages.tasks import validate_tasks

    gsm = str(shared_data / "gsm8k" / "test.jsonl")
    with pytest.raises(UserError, match=r"gsm8k' uses 5 few-shot examples from split 'train'"):
        validate_tasks((Task("gsm8k", data=gsm),))  # the YAML's default is 5-shot from train
    with pytest.raises(UserError, match=r"'arc_easy' uses 3 few-shot examples from split 'train'"):
        validate_tasks((Task("arc_easy", data=str(ARC_TEST)),), num_fewshot=3)
    with pytest.raises(UserError, match=r"names split\(s\) 'dev'"):
        validate_tasks((Task("arc_easy", data={"test": str(ARC_TEST), "dev": str(ARC_TRAIN)}),))
    with pytest.raises(UserError, match=r"evaluates split 'test'"):
        validate_tasks((Task("arc_easy", data={"train": str(ARC_TRAIN)}),))
    with pytest.raises(UserError, match=r"is an lm-eval tag"):
        validate_tasks((Task("ai2_arc", data=str(ARC_TEST)),))
    validate_tasks((Task("gsm8k", data=gsm, num_fewshot=0), Task("arc_easy", data={"test": str(ARC_TEST), "train": str(ARC_TRAIN)})))


# ---------------------------------------------------------------------------------------------------- converters
def test_converters_read_published_formats(tmp_path, shared_data):
    import datasets

    # ARC: AI2's jsonl and the hub's columns give the same rows
    fam = family_for("allenai/ai2_arc")
    hub = tmp_path / "arc_hub.jsonl"
    with hub.open("w") as fh:
        for line in ARC_TEST.read_text().splitlines():
            r = json.loads(line)
            fh.write(json.dumps({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                                             "label": [c["label"] for c in r["question"]["choices"]]}}) + "\n")
    a = prepare_dataset(fam, {"test": ARC_TEST}, ["ARC-Easy"], root=tmp_path / "c")
    b = prepare_dataset(fam, {"test": hub}, ["ARC-Easy"], root=tmp_path / "c")
    assert a != b and (a / "ARC-Easy" / "test.jsonl").read_text() == (b / "ARC-Easy" / "test.jsonl").read_text()
    ds = datasets.load_dataset(str(a), "ARC-Easy")["test"]
    assert ds[6]["choices"]["label"] == ["1", "2", "3", "4"] and ds[6]["answerKey"] == "1"

    # PIQA: labels come from the aligned -labels.lst line
    p = prepare_dataset(family_for("baber/piqa"), {"validation": shared_data / "piqa" / "valid.jsonl"}, [None],
                        root=tmp_path / "c")
    ds = datasets.load_dataset(str(p))["validation"]
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    assert len(ds) == (1838 if FULL else 200) == len(labels) and [str(x) for x in ds["label"][:50]] == labels[:50]
    assert ds[0]["goal"] == json.loads((shared_data / "piqa" / "valid.jsonl").read_text().splitlines()[0])["goal"]

    # WikiText line files -> one document per article, as EleutherAI/wikitext_document_level has (62 test, 60 valid;
    # demo/data ships the first 10 and 4)
    for split, n in ((("test", 62), ("valid", 60)) if FULL else (("test", 10), ("valid", 4))):
        pages = wikitext_pages((shared_data / "wikitext-2" / f"{split}.txt").read_text().split("\n"))
        assert len(pages) == n and pages[0].startswith(" = ") and all(re.match(r"^ = [^=]", pg) for pg in pages)

    # the cache key follows the content: same files, same folder; the fingerprint sees the side labels file
    again = prepare_dataset(family_for("baber/piqa"), {"validation": shared_data / "piqa" / "valid.jsonl"}, [None],
                            root=tmp_path / "c")
    assert again == p
    copy = tmp_path / "piqa-copy"
    copy.mkdir()
    for f in ("valid.jsonl", "valid-labels.lst"):
        (copy / f).write_bytes((shared_data / "piqa" / f).read_bytes())
    before = data_fingerprint(str(copy / "valid.jsonl"))
    (copy / "valid-labels.lst").write_text("\n".join(["1" if x == "0" else "0" for x in labels]) + "\n")
    assert data_fingerprint(str(copy / "valid.jsonl")) != before  # only the labels file changed
