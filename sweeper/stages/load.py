"""Load stage: from_pretrained with the precision's arguments, timed to ready, with what it occupies."""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from .. import precisions
from ..errors import StageError
from ..import_guard import import_precision_library
from ..measure import rss_bytes, synchronize
from ..trials import TrialSpec

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    metrics: list[dict]
    facts: dict = field(default_factory=dict)  # trial row values the load decides (runtime_provider)


def device_capability(device: str) -> tuple[int, int] | None:
    if device != "cuda":
        return None
    import torch

    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def _leaves(t: Any) -> Iterator[Any]:
    """The plain tensors that hold ``t``'s data. torchao's tensor subclasses (Int8Tensor, Int4OpaqueTensor,
    Float8Tensor, ...) are wrappers whose own storage is empty; their packed data and scales are inner tensors named
    by ``__tensor_flatten__``."""
    import torch

    if isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, torch.nn.Parameter) \
            and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name, None)
            if inner is not None:
                yield from _leaves(inner)
    else:
        yield t


def stored_bytes(model) -> int:
    """Bytes the model's parameters and buffers really occupy (packed quantized storage and its scales included)."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        for leaf in _leaves(t):
            st = leaf.untyped_storage()
            key = st.data_ptr()
            if key and key not in seen:
                seen.add(key)
                total += st.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax (and nested state) live beside the weight
        if qs is not None:
            for name in ("absmax", "code"):
                if getattr(qs, name, None) is not None:
                    add(getattr(qs, name))
            nested = getattr(qs, "state2", None)
            if nested is not None and getattr(nested, "absmax", None) is not None:
                add(nested.absmax)
        scb = getattr(t, "SCB", None)  # bitsandbytes int8: per-row scales
        if scb is not None:
            add(scb)
    for module in model.modules():
        meta = getattr(module, "meta", None)  # HQQLinear: scale / zero (and their own quant meta) live in a dict
        if isinstance(meta, dict) and type(module).__name__ == "HQQLinear":
            for v in list(meta.values()) + [x for d in meta.values() if isinstance(d, dict) for x in d.values()]:
                if hasattr(v, "untyped_storage"):
                    add(v)
    return total


def load_tokenizer(spec: TrialSpec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.model.id, revision=spec.model.revision,
                                        trust_remote_code=spec.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _cuda_allocated() -> int:
    """CUDA memory allocated on every GPU the trial sees (one, or the whole GPUs of a trial bigger than one)."""
    import torch

    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def trial_gpus_device_map(spec: TrialSpec, precision) -> dict[str, int]:
    """A trial of several whole GPUs: its layers spread over exactly the GPUs Ray gave it (visible as 0..n-1)."""
    import torch

    from ..resources import spans_gpus

    n = int(spec.gpu_share)
    if not spans_gpus(precision):
        raise StageError(f"{spec.precision} loads onto one GPU; this trial holds {n}", "PrecisionUnsupported")
    if torch.cuda.device_count() < n:
        raise StageError(f"the trial holds {n} GPUs but sees {torch.cuda.device_count()} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})", "GpuPlacement")
    return device_map(spec, precision, [torch.cuda.get_device_properties(i).total_memory for i in range(n)])


def device_map(spec: TrialSpec, precision, gpu_memory_bytes: list[int]) -> dict[str, int]:
    """accelerate's device map of ``spec``'s model over GPUs 0..len(gpu_memory_bytes)-1, each filled up to its
    memory less the trial's working memory (resources.gpu_max_memory). Built on the meta device (no weights): the
    model from its config, each parameter sized at the precision's storage (quantized linear layers) or the compute
    dtype (embeddings, norms, lm head, which the quantizers keep). A split that would put anything off those GPUs
    (accelerate spills to "disk") is refused: a trial never offloads."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import CustomDtype, get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..resources import gpu_max_memory, model_shape

    compute = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec.compute_dtype]
    bpp = precision.bytes_per_param
    quantized = torch.float32 if bpp >= 3 else compute if bpp >= 1.5 else torch.int8 if bpp >= 0.75 else CustomDtype.INT4
    cfg = AutoConfig.from_pretrained(spec.model.id, revision=spec.model.revision,
                                     trust_remote_code=spec.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=compute, trust_remote_code=spec.model.trust_remote_code)
    model.tie_weights()
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"
              and not name.endswith(".lm_head")}
    kept = {name: compute for name, _ in model.named_parameters() if name.rsplit(".", 1)[0] not in linear}
    max_memory = gpu_max_memory(spec, model_shape(spec.model), gpu_memory_bytes)
    split = dict(dtype=quantized, special_dtypes=kept, no_split_module_classes=model._no_split_modules)
    # balanced over the GPUs, as transformers' device_map="auto" does: a pinned trial that would fit fewer GPUs
    # still spreads over all of its own (and each holds a share of the KV cache)
    balanced = get_balanced_memory(model, max_memory=max_memory, **split)
    dmap = infer_auto_device_map(model, max_memory={d: min(balanced[d], m) for d, m in max_memory.items()}, **split)
    off = sorted({str(d) for d in dmap.values() if d not in max_memory})
    if off:
        raise StageError(f"{spec.cell} does not fit {len(max_memory)} GPUs of {min(gpu_memory_bytes) / 1e9:.0f} GB "
                         f"(accelerate's split puts part of it on {', '.join(off)})", "OutOfMemory")
    return dmap


def _checkpoint_cache(store: Any) -> tuple[Any, Any]:
    """Where a trial's calibrated / ONNX checkpoints are cached: (local folder, object-store mirror or None). A
    results store gives its ``cache_dir`` and ``cache_mirror``; a store without them (a trial off the launching node
    commits through a RemoteStore), its ``root``; no store, (None, None)."""
    return getattr(store, "cache_dir", getattr(store, "root", None)), getattr(store, "cache_mirror", None)


def load_model(spec: TrialSpec, device: str, store: Any = None) -> LoadedModel:
    """Load the trial's model at its precision; metrics: load_s, footprint_bytes, allocated_bytes, weights_bytes.

    ``store`` (the trial's ResultsStore) is where calibrated precisions cache their quantized checkpoints
    (``<results>/quantized/``); they add ``calibration_s`` (0 when the checkpoint was reused) and
    ``calibration_cache_hit``. For on-load (torchao, bitsandbytes) and post-load (HQQ) methods, quantizing is part
    of ``load_s``; for calibrated ones ``load_s`` is loading the cached checkpoint, and calibration is timed apart.
    """
    import torch
    from transformers import AutoModelForCausalLM

    precision = precisions.get(spec.precision)
    problem = precision.hardware_problem(device, device_capability(device), spec.compute_dtype,
                                         spec.precision_options)
    if problem:
        raise StageError(problem, "PrecisionUnsupported")
    # the quantization library's first import in this process is not part of the load (seconds on a fresh worker);
    # before the kwargs, whose build imports torchao
    library_import_s = import_precision_library(precision.library)
    if precision.runtime == "onnxruntime":
        return load_onnx(spec, precision, device, store, library_import_s)
    kwargs = precision.from_pretrained_kwargs(spec.compute_dtype, spec.precision_options, device)
    if device == "cuda" and spec.gpu_share > 1:
        kwargs["device_map"] = trial_gpus_device_map(spec, precision)
    elif device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    tokenizer = load_tokenizer(spec)
    metrics: list[dict] = []
    checkpoint = None
    if precision.calibrated:
        from ..quantize import calibrated

        opts = precision.resolve_options(spec.precision_options)
        checkpoint, meta, hit = calibrated.ensure_checkpoint(spec, opts, device, tokenizer, *_checkpoint_cache(store))
        metrics += [
            {"stage": "load", "metric": "calibration_s", "value": 0.0 if hit else float(meta["calibration_s"]),
             "n": 1, "unit": "s"},
            {"stage": "load", "metric": "calibration_cache_hit", "value": float(hit), "unit": "bool"},
            {"stage": "load", "metric": "calibration_tokens", "value": float(meta["calibration_tokens"]),
             "unit": "tokens"},
        ]
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = _cuda_allocated()
    else:
        before = rss_bytes()
    t0 = time.perf_counter()
    if checkpoint is not None:
        model = calibrated.load_quantized(spec, opts, device, checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.model.id, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code, **kwargs)
        if precision.post_load is not None:
            model = precision.post_load(model, spec.compute_dtype,
                                        precision.resolve_options(spec.precision_options), device)
    model.eval()
    synchronize(device)
    load_s = time.perf_counter() - t0
    allocated = (_cuda_allocated() if device == "cuda" else rss_bytes()) - before
    n_params = sum(p.numel() for p in model.parameters())
    unit = "bytes (cuda allocated)" if device == "cuda" else "bytes (rss delta)"
    metrics = [
        {"stage": "load", "metric": "load_s", "value": load_s, "n": 1, "unit": "s"},
        # the model's own report: torchao subclasses count at their unquantized size here
        {"stage": "load", "metric": "footprint_bytes", "value": float(model.get_memory_footprint()), "unit": "bytes"},
        {"stage": "load", "metric": "weights_bytes", "value": float(stored_bytes(model)), "unit": "bytes"},
        {"stage": "load", "metric": "allocated_bytes", "value": float(allocated), "unit": unit},
        {"stage": "load", "metric": "num_params", "value": float(n_params), "unit": "count"},
        # what this process spent importing the precision's library before the clock (0 once it is imported)
        {"stage": "load", "metric": "library_import_s", "value": library_import_s, "n": 1, "unit": "s"},
    ] + metrics
    log.info("loaded %s in %.2fs", spec.cell, load_s)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, metrics=metrics)


def load_onnx(spec: TrialSpec, precision: precisions.Precision, device: str, store: Any,
              library_import_s: float) -> LoadedModel:
    """An ONNX Runtime precision: the cached export (made first if absent), an ORT session on it.

    Metrics as for PyTorch models, measured on what ORT holds: ``load_s`` is creating the session (graph optimisation
    included), ``weights_bytes`` and ``footprint_bytes`` the bytes of the ONNX initializers, ``allocated_bytes`` this
    process's RSS growth; plus the export's (and int8 quantization's) time and cache hit. The session's inputs and
    outputs are host arrays and ``session.run`` returns only when they are ready, so the stages time it with the host
    clock and its peak memory is this process's RSS (``device`` "cpu"), even with ``CUDAExecutionProvider``, whose
    arena is then not in the peak (docs/measurement.md)."""
    from .. import ort_model
    from ..quantize import onnx_export

    tokenizer = load_tokenizer(spec)
    folder, meta, metrics = onnx_export.ensure_model(spec, precision.onnx_int8, *_checkpoint_cache(store))
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    model = ort_model.load(folder, meta, spec.model.id, spec.model.revision, spec.model.trust_remote_code, device)
    load_s = time.perf_counter() - t0
    allocated = rss_bytes() - before
    weights = float(onnx_export.weight_bytes(folder))
    metrics = [
        {"stage": "load", "metric": "load_s", "value": load_s, "n": 1, "unit": "s"},
        {"stage": "load", "metric": "footprint_bytes", "value": weights, "unit": "bytes (onnx initializers)"},
        {"stage": "load", "metric": "weights_bytes", "value": weights, "unit": "bytes (onnx initializers)"},
        {"stage": "load", "metric": "allocated_bytes", "value": float(allocated), "unit": "bytes (rss delta)"},
        {"stage": "load", "metric": "num_params", "value": float(meta["num_params"]), "unit": "count"},
        {"stage": "load", "metric": "library_import_s", "value": library_import_s, "n": 1, "unit": "s"},
    ] + metrics
    log.info("loaded %s (ONNX Runtime, %s) in %.2fs", spec.cell, model.provider, load_s)
    return LoadedModel(model=model, tokenizer=tokenizer, device="cpu", metrics=metrics,
                       facts={"runtime_provider": model.provider})
