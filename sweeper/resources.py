"""GPU shares from a memory estimate of a trial's peak.

estimate = quantized linear weights at the precision's bytes per parameter
         + what stays unquantized (embeddings, lm head, norms) at the compute dtype
           (the whole model at the compute dtype for precisions that quantize after a full load: HQQ, AWQ)
         + KV cache of the largest benchmark batch at prompt + new tokens
         + logits / activations of the largest forward (prefill, perplexity window, batch decode)
         + a fixed allowance for the CUDA context and allocator slack.
The share is estimate / GPU memory, rounded up to the next 0.05, at least 0.05 and at most 1 (a whole GPU). A trial
whose estimate exceeds one GPU gets whole GPUs of one node instead (:func:`whole_gpus`), and loads across exactly those
(stages/load.py, with :func:`gpu_max_memory` per GPU); one that fits no node of the cluster is refused before the sweep
starts (:func:`share_function`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from . import precisions
from .errors import UserError
from .study import Model, Study

log = logging.getLogger(__name__)

CONTEXT_ALLOWANCE_BYTES = 1.0e9  # CUDA context, cuBLAS workspaces, allocator slack
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    max_positions: int | None = None

    @property
    def linear_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp)

    @property
    def unquantized_params(self) -> int:
        # bitsandbytes keeps the embeddings and the lm head in the compute dtype
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


def model_shape(model: Model) -> ModelShape | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model.id, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as e:  # no network / unknown architecture: the caller falls back to a whole GPU
        log.warning("cannot read the config of %s (%s); its trials get a whole GPU", model.id, e)
        return None
    cfg = cfg.get_text_config()
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    return ModelShape(
        vocab=cfg.vocab_size, hidden=hidden, layers=cfg.num_hidden_layers,
        intermediate=getattr(cfg, "intermediate_size", 4 * hidden), heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )


def estimate_peak_bytes(study: Study, shape: ModelShape, precision: str, compute_dtype: str) -> float:
    return weight_bytes(shape, precision, compute_dtype) + working_bytes(study, shape, compute_dtype)


def weight_bytes(shape: ModelShape, precision: str, compute_dtype: str) -> float:
    """The weights' part of the estimate (at their load peak)."""
    p = precisions.get(precision)
    act = _DTYPE_BYTES[compute_dtype]
    weights = shape.linear_params * p.bytes_per_param + shape.unquantized_params * act
    if p.post_load is not None or p.calibrated:
        # quantized after a full-precision load (HQQ) or calibrated from one (AWQ's first use): the load peaks at
        # the unquantized size, not the quantized one
        weights = max(weights, (shape.linear_params + shape.unquantized_params) * act)
    return weights


def working_bytes(study: Study, shape: ModelShape, compute_dtype: str) -> float:
    """The rest of the estimate: KV cache, logits and activations, CUDA context. ``study`` may be a
    :class:`~sweeper.trials.TrialSpec` (it carries the same benchmark, perplexity and task settings)."""
    act = _DTYPE_BYTES[compute_dtype]
    b = max(study.benchmark.batch_sizes)
    seq = study.benchmark.prompt_tokens + study.benchmark.new_tokens
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * seq * b * act
    windows = [study.benchmark.prompt_tokens]
    if study.perplexity is not None:
        windows.append(study.perplexity.context)
    longest = max(windows)
    # full-sequence logits in fp32 (perplexity / prefill) and hidden activations of the longest forward
    activations = longest * shape.vocab * 4 * 2 + b * longest * shape.intermediate * act * 4
    if study.tasks:
        # lm-eval scores batches of up to the model's context: their logits (fp32) dominate; "auto" probes upward
        # from batch 1 and stops at the trial's memory cap, so only one sequence is budgeted for it
        eb = study.eval_batch_size if isinstance(study.eval_batch_size, int) else 1
        ctx = min(shape.max_positions or 2048, 2048)
        activations = max(activations, eb * ctx * shape.vocab * 4 * 2 + eb * ctx * shape.intermediate * act * 4)
    return kv + activations + CONTEXT_ALLOWANCE_BYTES


def whole_gpus(estimate_bytes: float, working: float, gpu_memory_bytes: float) -> int:
    """Whole GPUs for a trial bigger than one: ceil(estimate / GPU memory), or more where the weights do not fit
    beside the working memory (KV cache, logits, context) that :func:`gpu_max_memory` keeps free on every GPU."""
    n = math.ceil(estimate_bytes / gpu_memory_bytes)
    room = gpu_memory_bytes - working
    if room <= 0:
        return n
    return max(n, math.ceil((estimate_bytes - working) / room - 1e-9))


def gpu_share(estimate_bytes: float, gpu_memory_bytes: float, working: float = 0.0) -> float:
    """A fraction of one GPU (0.05 steps, < 1), 1.0, or a whole number of GPUs when the estimate exceeds one."""
    if estimate_bytes > gpu_memory_bytes:
        return float(whole_gpus(estimate_bytes, working, gpu_memory_bytes))
    share = math.ceil(estimate_bytes / gpu_memory_bytes / 0.05) * 0.05
    return round(min(1.0, max(0.05, share)), 2)


def gpu_max_memory(spec, shape: ModelShape, gpu_memory_bytes: list[int]) -> dict[int, int]:
    """accelerate's ``max_memory`` for a trial spread over GPUs 0..n-1 (the trial's own, as Ray makes them visible):
    each GPU's memory less the trial's working memory, kept free on every GPU because which one holds the KV cache of
    its layers and the logits (the last) or the embedding's activations (the first) depends on the split."""
    working = working_bytes(spec, shape, spec.compute_dtype)
    return {i: int(m - working) for i, m in enumerate(gpu_memory_bytes)}


def spans_gpus(precision: precisions.Precision) -> bool:
    """Whether a trial of this precision can load across several GPUs: not the ones whose quantizer (HQQ) or cached
    checkpoint (AWQ) puts the model on one device, nor ONNX Runtime sessions."""
    return precision.runtime == "torch" and not precision.calibrated and precision.post_load is None


def share_function(gpu_memory_bytes: float, node_gpus: int | None = None):
    """A ``gpu_share_for(study, model, precision, compute_dtype)`` for :func:`sweeper.trials.trial_share`.

    ``node_gpus``: GPUs of the cluster's largest node; a trial that needs more is refused (:class:`UserError`, with
    its estimate and the node) before the sweep starts. ``share_for.estimates`` keeps each cell's estimate (bytes)."""
    shapes: dict[str, ModelShape | None] = {}
    estimates: dict[tuple[str, str, str], float] = {}

    def share_for(study: Study, model: Model, precision: str, compute_dtype: str) -> float:
        if model.id not in shapes:
            shapes[model.id] = model_shape(model)
        shape = shapes[model.id]
        if shape is None:
            return 1.0
        working = working_bytes(study, shape, compute_dtype)
        estimate = weight_bytes(shape, precision, compute_dtype) + working
        estimates[(model.name, precision, compute_dtype)] = estimate
        share = gpu_share(estimate, gpu_memory_bytes, working)
        if share > 1 and not spans_gpus(precisions.get(precision)):
            raise UserError(
                f"{model.name} {precision}/{compute_dtype}: estimated peak {estimate / 1e9:.1f} GB exceeds one GPU of "
                f"{gpu_memory_bytes / 1e9:.0f} GB, and {precision} loads onto one GPU; leave it out for this model or "
                "use larger GPUs")
        if node_gpus is not None and share > node_gpus:
            raise UserError(
                f"{model.name} {precision}/{compute_dtype}: estimated peak {estimate / 1e9:.1f} GB needs {share:g} GPUs "
                f"of {gpu_memory_bytes / 1e9:.0f} GB on one node; the largest node has {node_gpus} x "
                f"{gpu_memory_bytes / 1e9:.0f} GB; use a node with more (or larger) GPUs or a smaller precision")
        return share

    share_for.estimates = estimates
    return share_for


def spread_shares(shares: list[float], gpus: float, max_concurrent: int | None = None) -> list[float]:
    """Raise ``auto`` shares so that trials that all fit at once spread over every GPU instead of sharing one.

    Ray fills one GPU with fractional requests before it uses the next: 8 trials at share 0.05 on a 2-GPU node all
    ran on GPU 0 (benchmarks/gpu/logs/run13_multi_summary.txt: no faster than 1 GPU). With n trials running at once
    and g GPUs, each share becomes at least 1 / ceil(n / g) (to Ray's 0.0001 resolution, rounded down), so exactly
    ceil(n / g) fit on each GPU. Rounding it to the estimate's 0.05 steps would not: 16 trials on 2 GPUs at 0.1 went
    10 + 6 (benchmarks/gpu/logs/run17_multi_auto_summary.txt). A share the memory estimate makes larger stays
    larger; when there are more trials than 0.05-slots nothing changes.
    """
    n = len(shares) if not max_concurrent else min(len(shares), max_concurrent)
    if n == 0 or gpus <= 0:
        return list(shares)
    per_gpu = math.ceil(n / gpus)
    least = math.floor(1e4 / per_gpu + 1e-9) / 1e4
    if least < 0.05:
        return list(shares)
    # whole GPUs (trials bigger than one) keep their count
    return [min(1.0, max(s, least)) if 0 < s < 1 else s for s in shares]


def local_gpus() -> dict[str, int]:
    """This machine's visible GPUs as Ray names them to its workers -> memory in MiB: nvidia-smi's indices, or the
    entries of CUDA_VISIBLE_DEVICES (indices or UUIDs) where it is set; {} where nvidia-smi is missing or finds none,
    or where CUDA_VISIBLE_DEVICES is empty."""
    import subprocess

    cmd = ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    gpus = []  # (index, uuid, MiB)
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[2].isdigit():
            gpus.append((parts[0], parts[1], int(parts[2])))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return {index: mib for index, _, mib in gpus}
    if not visible.strip() or visible.strip() == "NoDevFiles":  # GPUs hidden (as Ray reads it too)
        return {}
    named = {}
    for entry in (v.strip() for v in visible.split(",") if v.strip()):
        match = [mib for index, uuid, mib in gpus if entry == index or (entry.startswith("GPU-") and uuid.startswith(entry))]
        if match:
            named[entry] = match[0]
    return named
