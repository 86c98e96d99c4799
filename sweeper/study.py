"""What a study file declares: ``study = Study(...)``, validated on construction.

Validation errors are :class:`UserError` with one line naming the field, the bad value and what is allowed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import precisions as _precisions
from .errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Model:
    """A model: a hub id or a local folder, with an optional revision and a short label for tables."""

    id: str
    revision: str | None = None
    label: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        _check(isinstance(self.id, str) and self.id.strip() != "", f"Model.id must be a non-empty string, got {self.id!r}")
        _check(self.revision is None or isinstance(self.revision, str),
               f"Model({self.id!r}).revision must be a string or None, got {self.revision!r}")
        _check(self.label is None or (isinstance(self.label, str) and self.label.strip() != ""),
               f"Model({self.id!r}).label must be a non-empty string or None, got {self.label!r}")

    @property
    def name(self) -> str:
        return self.label or self.id.rstrip("/").split("/")[-1]


@dataclass(frozen=True)
class Task:
    """An lm-eval task with optional per-task settings; ``data`` points it at local files (see docs/tasks.md)."""

    name: str
    num_fewshot: int | None = None
    limit: int | float | None = None
    data: str | dict[str, str] | None = None

    def __post_init__(self):
        _check(isinstance(self.name, str) and self.name.strip() != "", f"Task.name must be a non-empty string, got {self.name!r}")
        _check(self.num_fewshot is None or (_is_int(self.num_fewshot) and self.num_fewshot >= 0),
               f"Task({self.name!r}).num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        _check(self.limit is None or (_is_number(self.limit) and self.limit > 0),
               f"Task({self.name!r}).limit must be a positive number (count, or fraction < 1), got {self.limit!r}")
        _check(self.data is None or isinstance(self.data, (str, dict)),
               f"Task({self.name!r}).data must be a path or a dict split -> path, got {type(self.data).__name__}")


@dataclass(frozen=True)
class Benchmark:
    """Speed measurement settings (see docs/measurement.md)."""

    prompt_tokens: int = 128
    new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 5
    warmup: int = 1
    enabled: bool = True
    exclusive_timing: bool = True  # timed sections hold the GPU alone (see sweeper/timing_lease.py)
    graph_decode: bool = True  # on CUDA, also the CUDA-graph decode speed and its roofline
    # generation with the KV cache (True) and / or recomputing the whole sequence for every new token (False);
    # the cache-off rows are the same metrics named with "_no_kv" (docs/measurement.md)
    kv_cache: tuple[bool, ...] = (True,)

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes) if isinstance(self.batch_sizes, (list, tuple)) else self.batch_sizes)
        kv = self.kv_cache
        object.__setattr__(self, "kv_cache", (kv,) if isinstance(kv, bool) else tuple(kv) if isinstance(kv, (list, tuple)) else kv)
        _check(isinstance(self.kv_cache, tuple) and len(self.kv_cache) > 0
               and all(isinstance(k, bool) for k in self.kv_cache) and len(set(self.kv_cache)) == len(self.kv_cache),
               f"Benchmark.kv_cache must be True, False or (True, False), got {kv!r}")
        for f in ("prompt_tokens", "new_tokens", "repeats"):
            v = getattr(self, f)
            _check(_is_int(v) and v >= 1, f"Benchmark.{f} must be an integer >= 1, got {v!r}")
        _check(_is_int(self.warmup) and self.warmup >= 0, f"Benchmark.warmup must be an integer >= 0, got {self.warmup!r}")
        _check(isinstance(self.batch_sizes, tuple) and len(self.batch_sizes) > 0
               and all(_is_int(b) and b >= 1 for b in self.batch_sizes),
               f"Benchmark.batch_sizes must be a non-empty list of integers >= 1, got {self.batch_sizes!r}")
        _check(len(set(self.batch_sizes)) == len(self.batch_sizes), f"Benchmark.batch_sizes has duplicates: {self.batch_sizes!r}")
        for f in ("enabled", "exclusive_timing", "graph_decode"):
            _check(isinstance(getattr(self, f), bool), f"Benchmark.{f} must be True or False, got {getattr(self, f)!r}")


@dataclass(frozen=True)
class Perplexity:
    """Token perplexity over non-overlapping windows of ``context`` tokens of a text file (GPTQ convention)."""

    path: str
    context: int = 512
    max_tokens: int | None = None  # None: the whole file

    def __post_init__(self):
        _check(isinstance(self.path, str) and self.path != "", f"Perplexity.path must be a file path, got {self.path!r}")
        _check(_is_int(self.context) and self.context >= 2, f"Perplexity.context must be an integer >= 2, got {self.context!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens > self.context),
               f"Perplexity.max_tokens must be None or an integer > context ({self.context}), got {self.max_tokens!r}")


@dataclass(frozen=True)
class KLSettings:
    """KL divergence to the baseline: sizes of the token set and the storage mode (docs/kl.md)."""

    wiki_tokens: int = 1024  # WikiText tokens in the token set (from the start of the file)
    wiki_seq_len: int = 256  # the WikiText slice is cut into sequences of this many tokens
    prompt_max_tokens: int = 96  # suite prompts are truncated to this many tokens
    continuation_tokens: int = 16  # baseline greedy tokens appended to each prompt in the token set
    gen_tokens: int = 32  # greedy new tokens per prompt for success rate and length
    exact_max_vocab: int = 8192  # exact full log-probs up to this vocabulary size, top-k above
    top_k: int = 256  # k of top-k mode
    max_prompts_per_category: int | None = None  # None: the whole suite (tests use fewer)

    def __post_init__(self) -> None:
        for name in ("wiki_tokens", "exact_max_vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise UserError(f"KLSettings.{name} must be an integer >= 0, got {v!r}")
        for name in ("wiki_seq_len", "prompt_max_tokens", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"KLSettings.{name} must be an integer >= 1, got {v!r}")
        for name in ("continuation_tokens", "gen_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise UserError(f"KLSettings.{name} must be an integer >= 0, got {v!r}")
        m = self.max_prompts_per_category
        if m is not None and (not isinstance(m, int) or m < 1):
            raise UserError(f"KLSettings.max_prompts_per_category must be None or an integer >= 1, got {m!r}")


@dataclass(frozen=True)
class Resources:
    """Per-trial resources: GPU share ("auto" from the memory estimate, or a fraction / whole number of GPUs)."""

    gpus_per_trial: float | str = "auto"
    cpus_per_trial: int = 1
    max_concurrent: int | None = None

    def __post_init__(self):
        g = self.gpus_per_trial
        _check(g == "auto" or (_is_number(g) and 0 < g <= 8 and (g <= 1 or float(g).is_integer())),
               f"Resources.gpus_per_trial must be 'auto', a fraction in (0, 1] or a whole number of GPUs, got {g!r}")
        _check(_is_int(self.cpus_per_trial) and self.cpus_per_trial >= 1,
               f"Resources.cpus_per_trial must be an integer >= 1, got {self.cpus_per_trial!r}")
        _check(self.max_concurrent is None or (_is_int(self.max_concurrent) and self.max_concurrent >= 1),
               f"Resources.max_concurrent must be None or an integer >= 1, got {self.max_concurrent!r}")


@dataclass(frozen=True)
class Study:
    """A sweep: models x precisions x compute dtypes, with tasks, benchmark settings and the baseline cell.

    Only ``name``, ``models`` and ``precisions`` are required.
    """

    name: str
    models: Sequence[str | Model]
    precisions: Sequence[str]
    compute_dtypes: Sequence[str] = ("fp16",)
    tasks: Sequence[str | Task] = ()
    baseline: str | None = None  # "fp16" or "nf4/bf16" (precision[/compute dtype]); default: see docs
    benchmark: Benchmark = field(default_factory=Benchmark)
    perplexity: Perplexity | None = None
    resources: Resources = field(default_factory=Resources)
    precision_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_fewshot: int | None = None  # study-level default for tasks
    limit: int | float | None = None  # study-level default for tasks
    eval_batch_size: int | str = "auto"
    seed: int = 0
    kl: KLSettings | bool | None = True  # KL divergence to the baseline: True (defaults), KLSettings(...), False
    description: str = ""

    def __post_init__(self):
        _check(isinstance(self.name, str) and bool(_NAME_RE.match(self.name)),
               f"study.name must be 1-80 characters of letters, digits, '_', '.', '-', got {self.name!r}")
        # models
        _check(isinstance(self.models, (list, tuple)) and len(self.models) > 0,
               f"study.models must be a non-empty list of hub ids, local folders or Model(...), got {self.models!r}")
        models = []
        for m in self.models:
            _check(isinstance(m, (str, Model)), f"study.models entries must be strings or Model(...), got {m!r}")
            models.append(Model(m) if isinstance(m, str) else m)
        keys = [(m.id, m.revision) for m in models]
        _check(len(set(keys)) == len(keys), f"study.models has duplicates: {[m.id for m in models]}")
        labels = [m.name for m in models]
        _check(len(set(labels)) == len(labels), f"study.models: two models share the label(s) "
               f"{sorted({l for l in labels if labels.count(l) > 1})}; give them distinct Model(..., label=...)")
        object.__setattr__(self, "models", tuple(models))
        # precisions
        _check(isinstance(self.precisions, (list, tuple)) and len(self.precisions) > 0
               and all(isinstance(p, str) for p in self.precisions),
               f"study.precisions must be a non-empty list of precision names ({', '.join(_precisions.REGISTRY)}), got {self.precisions!r}")
        for p in self.precisions:
            _precisions.get(p)
        _check(len(set(self.precisions)) == len(self.precisions), f"study.precisions has duplicates: {list(self.precisions)}")
        object.__setattr__(self, "precisions", tuple(self.precisions))
        # compute dtypes
        cds = self.compute_dtypes
        _check(isinstance(cds, (list, tuple)) and len(cds) > 0 and all(isinstance(c, str) for c in cds),
               f"study.compute_dtypes must be a non-empty list of {', '.join(_precisions.COMPUTE_DTYPES)}, got {cds!r}")
        for c in cds:
            _check(c in _precisions.COMPUTE_DTYPES, f"unknown compute dtype {c!r}; allowed: {', '.join(_precisions.COMPUTE_DTYPES)}")
        _check(len(set(cds)) == len(cds), f"study.compute_dtypes has duplicates: {list(cds)}")
        object.__setattr__(self, "compute_dtypes", tuple(cds))
        # tasks
        _check(isinstance(self.tasks, (list, tuple)), f"study.tasks must be a list of lm-eval task names or Task(...), got {self.tasks!r}")
        tasks = []
        for t in self.tasks:
            _check(isinstance(t, (str, Task)), f"study.tasks entries must be task names or Task(...), got {t!r}")
            tasks.append(Task(t) if isinstance(t, str) else t)
        names = [t.name for t in tasks]
        _check(len(set(names)) == len(names), f"study.tasks has duplicates: {names}")
        object.__setattr__(self, "tasks", tuple(tasks))
        # settings objects
        for fname, cls in (("benchmark", Benchmark), ("resources", Resources)):
            _check(isinstance(getattr(self, fname), cls), f"study.{fname} must be {cls.__name__}(...), got {getattr(self, fname)!r}")
        _check(self.perplexity is None or isinstance(self.perplexity, Perplexity),
               f"study.perplexity must be None or Perplexity(path=...), got {self.perplexity!r}")
        _check(isinstance(self.precision_options, dict), f"study.precision_options must be a dict precision -> options, got {self.precision_options!r}")
        for pname, opts in self.precision_options.items():
            _check(pname in self.precisions, f"study.precision_options names {pname!r}, which is not in study.precisions {list(self.precisions)}")
            _check(isinstance(opts, dict), f"study.precision_options[{pname!r}] must be a dict, got {opts!r}")
            _precisions.get(pname).resolve_options(opts)
        _check(self.num_fewshot is None or (_is_int(self.num_fewshot) and self.num_fewshot >= 0),
               f"study.num_fewshot must be an integer >= 0 or None, got {self.num_fewshot!r}")
        _check(self.limit is None or (_is_number(self.limit) and self.limit > 0),
               f"study.limit must be a positive number or None, got {self.limit!r}")
        _check(self.eval_batch_size == "auto" or (_is_int(self.eval_batch_size) and self.eval_batch_size >= 1),
               f"study.eval_batch_size must be 'auto' or an integer >= 1, got {self.eval_batch_size!r}")
        _check(_is_int(self.seed), f"study.seed must be an integer, got {self.seed!r}")
        _check(isinstance(self.kl, (bool, KLSettings)) or self.kl is None,
               f"study.kl must be True, False or KLSettings(...), got {self.kl!r}")
        object.__setattr__(self, "kl", KLSettings() if self.kl is True else (self.kl or None))
        _check(isinstance(self.description, str), f"study.description must be a string, got {self.description!r}")
        self.baseline_cell()  # validates the baseline

    def baseline_cell(self) -> tuple[str, str]:
        """The (precision, effective compute dtype) every trial of a model is compared with.

        Default: the first plain-dtype PyTorch precision (fp32/fp16/bf16) in ``precisions``; if none, the first
        precision with the first compute dtype. (ONNX Runtime precisions fix their dtype too, but they are compared
        with the PyTorch baseline, never made it by default.)
        """
        if self.baseline is None:
            plain = [p for p in self.precisions if not _precisions.get(p).compute_dtype_matters
                     and _precisions.get(p).runtime == "torch"]
            name = plain[0] if plain else self.precisions[0]
            return name, _precisions.get(name).effective_compute_dtype(self.compute_dtypes[0])
        _check(isinstance(self.baseline, str), f"study.baseline must be a string like 'fp16' or 'nf4/bf16', got {self.baseline!r}")
        name, _, cd = self.baseline.partition("/")
        _check(name in self.precisions,
               f"study.baseline {self.baseline!r} names precision {name!r}, which is not in study.precisions {list(self.precisions)}")
        p = _precisions.get(name)
        if cd:
            _check(cd in self.compute_dtypes or (not p.compute_dtype_matters and cd == p.fixed_dtype),
                   f"study.baseline {self.baseline!r} names compute dtype {cd!r}, which is not in study.compute_dtypes {list(self.compute_dtypes)}")
        return name, p.effective_compute_dtype(cd or self.compute_dtypes[0])
