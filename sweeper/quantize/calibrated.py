"""Calibrated 4-bit (AWQ through torchao.prototype.awq): quantize once per identity, cache, reuse.

Identity of a checkpoint (its cache key): the model (id or absolute folder, revision, folder fingerprint), the method,
its settings (group size, calibration samples and length, scale search size, the calibration text's content hash), the
compute dtype, the device kind (the int4 packing differs between CPU and CUDA) and the torch / torchao versions (the
packed format belongs to them). Layout::

    <cache root>/<key>/weights.pt   the quantized linear weights (torchao tensor subclasses, torch.save)
    <cache root>/<key>/meta.json    what was quantized, on which text, and how long calibration took

The cache root is ``<results>/quantized`` unless ``SWEEPER_QUANTIZED_CACHE`` names another folder (one shared by
several studies' results, so a second study reuses the first one's checkpoint). A checkpoint appears atomically
(written under a temporary name, then renamed) and under a file lock, so concurrent trials calibrate it once.

Only the quantized linear weights are cached: AWQ in torchao keeps its equalization scales inside each quantized weight
(``act_pre_scale``) and changes no other tensor, so the other modules are exactly the base model's and are loaded from
it.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..calibration_data import calibration_file
from ..trials import file_fingerprint

log = logging.getLogger(__name__)

CACHE_ENV = "SWEEPER_QUANTIZED_CACHE"


def cache_root(store_root: str | os.PathLike | None) -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if store_root is None:
        raise RuntimeError(f"a calibrated precision needs a cache folder: pass the results store or set {CACHE_ENV}")
    return Path(store_root) / "quantized"


def identity(spec: Any, opts: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    from ..trials import model_identity
    from . import torchao_compat

    calib = calibration_file(opts)
    return {
        **model_identity(spec.model, spec.model_fingerprint),
        "method": "awq-int4-weight-only", "group_size": int(opts["group_size"]),
        "calib_sha": file_fingerprint(calib), "calib_samples": int(opts["calib_samples"]),
        "calib_seq_len": int(opts["calib_seq_len"]), "scale_search": int(opts["scale_search"]),
        "compute_dtype": spec.compute_dtype, "device": device,
        "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]), "torchao": torchao_compat.version(),
    }


def key_of(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # other trials wanting the same checkpoint wait here, then find it done
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _calibration_batches(tokenizer: Any, path: Path, samples: int, seq_len: int) -> list:
    """``samples`` consecutive, non-overlapping windows of ``seq_len`` tokens from the start of the text file."""
    need = samples * seq_len
    text, chars = "", 1 << 16
    with open(path, encoding="utf-8", errors="replace") as fh:
        full = fh.read()
    while True:  # tokenize only as much text as the windows need
        text = full[:chars]
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() >= need or chars >= len(full):
            break
        chars *= 2
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text {str(path)!r} has {ids.numel()} tokens, fewer than calib_seq_len={seq_len}")
    n = min(samples, ids.numel() // seq_len)
    if n < samples:
        log.warning("calibration text has only %d windows of %d tokens (asked for %d)", n, seq_len, samples)
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(n)]


def _device_map(device: str) -> dict[str, Any]:
    if device != "cuda":
        return {}
    import torch

    return {"device_map": {"": torch.cuda.current_device()}}


def calibrate(spec: Any, opts: dict[str, Any], device: str, tokenizer: Any, out_dir: Path, ident: dict[str, Any]) -> float:
    """Load the base model, run AWQ's scale search on the calibration windows, save the quantized linear weights."""
    import torch
    from torchao.prototype.awq import AWQConfig
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    from ..precisions import torch_dtype
    from . import torchao_compat as ao

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        spec.model.id, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code,
        dtype=torch_dtype(spec.compute_dtype), **_device_map(device))
    model.eval()
    base = ao.int4_weight_only(int(opts["group_size"]), device)
    quantize_(model, AWQConfig(base, step="prepare", scale_search_space_size=int(opts["scale_search"])),
              filter_fn=ao.linear_filter)
    batches = _calibration_batches(tokenizer, calibration_file(opts), int(opts["calib_samples"]),
                                   int(opts["calib_seq_len"]))
    target = next(model.parameters()).device
    with torch.no_grad():
        for ids in batches:
            model(ids.to(target), use_cache=False)
    quantize_(model, AWQConfig(base, step="convert", scale_search_space_size=int(opts["scale_search"])),
              filter_fn=None)  # convert touches only the observed linears
    weights = {f"{fqn}.weight": mod.weight.data for fqn, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and type(mod.weight.data) is not torch.Tensor}
    if not weights:
        raise RuntimeError("AWQ quantized no linear layer (group_size must divide every in_features)")
    torch.save(weights, out_dir / "weights.pt")
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    meta = {**ident, "layers": len(weights), "calibration_windows": len(batches),
            "calibration_tokens": sum(int(b.numel()) for b in batches), "calibration_file": str(calibration_file(opts)),
            "calibration_s": seconds, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    del model, weights
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return seconds


def ensure_folder(root: Path, name: str, make: Callable[[Path], Any], mirror: Any = None) -> tuple[Path, bool]:
    """``root/name``, made first by ``make(tmp folder)`` under a file lock if absent; (path, cache hit).

    ``make`` writes ``meta.json`` last, and the folder is renamed into place whole: a present ``meta.json`` means a
    whole folder, and concurrent trials wanting it make it once. ``mirror`` (a results URI's ``cache_mirror``): a
    folder the object store holds is fetched instead of made (a hit), and one made here is published to it."""
    final = root / name
    with _locked(root / f".{name}.lock"):
        if (final / "meta.json").is_file():
            return final, True
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            hit = mirror is not None and mirror.fetch(name, tmp)
            if not hit:
                make(tmp)
                if mirror is not None:
                    mirror.publish(name, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed export or calibration leaves nothing behind
            raise
        os.replace(tmp, final)
        return final, hit


def ensure_checkpoint(spec: Any, opts: dict[str, Any], device: str, tokenizer: Any,
                      store_root: str | os.PathLike | None, mirror: Any = None) -> tuple[Path, dict[str, Any], bool]:
    """The checkpoint folder for this trial's identity, calibrating it first if no trial has; (path, meta, cache hit).
    ``mirror``: see :func:`ensure_folder`."""
    ident = identity(spec, opts, device)
    root = cache_root(store_root)
    log.info("AWQ checkpoint of %s under %s", spec.cell, root)
    final, hit = ensure_folder(root, key_of(ident), lambda tmp: calibrate(spec, opts, device, tokenizer, tmp, ident),
                               mirror)
    return final, json.loads((final / "meta.json").read_text()), hit


def load_quantized(spec: Any, opts: dict[str, Any], device: str, checkpoint: Path) -> Any:
    """The base model in the compute dtype with its linear weights replaced by the checkpoint's quantized ones."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..precisions import torch_dtype
    from . import torchao_compat as ao

    # Importing the int4 tensor's module registers it with torch.load(weights_only=True), which then accepts it.
    ao.int4_weight_only(int(opts["group_size"]), device)

    model = AutoModelForCausalLM.from_pretrained(
        spec.model.id, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code,
        dtype=torch_dtype(spec.compute_dtype), **_device_map(device))
    location = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    weights = torch.load(checkpoint / "weights.pt", map_location=location, weights_only=True)
    for name, tensor in weights.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        module.weight = torch.nn.Parameter(tensor, requires_grad=False)  # the fp weight is freed here
    del weights
    gc.collect()
    return model
