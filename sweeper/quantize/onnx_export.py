"""ONNX export of a causal LM with past key/values, ONNX Runtime's dynamic int8 quantization of it, both cached.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), the one maintained exporter that works with
transformers 5 (docs/precisions.md says what else was tried). The exported graph is a thin module around the
transformers model (:class:`_WithFlatCache`): inputs ``input_ids``, ``attention_mask``, ``position_ids`` and
``past.<layer>.key/value``; outputs ``logits`` and ``present.<layer>.key/value`` (past + new positions). Batch,
sequence and past lengths are dynamic; a past of length 0 is the first forward (and every forward without a cache).

INT8: ``onnxruntime.quantization.quantize_dynamic`` of that fp32 export, int8 weights per output channel
(``per_channel=True, weight_type=QInt8``); activations are quantized to uint8 per tensor at run time.

Cache (as calibrated checkpoints, :mod:`.calibrated`): ``<cache root>/<key>/model.onnx`` (+ ``model.onnx.data`` for
weights stored outside the graph) and ``meta.json`` written last; the key hashes the model's identity, the method and
the exporter's versions. A relaunch or a second study sharing the cache root (``SWEEPER_QUANTIZED_CACHE``) reuses it.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .calibrated import cache_root, ensure_folder, key_of

log = logging.getLogger(__name__)

OPSET = 18
MODEL_FILE = "model.onnx"
# exports this process has made (tests count them: a relaunch must reuse the cached export, not export again)
EXPORTS = [0]


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def export_identity(spec: Any) -> dict[str, Any]:
    from ..trials import model_identity

    return {**model_identity(spec.model, spec.model_fingerprint), "method": "onnx-export-fp32", "opset": OPSET,
            "torch": _version("torch"), "transformers": _version("transformers"), "onnxscript": _version("onnxscript"),
            "onnx": _version("onnx")}


def int8_identity(spec: Any) -> dict[str, Any]:
    return {**export_identity(spec), "method": "ort-quantize-dynamic-int8-per-channel",
            "onnxruntime": _version("onnxruntime")}


def _flat_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _cache_of(out: Any) -> Any:
    from ..ort_model import CACHE_FIELD

    return getattr(out, CACHE_FIELD)


def _kv_layout(model: Any) -> tuple[int, list[tuple[int, int]]]:
    """(layers, [(kv heads, head dim)] per layer) read from a 2-token forward: any architecture's own cache shapes."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = _cache_of(out).layers
    return len(layers), [(int(l.keys.shape[1]), int(l.keys.shape[3])) for l in layers]


def export_fp32(spec: Any, out_dir: Path, ident: dict[str, Any]) -> dict[str, Any]:
    """Export the model in fp32 with past key/values into ``out_dir``; returns the meta written beside it."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from ..ort_model import CACHE_FIELD

    EXPORTS[0] += 1
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec.model.id, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code,
        dtype=torch.float32)
    model.eval()
    n_layers, kv = _kv_layout(model)
    n_params = sum(p.numel() for p in model.parameters())

    class _WithFlatCache(torch.nn.Module):
        """The model with its cache as flat tensors in and out (ONNX has no cache object)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.inner.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{CACHE_FIELD: cache})
            flat = []
            for layer in _cache_of(out).layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    # sizes above 1 everywhere: torch.export specialises dimensions of size 0 and 1
    b, s, p = 2, 3, 4
    ids = torch.randint(3, 100, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = tuple(torch.zeros(b, h, p, d) for h, d in kv for _ in range(2))
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    with torch.no_grad():
        torch.onnx.export(_WithFlatCache(model), (ids, mask, pos, *past), str(out_dir / MODEL_FILE), dynamo=True,
                          dynamic_shapes=shapes, opset_version=OPSET, optimize=True, external_data=True,
                          input_names=["input_ids", "attention_mask", "position_ids", *_flat_names(n_layers, "past")],
                          output_names=["logits", *_flat_names(n_layers, "present")])
    meta = {**ident, "layers": n_layers, "kv_heads": [h for h, _ in kv], "head_dims": [d for _, d in kv],
            "num_params": n_params, "export_s": time.perf_counter() - t0,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    del model
    gc.collect()
    return meta


def quantize_int8(source: Path, out_dir: Path, source_meta: dict[str, Any], ident: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's dynamic quantization of the fp32 export: int8 weights per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(source / MODEL_FILE), str(out_dir / MODEL_FILE), per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=True)
    keep = ("layers", "kv_heads", "head_dims", "num_params", "export_s")
    return {**ident, **{k: source_meta[k] for k in keep}, "quantize_s": time.perf_counter() - t0,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _ensure(root: Path, ident: dict[str, Any], make, mirror: Any = None) -> tuple[Path, dict[str, Any], bool]:
    """The cached folder for ``ident``, made by ``make(tmp_dir) -> meta`` if absent; (path, meta, cache hit)."""
    def make_with_meta(tmp: Path) -> None:
        (tmp / "meta.json").write_text(json.dumps(make(tmp), indent=2))  # last: its presence means a whole model

    final, hit = ensure_folder(root, key_of(ident), make_with_meta, mirror)
    return final, json.loads((final / "meta.json").read_text()), hit


def ensure_model(spec: Any, int8: bool, store_root: str | os.PathLike | None,
                 mirror: Any = None) -> tuple[Path, dict[str, Any], list[dict]]:
    """The ONNX model folder of this trial (exported and quantized first if no trial has); (folder, meta, metric rows).

    Metric rows: ``export_s`` (0 when the export was reused), ``export_cache_hit``; for int8 also ``quantize_s`` and
    ``quantize_cache_hit``. The timings of the run that made a cached model stay in its meta.json."""
    root = cache_root(store_root)
    ident = export_identity(spec)
    log.info("ONNX export of %s (cache %s)", spec.cell, root)
    fp32_dir, meta, hit = _ensure(root, ident, lambda tmp: export_fp32(spec, tmp, ident), mirror)
    rows = [{"stage": "load", "metric": "export_s", "value": 0.0 if hit else float(meta["export_s"]), "n": 1,
             "unit": "s"},
            {"stage": "load", "metric": "export_cache_hit", "value": float(hit), "unit": "bool"}]
    if not int8:
        return fp32_dir, meta, rows
    qident = int8_identity(spec)
    q_dir, qmeta, qhit = _ensure(root, qident, lambda tmp: quantize_int8(fp32_dir, tmp, meta, qident), mirror)
    rows += [{"stage": "load", "metric": "quantize_s", "value": 0.0 if qhit else float(qmeta["quantize_s"]), "n": 1,
              "unit": "s"},
             {"stage": "load", "metric": "quantize_cache_hit", "value": float(qhit), "unit": "bool"}]
    return q_dir, qmeta, rows


def weight_bytes(folder: Path) -> int:
    """Bytes of the graph's initializers (the weights, int8 ones with their scales and zero points), wherever stored."""
    import onnx

    proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    total = 0
    for init in proto.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total
