"""Faithfulness: the tasks stage reports exactly the numbers lm-eval itself prints for the same model and data.

One side is the trial's path: the real model loaded with the nf4 precision's ``from_pretrained`` kwargs, tasks pointed
at the published files through ``Task(data=...)``, and :func:`run_tasks`. The other side is plain lm-eval as a user
runs it: ``simple_evaluate(model="hf", model_args={"pretrained": <folder>})`` with task YAMLs that ``include`` the
built-in ones and read JSON files the test writes itself from the same published files (independently of
sweeper.taskdata).

lm-eval 0.4.13 cannot pass bitsandbytes arguments through ``model_args`` on transformers 5 (``load_in_4bit=True`` is
rejected by ``from_pretrained`` and a ``quantization_config`` argument collides with HFLM's own), so its "same
quantization" is the nf4 checkpoint saved from the trial's model: HFLM reads the BitsAndBytesConfig from that folder's
config.json and loads the same packed 4-bit weights and absmax values.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sweeper import precisions
from sweeper.study import Study, Task
from sweeper.taskdata import wikitext_pages
from sweeper.trials import expand

TASKS_DATA = Path(__file__).parent / "data" / "tasks"
SEED = 1234
LIMIT = 6
BATCH = 4


def _write_jsonl(path: Path, rows) -> Path:
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def _hub_format_files(shared_data: Path, out: Path) -> dict[str, dict[str, Path]]:
    """The three tasks' data in the hub datasets' columns, written straight from the published files."""
    piqa_rows = [json.loads(x) for x in (shared_data / "piqa" / "valid.jsonl").read_text().splitlines()]
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    piqa = _write_jsonl(out / "piqa_validation.jsonl", [{**r, "label": int(lab)} for r, lab in zip(piqa_rows, labels)])

    def arc(src: Path, dst: Path) -> Path:
        rows = []
        for line in src.read_text().splitlines():
            r = json.loads(line)
            ch = r["question"]["choices"]
            rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                         "choices": {"text": [c["text"] for c in ch], "label": [c["label"] for c in ch]}})
        return _write_jsonl(dst, rows)

    pages = wikitext_pages((shared_data / "wikitext-2" / "test.txt").read_text().split("\n"))
    return {
        "piqa": {"validation": piqa},
        "arc_easy": {"test": arc(TASKS_DATA / "arc" / "ARC-Easy-Test.jsonl", out / "arc_test.jsonl"),
                     "train": arc(TASKS_DATA / "arc" / "ARC-Easy-Train.jsonl", out / "arc_train.jsonl")},
        "wikitext": {"test": _write_jsonl(out / "wikitext_test.jsonl", [{"page": p} for p in pages])},
    }


def _include_yamls(files: dict[str, dict[str, Path]], folder: Path) -> Path:
    """lm-eval task YAMLs overriding the built-ins' dataset with local JSON (lm-eval's documented include mechanism)."""
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks"
    specs = {
        "piqa": ("piqa/piqa.yaml", {"training_split": None}),
        "arc_easy": ("arc/arc_easy.yaml", {"validation_split": None, "num_fewshot": 2}),
        "wikitext": ("wikitext/wikitext.yaml", {"training_split": None, "validation_split": None}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for task, (base, extra) in specs.items():
        doc = {"include": str(builtin / base), "task": task, "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {k: str(v) for k, v in files[task].items()}}, **extra}
        (folder / f"{task}.yaml").write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return folder


# Two evaluation calls per side: multiple-choice tasks together, the rolling-loglikelihood task alone.
# Plain lm-eval "hf" cannot quantize on load on transformers 5 (see the module docstring), so its nf4 model is the
# checkpoint saved from the trial's model and reloaded. On CPU that reloaded bitsandbytes 4-bit model is not
# numerically the model quantized in memory: per-item log-likelihoods of batched multiple-choice requests differ for
# a few items (the task metrics still agree exactly, which is asserted), and WikiText's long rolling windows differ
# grossly (word perplexity 19642 reloaded vs 5604 in memory, while fp32 agrees exactly). So nf4 is compared on
# multiple choice (metrics), fp32 on both kinds (metrics and every item).
@pytest.mark.parametrize("precision, names, per_item", [
    ("nf4", ("piqa", "arc_easy"), False),
    ("fp32", ("piqa", "arc_easy"), True),
    ("fp32", ("wikitext",), True),
], ids=["nf4-multiple_choice", "fp32-multiple_choice", "fp32-rolling"])
def test_run_tasks_matches_lm_eval_hf(precision, names, per_item, real_model, shared_data, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweeper.stages.tasks import run_tasks

    monkeypatch.setenv("SWEEPER_TASKDATA_CACHE", str(tmp_path / "cache"))

    # --- the trial's side: from_pretrained with the nf4 precision's kwargs, tasks on local published files
    kwargs = precisions.get(precision).from_pretrained_kwargs("fp32")
    model = AutoModelForCausalLM.from_pretrained(real_model, **kwargs)
    tok = AutoTokenizer.from_pretrained(real_model)
    if precision == "nf4":
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    study = Study(
        name="faithful", models=[str(real_model)], precisions=[precision], compute_dtypes=["fp32"], kl=False,
        tasks=[t for t in [Task("piqa", data=str(shared_data / "piqa" / "valid.jsonl")),
               Task("arc_easy", data={"test": str(TASKS_DATA / "arc" / "ARC-Easy-Test.jsonl"),
                                      "train": str(TASKS_DATA / "arc" / "ARC-Easy-Train.jsonl")}, num_fewshot=2),
               Task("wikitext", data=str(shared_data / "wikitext-2" / "test.txt"))] if t.name in names],
        limit=LIMIT, eval_batch_size=BATCH, seed=SEED,
    )
    spec = expand(study)[0][0]
    rows, samples, _ = run_tasks(model, tok, spec, "cpu")

    # --- plain lm-eval: model "hf" from a folder, its own task loading
    nf4_dir = tmp_path / "llama-4m-nf4"
    model.save_pretrained(nf4_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model / f, nf4_dir / f)
    del model
    files = _hub_format_files(shared_data, tmp_path)
    tm = TaskManager(include_path=str(_include_yamls(files, tmp_path / "yamls")))
    ref = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(nf4_dir), "dtype": "float32", "device": "cpu"},
        tasks=list(names), limit=LIMIT, batch_size=BATCH, task_manager=tm, log_samples=True,
        random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED,
    )
    assert ("quantization_config" in json.loads((nf4_dir / "config.json").read_text())) == (precision == "nf4")

    # --- identical metric values and stderrs, for every metric lm-eval reports
    expected = {}
    for task, entry in ref["results"].items():
        for key, val in entry.items():
            if "," in key and not key.split(",")[0].endswith("_stderr"):
                metric, filt = key.split(",", 1)
                err = entry.get(f"{metric}_stderr,{filt}")
                expected[(task, metric if filt == "none" else key)] = (val, None if err == "N/A" else err)
    got = {(r["task"], r["metric"]): (r["value"], r["stderr"]) for r in rows}
    every = {("piqa", "acc"), ("piqa", "acc_norm"), ("arc_easy", "acc"), ("arc_easy", "acc_norm"),
             ("wikitext", "word_perplexity"), ("wikitext", "byte_perplexity"), ("wikitext", "bits_per_byte")}
    assert set(got) == set(expected) == {k for k in every if k[0] in names}
    assert got == expected
    assert all(r["n"] == LIMIT for r in rows)

    # --- and the same per-item records: same prompts, same log-likelihoods
    if not per_item:
        return
    ref_items = {(t, ex["doc_id"], m): (ex["prompt_hash"], ex[m]) for t, exs in ref["samples"].items()
                 for ex in exs for m in ex["metrics"]}
    ours = {(r["task"], r["doc_id"], r["metric"]): r for r in samples.to_pylist()}
    assert set(ours) == set(ref_items)
    mismatched = {key: (ours[key]["prompt_hash"][:8], ours[key]["value"], prompt_hash[:8], value)
                  for key, (prompt_hash, value) in ref_items.items()
                  if (ours[key]["prompt_hash"], ours[key]["value"]) != (prompt_hash, value[0] if isinstance(value, tuple) else value)}
    assert not mismatched, f"per-item (ours prompt, value, lm-eval prompt, value) differ: {mismatched}"
