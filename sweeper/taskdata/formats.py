"""Readers for the file formats the evaluation datasets are published in, and converters to the columns lm-eval expects.

Each *family* is keyed by the ``dataset_path`` an lm-eval task YAML loads from the hub; every task whose YAML names that
dataset (``arc_easy``, ``arc_challenge``, ``gsm8k``, ``gsm8k_cot``, ``mmlu_*`` ...) can read the same local files.
A converter turns the published files into rows with exactly the columns of the hub dataset, so the task's
``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` / ``process_docs`` run unchanged. See docs/tasks.md.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

Row = dict[str, Any]


class FormatError(ValueError):
    """A data file is missing or does not have the expected format (the message names the file)."""


# ----------------------------------------------------------------------------------------------------------- readers
def read_records(path: Path) -> list[Row]:
    """Rows of a .jsonl / .json (list of objects) / .csv (with a header row) / .parquet file."""
    if not path.is_file():
        raise FormatError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise FormatError(f"{path} line {i} is not JSON ({e.msg})") from None
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise FormatError(f"{path} must hold a JSON list of objects")
            rows = data
        elif suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise FormatError(f"{path} has an unsupported extension {suffix!r} (allowed: .jsonl, .json, .csv, .parquet)")
    except FormatError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError) as e:
        raise FormatError(f"{path} could not be read ({type(e).__name__}: {e})") from None
    if not rows:
        raise FormatError(f"{path} holds no rows")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise FormatError(f"{path} row {i} is not an object")
    return rows


def _need(path: Path, i: int, row: Row, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise FormatError(f"{path} row {i} lacks {', '.join(missing)}")


# ------------------------------------------------------------------------------------------------------- converters
@dataclass(frozen=True)
class Family:
    """How to read one dataset's published files.

    ``convert(split_sources, dataset_names)`` returns {config name -> {split -> rows}}: one config per lm-eval
    ``dataset_name`` the tasks of the family use (MMLU: one per subject).
    """

    name: str
    dataset_path: str  # the hub dataset the lm-eval YAMLs load
    expected: str  # one line: the expected file format (used in error messages)
    convert: Callable[[dict[str, Path], list[str | None]], dict[str | None, dict[str, list[Row]]]]
    split_names: dict[str, str] | None = None  # published folder/file split name -> lm-eval split (MMLU)


def _single(dataset_names: list[str | None], rows_by_split: dict[str, list[Row]]) -> dict[str | None, dict[str, list[Row]]]:
    # Families with one file per split serve the same rows under every dataset_name their tasks ask for.
    return {name: rows_by_split for name in dataset_names}


def _arc_row(path: Path, i: int, r: Row) -> Row:
    q = r.get("question")
    if isinstance(q, dict):  # allenai ARC-V1-Feb2018 jsonl: {"id", "question": {"stem", "choices": [...]}, "answerKey"}
        _need(path, i, q, ["stem", "choices"])
        choices = q["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, dict) and "text" in c and "label" in c for c in choices):
            raise FormatError(f"{path} row {i}: question.choices must be a list of {{text, label}}")
        text, labels, stem = [c["text"] for c in choices], [str(c["label"]) for c in choices], q["stem"]
    else:  # the hub's allenai/ai2_arc columns: question (str), choices {"text": [...], "label": [...]}
        _need(path, i, r, ["question", "choices"])
        ch = r["choices"]
        if isinstance(ch, str):
            ch = json.loads(ch)
        if not isinstance(ch, dict) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
            raise FormatError(f"{path} row {i}: choices must be {{text: [...], label: [...]}}")
        text, labels, stem = ch["text"], [str(x) for x in ch["label"]], q
    _need(path, i, r, ["answerKey"])
    key = str(r["answerKey"])
    if key not in labels:
        raise FormatError(f"{path} row {i}: answerKey {key!r} is not one of the choice labels {labels}")
    return {"id": str(r.get("id", i)), "question": str(stem), "choices": {"text": [str(t) for t in text], "label": labels},
            "answerKey": key}


def _convert_arc(sources: dict[str, Path], names: list[str | None]):
    rows = {split: [_arc_row(p, i, r) for i, r in enumerate(read_records(p), 1)] for split, p in sources.items()}
    return _single(names, rows)


def _convert_hellaswag(sources: dict[str, Path], names: list[str | None]):
    keys = ["activity_label", "ctx_a", "ctx_b", "endings", "label"]
    out: dict[str, list[Row]] = {}
    for split, p in sources.items():
        rows = []
        for i, r in enumerate(read_records(p), 1):
            _need(p, i, r, keys)
            endings = r["endings"] if not isinstance(r["endings"], str) else json.loads(r["endings"])
            if not isinstance(endings, list) or len(endings) < 2:
                raise FormatError(f"{p} row {i}: endings must be a list of candidate endings")
            label = str(r["label"])
            if not label.isdigit() or int(label) >= len(endings):
                raise FormatError(f"{p} row {i}: label {r['label']!r} is not an index into endings")
            rows.append({
                "ind": int(r.get("ind", i)), "activity_label": str(r["activity_label"]), "ctx_a": str(r["ctx_a"]),
                "ctx_b": str(r["ctx_b"]), "ctx": str(r.get("ctx", f"{r['ctx_a']} {r['ctx_b']}")),
                "endings": [str(e) for e in endings], "source_id": str(r.get("source_id", "")),
                "split": str(r.get("split", split)), "split_type": str(r.get("split_type", "")),
                "label": label,  # a string on the hub; hellaswag's process_docs does int(label)
            })
        out[split] = rows
    return _single(names, out)


def piqa_labels_file(path: Path) -> Path:
    """The published labels file next to a PIQA questions file: valid.jsonl -> valid-labels.lst."""
    return path.with_name(f"{path.stem}-labels.lst")


def _convert_piqa(sources: dict[str, Path], names: list[str | None]):
    out: dict[str, list[Row]] = {}
    for split, p in sources.items():
        recs = read_records(p)
        labels: list[str] | None = None
        if any("label" not in r for r in recs):
            lp = piqa_labels_file(p)
            if not lp.is_file():
                raise FormatError(f"{p} has no 'label' field and its labels file {lp.name} is missing next to it")
            labels = [ln.strip() for ln in lp.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if len(labels) != len(recs):
                raise FormatError(f"{lp} has {len(labels)} labels for {len(recs)} rows of {p.name}")
        rows = []
        for i, r in enumerate(recs, 1):
            _need(p, i, r, ["goal", "sol1", "sol2"])
            lab = str(labels[i - 1] if labels is not None else r["label"])
            if lab not in ("0", "1"):
                raise FormatError(f"{p} row {i}: label {lab!r} must be 0 or 1")
            rows.append({"goal": str(r["goal"]), "sol1": str(r["sol1"]), "sol2": str(r["sol2"]), "label": int(lab)})
        out[split] = rows
    return _single(names, out)


def _convert_gsm8k(sources: dict[str, Path], names: list[str | None]):
    out: dict[str, list[Row]] = {}
    for split, p in sources.items():
        rows = []
        for i, r in enumerate(read_records(p), 1):
            _need(p, i, r, ["question", "answer"])
            rows.append({"question": str(r["question"]), "answer": str(r["answer"])})
        out[split] = rows
    return _single(names, out)


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_pages(lines: list[str]) -> list[str]:
    """Split WikiText line files (one paragraph or heading per line) into articles, as the "page" documents of
    EleutherAI/wikitext_document_level: an article starts at a top-level heading line `` = Title = `` and runs to the
    next one; its lines are joined with newlines.
    """
    pages: list[str] = []
    current: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line.rstrip("\n")) and current:
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line.rstrip("\n"))
    page = "\n".join(current)
    if page.strip():
        pages.append(page)
    return pages


def _convert_wikitext(sources: dict[str, Path], names: list[str | None]):
    out: dict[str, list[Row]] = {}
    for split, p in sources.items():
        if p.suffix.lower() in (".txt", ".raw", ".tokens"):
            if not p.is_file():
                raise FormatError(f"{p} does not exist")
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise FormatError(f"{p} could not be read ({type(e).__name__})") from None
            pages = wikitext_pages(text.split("\n"))
            if not pages or not any(_WIKITEXT_TITLE.match(ln) for ln in text.split("\n")):
                raise FormatError(f"{p} has no WikiText article heading line ' = Title = '")
            if " @-@ " in text or "<unk>" in text:
                log.warning("%s is the tokenized WikiText variant (<unk>, ' @-@ '); lm-eval's wikitext task reads the "
                            "raw variant, so its word/byte perplexities are not comparable with published numbers", p)
            rows = [{"page": pg} for pg in pages]
        else:
            rows = []
            for i, r in enumerate(read_records(p), 1):
                _need(p, i, r, ["page"])
                rows.append({"page": str(r["page"])})
        out[split] = rows
    return _single(names, out)


MMLU_SPLITS = {"test": "test", "dev": "dev", "val": "validation", "validation": "validation"}


def mmlu_csv_files(folder: Path, split_word: str) -> dict[str, Path]:
    """subject -> file for hendrycks/test layout: ``<folder>/<subject>_<split>.csv``."""
    out = {}
    for f in sorted(folder.glob(f"*_{split_word}.csv")):
        out[f.name[: -len(f"_{split_word}.csv")]] = f
    return out


def _read_mmlu_csv(path: Path, subject: str) -> list[Row]:
    rows = []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            for i, rec in enumerate(csv.reader(fh), 1):
                if len(rec) != 6:
                    raise FormatError(f"{path} row {i} has {len(rec)} fields, expected 6 (question,A,B,C,D,answer), no header")
                ans = rec[5].strip()
                if ans not in ("A", "B", "C", "D"):
                    raise FormatError(f"{path} row {i}: answer {ans!r} must be one of A, B, C, D")
                rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5], "answer": "ABCD".index(ans)})
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FormatError(f"{path} could not be read ({type(e).__name__}: {e})") from None
    if not rows:
        raise FormatError(f"{path} holds no rows")
    return rows


def _convert_mmlu(sources: dict[str, Path], names: list[str | None]):
    # sources: lm-eval split -> folder of <subject>_<split word>.csv files (hendrycks/test data/<split word>/)
    out: dict[str | None, dict[str, list[Row]]] = {n: {} for n in names}
    for split, folder in sources.items():
        if not folder.is_dir():
            raise FormatError(f"{folder} is not a folder of <subject>_<split>.csv files")
        words = [w for w, s in MMLU_SPLITS.items() if s == split]
        files: dict[str, Path] = {}
        for w in words:
            files.update(mmlu_csv_files(folder, w))
        missing = [n for n in names if n not in files]
        if missing:
            shown = ", ".join(f"{m}_{words[0]}.csv" for m in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FormatError(f"{folder} lacks {shown}{more} (split {split!r})")
        for n in names:
            out[n][split] = _read_mmlu_csv(files[n], str(n))
    return out


def _convert_generic(sources: dict[str, Path], names: list[str | None]):
    return _single(names, {split: read_records(p) for split, p in sources.items()})


FAMILIES: dict[str, Family] = {f.dataset_path: f for f in [
    Family("ai2_arc", "allenai/ai2_arc",
           "ARC jsonl as published by AI2 ({id, question: {stem, choices: [{text, label}]}, answerKey} per line) "
           "or the hub columns (question, choices {text, label}, answerKey) as jsonl/json/csv/parquet", _convert_arc),
    Family("hellaswag", "Rowan/hellaswag",
           "HellaSwag jsonl as published by rowanz/hellaswag ({ind, activity_label, ctx_a, ctx_b, ctx, endings, label, "
           "split, split_type, source_id} per line)", _convert_hellaswag),
    Family("piqa", "baber/piqa",
           "PIQA jsonl as published ({goal, sol1, sol2} per line) with the aligned <name>-labels.lst next to it "
           "(one 0/1 per line), or rows that carry a 'label' field", _convert_piqa),
    Family("gsm8k", "openai/gsm8k",
           "GSM8K jsonl as published by openai/grade-school-math ({question, answer} per line, answer ending '#### <n>')",
           _convert_gsm8k),
    Family("wikitext", "EleutherAI/wikitext_document_level",
           "WikiText line files (wiki.test.raw / test.txt: one paragraph or ' = Heading = ' per line), or rows with a "
           "'page' field", _convert_wikitext),
    Family("mmlu", "cais/mmlu",
           "MMLU as published in hendrycks/test: a data/ folder with test/<subject>_test.csv (and dev/<subject>_dev.csv "
           "for few-shot), headerless rows question,A,B,C,D,answer-letter", _convert_mmlu, split_names=MMLU_SPLITS),
]}


def family_for(dataset_path: str | None) -> Family:
    """The family for a task's hub dataset; unknown datasets read files already in the task's own columns."""
    if dataset_path in FAMILIES:
        return FAMILIES[dataset_path]
    return Family("generic", str(dataset_path),
                  f"rows with the columns of the hub dataset {dataset_path!r} the task's YAML reads, as jsonl/json/csv/parquet",
                  _convert_generic)
