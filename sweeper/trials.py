"""Expansion of a study into trials, and each trial's stable identity.

Rules (documented in README "Study files"):
- the grid is models x precisions x compute_dtypes, in that order;
- a plain-dtype precision (fp32, fp16, bf16) fixes its own dtype, so it makes one trial per model whatever the
  compute dtypes; the other compute dtypes are dropped as duplicates, with a printed reason;
- for bitsandbytes int8 the compute dtype is the dtype of the non-quantized modules; for nf4/fp4 it is also the 4-bit
  matmul dtype: each compute dtype is its own trial;
- ``trial_id`` hashes what determines a trial's numbers (model + revision + local fingerprint, precision + options,
  effective compute dtype, tasks with their settings, benchmark and perplexity settings, seed, metrics version), not
  the study name, so the same cell in two studies has the same id, and growing a study runs only the new cells.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import precisions as _precisions
from .study import Benchmark, KLSettings, Model, Perplexity, Study, Task

# Bump when a metric's definition changes: every trial id changes with it, so old numbers are never mixed in.
METRICS_VERSION = 1


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial; JSON-serialisable through :meth:`to_dict`."""

    trial_id: str
    study: str
    model: Model
    model_fingerprint: str | None
    precision: str
    precision_options: dict[str, Any]
    compute_dtype: str
    tasks: tuple[Task, ...]
    num_fewshot: int | None
    limit: int | float | None
    eval_batch_size: int | str
    benchmark: Benchmark
    perplexity: Perplexity | None
    seed: int
    is_baseline: bool
    baseline_id: str | None  # the trial id of this model's baseline cell
    baseline_precision: str  # the baseline cell, so any trial can name the baseline's KL reference
    baseline_compute_dtype: str
    baseline_options: dict[str, Any]
    kl: KLSettings | None
    gpu_share: float  # 0 on CPU-only clusters
    cpus: int

    @property
    def cell(self) -> str:
        return f"{self.model.name} {self.precision}/{self.compute_dtype}"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialSpec":
        d = dict(d)
        d["model"] = Model(**d["model"])
        d["tasks"] = tuple(Task(**t) for t in d["tasks"])
        d["benchmark"] = Benchmark(**{**d["benchmark"], "batch_sizes": tuple(d["benchmark"]["batch_sizes"])})
        d["perplexity"] = Perplexity(**d["perplexity"]) if d["perplexity"] else None
        d["kl"] = KLSettings(**d["kl"]) if d["kl"] else None
        return cls(**d)

    def baseline_spec(self) -> "TrialSpec":
        """The spec of this model's baseline cell (this spec itself for the baseline)."""
        if self.is_baseline:
            return self
        return dataclasses.replace(self, trial_id=self.baseline_id, precision=self.baseline_precision,
                                   compute_dtype=self.baseline_compute_dtype, precision_options=self.baseline_options,
                                   is_baseline=True)


@dataclass(frozen=True)
class Dropped:
    model: str
    precision: str
    compute_dtype: str
    reason: str


def _sha(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def model_fingerprint(model: Model) -> str | None:
    """For a local folder: a hash of config.json, the tokenizer files, and the weight files' names, sizes and
    modification times (None for hub ids)."""
    path = Path(model.id)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if f.suffix in (".safetensors", ".bin"):
            # names, sizes and modification times: retrained weights of the same shapes change the id without
            # hashing gigabytes (a copy of the folder elsewhere also gets a new id: rerun rather than reuse wrongly)
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        elif f.name.startswith("tokenizer") or f.suffix == ".model":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _task_identity(t: Task, study: Study) -> dict[str, Any]:
    from .taskdata import data_fingerprint

    return {
        "name": t.name,
        "num_fewshot": t.num_fewshot if t.num_fewshot is not None else study.num_fewshot,
        "limit": t.limit if t.limit is not None else study.limit,
        "data": data_fingerprint(t.data),  # content of files and folders (MMLU's tree, PIQA's labels file)
    }


def model_identity(model: Model, fingerprint: str | None) -> dict[str, Any]:
    """What identifies a model in trial and KL-reference ids: id (absolute path for folders), revision, fingerprint."""
    return {"model": os.path.abspath(model.id) if Path(model.id).is_dir() else model.id,
            "revision": model.revision, "model_fingerprint": fingerprint}


def _baseline_identity(study: Study) -> list[Any]:
    bp, bcd = study.baseline_cell()
    return [bp, bcd, _precisions.get(bp).resolve_options(study.precision_options.get(bp))]


def _calibration_identity(options: dict[str, Any]) -> str | None:
    """The content of the calibration text a calibrated precision will use (it changes the quantized weights)."""
    if "calib_data" not in options:
        return None
    from .calibration_data import calibration_file

    try:
        return file_fingerprint(str(calibration_file(options)))
    except FileNotFoundError:
        return None  # reported when the trial loads


def _benchmark_identity(benchmark: Benchmark) -> dict[str, Any]:
    """The benchmark settings; ``kv_cache`` only when not the default (cache on), so trial ids made before the
    setting existed stay the same."""
    d = asdict(benchmark)
    if d["kv_cache"] == (True,):
        del d["kv_cache"]
    return d


def study_identity(study: Study) -> dict[str, Any]:
    """The parts of every trial's identity that the whole study shares (data files are hashed here, once)."""
    ppl = None
    if study.perplexity is not None:
        ppl = {"context": study.perplexity.context, "max_tokens": study.perplexity.max_tokens,
               "file": file_fingerprint(study.perplexity.path) if os.path.isfile(study.perplexity.path) else study.perplexity.path}
    return {
        "tasks": [_task_identity(t, study) for t in study.tasks],
        "benchmark": _benchmark_identity(study.benchmark),
        "perplexity": ppl,
        "kl": asdict(study.kl) if study.kl else None,
        # KL numbers are measured against the baseline cell, so with KL on the baseline is part of the identity
        "baseline": _baseline_identity(study) if study.kl else None,
        "seed": study.seed,
        "metrics_version": METRICS_VERSION,
    }


def trial_identity(study: Study, model: Model, precision: str, compute_dtype: str,
                   fingerprint: str | None, shared: dict[str, Any], calibration: tuple | None = None,
                   model_ident: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that decides a trial's numbers; ``fingerprint`` is the model's, ``shared`` is study_identity();
    ``calibration``: (options, calibration text identity) of ``precision``, ``model_ident``: model_identity(), when
    the caller has them already."""
    if calibration is None:
        options = _precisions.get(precision).resolve_options(study.precision_options.get(precision))
        calibration = (options, _calibration_identity(options))
    return {
        **(model_ident if model_ident is not None else model_identity(model, fingerprint)),
        "precision": precision,
        "options": calibration[0],
        "calibration_text": calibration[1],
        "compute_dtype": compute_dtype,
        **shared,
    }


def trial_share(study: Study, model: Model, precision: str, compute_dtype: str, gpu_share_for=None,
                cluster_has_gpus: bool = False) -> float:
    """A trial's GPU share: 0 on a CPU-only cluster, the study's pinned share, or ``gpu_share_for``'s estimate."""
    if not cluster_has_gpus:
        return 0.0
    pinned = study.resources.gpus_per_trial
    if pinned != "auto":
        return float(pinned)
    return gpu_share_for(study, model, precision, compute_dtype) if gpu_share_for else 1.0


def expand(study: Study) -> tuple[list[TrialSpec], list[Dropped]]:
    """The study's trials in grid order (each model's baseline first) and the cells dropped, with reasons.

    Shares are 0 (a CPU-only cluster): :func:`sweeper.launch.for_cluster` gives the cluster's, through
    :func:`trial_share`.
    """
    base_precision, base_cd = study.baseline_cell()
    shared = study_identity(study)
    # looked up once (each lookup checks the precision's libraries are importable: 100k trials made 400k checks)
    prec = {name: _precisions.get(name) for name in {*study.precisions, base_precision}}
    options = {name: p.resolve_options(study.precision_options.get(name)) for name, p in prec.items()}
    calibration = {name: (o, _calibration_identity(o)) for name, o in options.items()}
    trials: list[TrialSpec] = []
    dropped: list[Dropped] = []
    for model in study.models:
        seen: dict[tuple[str, str], str] = {}  # (precision, effective dtype) -> the compute dtype that made it
        cells: list[tuple[str, str]] = []
        for pname in study.precisions:
            p = prec[pname]
            # a plain dtype keeps the cell whose compute dtype is its own, and drops the others
            for cd in sorted(study.compute_dtypes, key=lambda c: c != p.effective_compute_dtype(c)):
                eff = p.effective_compute_dtype(cd)
                if (pname, eff) in seen:
                    dropped.append(Dropped(model.name, pname, cd,
                                           f"{pname} fixes its own dtype ({eff}): compute dtype {cd} gives the same "
                                           f"trial as compute dtype {seen[(pname, eff)]}"))
                    continue
                seen[(pname, eff)] = cd
                cells.append((pname, eff))
        if (base_precision, base_cd) not in cells:  # only reachable through an explicit compute dtype mismatch
            raise AssertionError(f"baseline {base_precision}/{base_cd} missing from grid")
        fp = model_fingerprint(model)
        mid = model_identity(model, fp)
        ids = {c: _sha(trial_identity(study, model, *c, fp, shared, calibration[c[0]], mid)) for c in cells}
        base_id = ids[(base_precision, base_cd)]
        cells.sort(key=lambda c: c != (base_precision, base_cd))  # baseline first
        for pname, cd in cells:
            trials.append(TrialSpec(
                trial_id=ids[(pname, cd)], study=study.name, model=model, model_fingerprint=fp, precision=pname,
                precision_options=dict(options[pname]),
                compute_dtype=cd, tasks=study.tasks, num_fewshot=study.num_fewshot, limit=study.limit,
                eval_batch_size=study.eval_batch_size, benchmark=study.benchmark, perplexity=study.perplexity,
                seed=study.seed, is_baseline=(pname, cd) == (base_precision, base_cd), baseline_id=base_id,
                baseline_precision=base_precision, baseline_compute_dtype=base_cd,
                baseline_options=dict(options[base_precision]),
                kl=study.kl, gpu_share=0.0, cpus=study.resources.cpus_per_trial,
            ))
    return trials, dropped
