"""Tasks stage: lm-evaluation-harness tasks on the model instance already in memory.

All tasks of a trial run in ONE ``lm_eval.simple_evaluate`` call over ``HFLM(pretrained=<model>, tokenizer=...)``, so
the accuracy comes from the very instance the trial quantized and timed. Tasks whose ``data`` is set read local files
(:mod:`sweeper.taskdata`) with the task's own YAML otherwise unchanged. See docs/tasks.md.

lm-eval's task index takes ~10 s to build, so it is built once per process (:func:`task_manager`) and shared by
:func:`validate_tasks` and every :func:`run_tasks` call in that process; across processes it is cached on disk
(:mod:`.task_index`).
"""
from __future__ import annotations

import difflib
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..study import Task
from .. import taskdata
from ..taskdata.formats import FormatError, family_for

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module before it needs lm-eval
    import pyarrow as pa
    from lm_eval.tasks import TaskManager

    from ..trials import TrialSpec

log = logging.getLogger(__name__)

STAGE = "tasks"
DEFAULT_MAX_BATCH_SIZE = 64  # lm-eval's own default cap for batch_size="auto"

# Per-item metrics whose value is 1 for a correct answer and 0 otherwise.
CORRECTNESS_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match", "em"})

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")

_TM: "TaskManager | None" = None
_TM_LOCK = threading.Lock()


def task_manager() -> "TaskManager":
    """lm-eval's TaskManager (the index of every built-in task), built once per process."""
    global _TM
    with _TM_LOCK:
        if _TM is None:
            from .task_index import make_task_manager

            _TM = make_task_manager()
            log.info("lm-eval task index built: %d names", len(_TM.all_tasks))
        return _TM


# --------------------------------------------------------------------------------------------------------- planning
@dataclass
class PlannedTask:
    """A study Task resolved against lm-eval's index, with its local data converted (if any)."""

    task: Task
    kind: str  # "task", "group" or "tag"
    leaves: list[str]  # the lm-eval leaf tasks it runs
    num_fewshot: int | None  # requested (per-task, else study-level); None: the YAML's default
    limit: int | float | None
    overrides: dict[str, Any] = field(default_factory=dict)  # YAML keys replaced (local data only)


def _close_names(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:
        low = name.lower()
        close = [n for n in names if low in n.lower()][:5]
    return f"; close names: {', '.join(close)}" if close else ""


def _leaf_names(name: str, index: dict, depth: int = 0) -> list[str]:
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [name]
    if entry.kind == Kind.TAG:
        return sorted(t for t in entry.tags if t in index)
    out: list[str] = []
    if depth > 10:
        return out
    for item in (entry.cfg or {}).get("task", []) or []:
        child = item if isinstance(item, str) else (item.get("task") or item.get("group")) if isinstance(item, dict) else None
        if isinstance(child, str) and child in index:
            out += _leaf_names(child, index, depth + 1)
    return out


def _fewshot_split_of(cfg: dict) -> str | None:
    fc = cfg.get("fewshot_config")
    if isinstance(fc, dict) and fc.get("split"):
        return fc["split"]
    return cfg.get("fewshot_split")


def _effective_shots(cfg: dict, requested: int | None) -> int:
    # lm-eval's rule (simple_evaluate): a YAML num_fewshot of 0 is never overridden; else the request, else the YAML.
    yaml_shots = cfg.get("num_fewshot")
    if yaml_shots == 0:
        return 0
    if requested is not None:
        return requested
    return int(yaml_shots or 0)


def _normalise_sources(t: Task, fam, cfg: dict, eval_split: str, declared: set[str]) -> dict[str, Path]:
    data = t.data
    if fam.split_names:  # MMLU: folders named as hendrycks/test publishes them (test/, dev/, val/)
        if isinstance(data, str):
            root = Path(data).expanduser()
            if not root.exists():
                raise UserError(f"task {t.name!r}: data folder {root} does not exist; expected {fam.expected}")
            subs = {fam.split_names[d.name]: d for d in sorted(root.iterdir()) if d.is_dir() and d.name in fam.split_names}
            sources = subs or {eval_split: root}
        else:
            sources = {fam.split_names.get(k, k): Path(v).expanduser() for k, v in data.items()}
    elif isinstance(data, str):
        sources = {eval_split: Path(data).expanduser()}
    else:
        sources = {k: Path(v).expanduser() for k, v in data.items()}
    unknown = sorted(set(sources) - declared)
    if unknown:
        raise UserError(f"task {t.name!r}: data names split(s) {', '.join(map(repr, unknown))}; "
                        f"this task's splits are {', '.join(map(repr, sorted(declared)))}")
    if eval_split not in sources:
        raise UserError(f"task {t.name!r} evaluates split {eval_split!r}; data must include it "
                        f"(data='<file>' or data={{{eval_split!r}: '<file>', ...}}), got {sorted(sources)}")
    return sources


def _plan_data(t: Task, leaves: list[str], index: dict, requested_shots: int | None) -> dict[str, Any]:
    """Convert the task's local files and return the YAML overrides that point its leaves at them."""
    cfgs = [index[n].cfg or {} for n in leaves]
    for n, cfg in zip(leaves, cfgs):
        if "class" in cfg or cfg.get("custom_dataset"):
            raise UserError(f"task {t.name!r}: {n} is a Python-defined task with its own data loading; "
                            f"data= works for YAML tasks that read a hub dataset")
    paths = {cfg.get("dataset_path") for cfg in cfgs}
    if len(paths) != 1:
        raise UserError(f"task {t.name!r}: its tasks read {len(paths)} different datasets ({', '.join(sorted(map(str, paths)))}); "
                        f"data= works for a task or a group over one dataset (e.g. mmlu); point each task at its files")
    fam = family_for(next(iter(paths)))
    cfg = cfgs[0]
    declared = {cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)}
    if _fewshot_split_of(cfg):
        declared.add(_fewshot_split_of(cfg))
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if not eval_split:
        raise UserError(f"task {t.name!r} declares no test or validation split; it cannot read local data")
    sources = _normalise_sources(t, fam, cfg, eval_split, declared)

    # few-shot examples must come from the split lm-eval would take them from, never silently from another one
    shots = max(_effective_shots(c, requested_shots) for c in cfgs)
    fs_source = _fewshot_split_of(cfg) or cfg.get("training_split") or cfg.get("validation_split") or eval_split
    if shots > 0 and fs_source not in sources:
        raise UserError(f"task {t.name!r} uses {shots} few-shot examples from split {fs_source!r}, which data does not "
                        f"include; add it (data={{{eval_split!r}: ..., {fs_source!r}: ...}}) or set num_fewshot=0")

    names = list(dict.fromkeys(c.get("dataset_name") for c in cfgs))
    try:
        folder = taskdata.prepare_dataset(fam, sources, names)
    except FormatError as e:
        raise UserError(f"task {t.name!r}: {e}; expected {fam.expected}") from None

    overrides: dict[str, Any] = {"dataset_path": str(folder), "dataset_kwargs": None}
    for key in _SPLIT_KEYS:  # splits without local files are switched off (only ever unused ones: checked above)
        if cfg.get(key) and cfg[key] not in sources:
            overrides[key] = None
    fc = cfg.get("fewshot_config")
    if isinstance(fc, dict) and fc.get("split") and fc["split"] not in sources:
        overrides["fewshot_config"] = {**fc, "split": None}
    return overrides


def plan_tasks(tasks: tuple[Task, ...] | list[Task], num_fewshot: int | None = None,
               limit: int | float | None = None) -> list[PlannedTask]:
    """Resolve tasks against lm-eval's index and convert local data; raises :class:`UserError` for bad input."""
    from lm_eval.tasks._index import Kind

    tm = task_manager()
    index = tm.task_index
    plans: list[PlannedTask] = []
    for t in tasks:
        if isinstance(t, str):
            t = Task(t)
        if t.name not in index:
            raise UserError(f"unknown lm-eval task {t.name!r}{_close_names(t.name, tm.all_tasks)}")
        kind = {Kind.GROUP: "group", Kind.TAG: "tag"}.get(index[t.name].kind, "task")
        leaves = _leaf_names(t.name, index)
        if not leaves:
            raise UserError(f"lm-eval task {t.name!r} resolves to no tasks")
        requested = t.num_fewshot if t.num_fewshot is not None else num_fewshot
        overrides: dict[str, Any] = {}
        if t.data is not None:
            if kind == "tag":
                raise UserError(f"task {t.name!r} is an lm-eval tag; data= needs a task or group name "
                                f"(e.g. one of {', '.join(leaves[:3])})")
            overrides = _plan_data(t, leaves, index, requested)
        plans.append(PlannedTask(task=t, kind=kind, leaves=leaves, num_fewshot=requested,
                                 limit=t.limit if t.limit is not None else limit, overrides=overrides))
    seen: dict[str, str] = {}
    for p in plans:
        for leaf in p.leaves:
            if leaf in seen and seen[leaf] != p.task.name:
                raise UserError(f"tasks {seen[leaf]!r} and {p.task.name!r} both contain {leaf!r}; list it once")
            seen[leaf] = p.task.name
    return plans


def validate_tasks(tasks: tuple[Task, ...], num_fewshot: int | None = None) -> None:
    """Raise :class:`UserError` (one line) for an unknown task name or a missing / malformed local data file.

    Converting the local files is the check (and fills the conversion cache the trials then reuse).
    ``num_fewshot`` is the study-level default, used to check that few-shot splits are present.
    """
    plan_tasks(tuple(tasks), num_fewshot=num_fewshot)


# ---------------------------------------------------------------------------------------------------------- running
def build_task_objects(plans: list[PlannedTask]) -> tuple[list[Any], dict[str, Any]]:
    """lm-eval Task/Group objects for the plans (YAML + overrides), and leaf name -> Task object.

    Few-shot counts are applied to the leaves exactly as ``simple_evaluate(num_fewshot=...)`` does, but per task.
    """
    from lm_eval.api.group import Group
    from lm_eval.tasks._factory import TaskFactory

    tm = task_manager()
    registry = dict(tm.task_index)  # the factory registers namespaced names into it: keep the cached index clean
    factory = TaskFactory(meta=None)
    objs: list[Any] = []
    leaves: dict[str, Any] = {}
    for p in plans:
        overrides = dict(p.overrides)
        cfg = registry[p.task.name].cfg or {}
        if p.kind == "task" and p.num_fewshot is not None and cfg.get("num_fewshot") != 0:
            overrides["num_fewshot"] = p.num_fewshot  # at construction too, so its warnings speak of the real count
        obj = factory.build(registry[p.task.name], overrides=overrides or None, registry=registry)
        built = obj if isinstance(obj, list) else [obj]
        for o in built:
            leaf_objs = o.get_all_tasks() if isinstance(o, Group) else [o]
            for lt in leaf_objs:
                leaves[lt.task_name] = lt
                if p.num_fewshot is not None and lt.get_config("num_fewshot") != 0:
                    lt.set_config(key="num_fewshot", value=p.num_fewshot)
        objs.extend(built)
    return objs, leaves


def _sample_size(n_docs: int, limit: int | float) -> int:
    # lm-eval's get_sample_size: a limit < 1 is a fraction of the documents
    n = int(math.ceil(n_docs * limit)) if limit < 1.0 else int(limit)
    return min(n, n_docs)


def _limits(plans: list[PlannedTask], leaves: dict[str, Any]) -> tuple[int | float | None, dict[str, list[int]] | None]:
    """One ``limit`` when every task shares it (as lm-eval is usually called), else per-leaf ``samples`` indices."""
    distinct = {p.limit for p in plans}
    if len(distinct) == 1:
        return next(iter(distinct)), None
    samples: dict[str, list[int]] = {}
    for p in plans:
        if p.limit is None:
            continue
        for leaf in p.leaves:
            if leaf in leaves:
                samples[leaf] = list(range(_sample_size(len(leaves[leaf].eval_docs), p.limit)))
    return None, samples


def run_tasks(model: Any, tokenizer: Any, spec: "TrialSpec", device: str,
              max_batch_size: int | None = None) -> tuple[list[dict[str, Any]], "pa.Table | None", dict[str, Any]]:
    """Run all of ``spec.tasks`` in one lm-eval evaluation on ``model`` (already loaded) and return
    (metric rows for the store, per-item samples table, trial row values: ``task_groups``, see :func:`task_groups`).
    ``([], None, {})`` when the trial has no tasks.
    """
    if not spec.tasks:
        return [], None, {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    plans = plan_tasks(spec.tasks, num_fewshot=spec.num_fewshot, limit=spec.limit)
    objs, leaves = build_task_objects(plans)
    limit, samples = _limits(plans, leaves)

    cap = max_batch_size or DEFAULT_MAX_BATCH_SIZE
    batch_size: int | str = spec.eval_batch_size
    if batch_size != "auto" and max_batch_size is not None and int(batch_size) > max_batch_size:
        log.warning("eval_batch_size %s capped to %s by the trial's memory share", batch_size, max_batch_size)
        batch_size = max_batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=cap)
    log.info("tasks stage on %s: %s (batch %s, cap %s, limit %s, seed %s)", device,
             ", ".join(p.task.name for p in plans), batch_size, cap, limit if samples is None else "per task", spec.seed)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=objs, num_fewshot=None, batch_size=batch_size, max_batch_size=cap, limit=limit,
        samples=samples, log_samples=True, task_manager=task_manager(), random_seed=spec.seed,
        numpy_random_seed=spec.seed, torch_random_seed=spec.seed, fewshot_random_seed=spec.seed,
    )
    if results is None:  # non-zero rank of a distributed run: nothing to report
        return [], None, {}
    rows = metric_rows(results, spec.trial_id)
    table = samples_table(results, spec.trial_id, {n: t.OUTPUT_TYPE for n, t in leaves.items()})
    return rows, table, {"task_groups": task_groups(results)}


# ---------------------------------------------------------------------------------------------------------- results
def _number(x: Any) -> float | None:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _leaf_counts(results: dict[str, Any]) -> dict[str, int]:
    counts = {name: int(v.get("effective", v.get("original", 0))) for name, v in (results.get("n-samples") or {}).items()}
    groups = results.get("group_subtasks") or {}

    def count(name: str, depth: int = 0) -> int | None:
        if name in counts:
            return counts[name]
        if name in groups and depth < 10:
            parts = [count(c, depth + 1) for c in groups[name]]
            return sum(p for p in parts if p is not None)
        return None

    return {name: c for name in set(counts) | set(groups) | set(results.get("results", {}))
            if (c := count(name)) is not None}


def task_groups(results: dict[str, Any]) -> dict[str, list[str]]:
    """lm-eval's own group structure of this evaluation: group -> the tasks and groups it holds (its
    ``group_subtasks``; ``{}`` when no group ran). Stored in the trial row so the analysis groups tasks as lm-eval did
    (``sweeper.results.task_tops``) instead of guessing from names (``gsm8k_cot`` is not part of ``gsm8k``)."""
    return {str(g): [str(c) for c in children] for g, children in (results.get("group_subtasks") or {}).items()}


def metric_rows(results: dict[str, Any], trial_id: str) -> list[dict[str, Any]]:
    """Store rows from ``simple_evaluate``'s result: one per (task or group, metric, filter), names as lm-eval's.

    ``metric`` is lm-eval's metric name, with ``,<filter>`` appended only when the filter is not "none".
    """
    counts = _leaf_counts(results)
    rows: list[dict[str, Any]] = []
    for task, entry in results.get("results", {}).items():
        for key, val in entry.items():
            if "," not in key:
                continue  # alias, sample_len, ...
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            value = _number(val)
            if value is None:
                continue  # groups print " " for metrics they do not aggregate
            stderr = _number(entry.get(f"{metric}_stderr,{filt}"))  # "N/A" -> None
            rows.append({
                "trial_id": trial_id, "stage": STAGE, "task": task,
                "metric": metric if filt == "none" else f"{metric},{filt}",
                "batch_size": None, "value": value, "stderr": stderr, "n": counts.get(task),
                "min": None, "max": None, "unit": None,
            })
    return rows


def _gold_loglik(output_type: str | None, ex: dict[str, Any]) -> float | None:
    resps = ex.get("filtered_resps")
    if output_type == "multiple_choice":
        gold = ex.get("target")
        if isinstance(gold, bool) or not isinstance(gold, int) or not isinstance(resps, list) or not 0 <= gold < len(resps):
            return None  # several gold answers, or a string target: no single gold log-likelihood
        r = resps[gold]
        r = r[0] if isinstance(r, (list, tuple)) else r
        return _number(r)
    if output_type == "loglikelihood" and isinstance(resps, list) and resps:
        r = resps[0]
        return _number(r[0] if isinstance(r, (list, tuple)) else r)
    if output_type == "loglikelihood_rolling" and isinstance(resps, list) and resps:
        return _number(resps[0])  # the document's total log-likelihood
    return None


def samples_table(results: dict[str, Any], trial_id: str, output_types: dict[str, str] | None = None) -> "pa.Table":
    """Per-item rows: one per (task, doc_id, filter, metric).

    ``value`` is lm-eval's per-item metric value (acc 0/1, exact_match 0/1); for metrics lm-eval reports per item as
    (log-likelihood, count) pairs (word/byte perplexity, bits per byte) ``value`` is the log-likelihood and ``weight``
    the count of words or bytes; for those kept as (gold, prediction) pairs (mcc, glue's f1) ``value`` is the gold
    label and ``weight`` the prediction (``sweeper.analysis.metric_kind`` says how each is scored). ``correct`` is set for 0/1 accuracy-type metrics; ``gold_loglik`` is the
    log-likelihood of the gold continuation (multiple choice: the gold choice; rolling: the whole document).
    ``prompt_hash`` lets paired statistics check that two trials saw the same prompt for a doc_id.
    """
    import pyarrow as pa

    from ..store import SAMPLES_SCHEMA

    output_types = output_types or {}
    cols: dict[str, list] = {c: [] for c in SAMPLES_SCHEMA.names}
    for task, examples in (results.get("samples") or {}).items():
        otype = output_types.get(task)
        for ex in examples:
            gold_ll = _gold_loglik(otype, ex)
            for metric in ex.get("metrics", []):
                raw = ex.get(metric)
                weight = None
                if isinstance(raw, (list, tuple)) and len(raw) == 2:
                    value, weight = _number(raw[0]), _number(raw[1])
                else:
                    value = _number(raw)
                correct = None
                if metric in CORRECTNESS_METRICS and value in (0.0, 1.0):
                    correct = value == 1.0
                for c, v in (("trial_id", trial_id), ("task", task), ("doc_id", int(ex["doc_id"])),
                             ("filter", ex.get("filter")), ("metric", metric), ("value", value), ("weight", weight),
                             ("correct", correct), ("gold_loglik", gold_ll), ("prompt_hash", ex.get("prompt_hash")),
                             ("doc_hash", ex.get("doc_hash"))):
                    cols[c].append(v)
    return pa.Table.from_pydict(cols, schema=SAMPLES_SCHEMA)
