"""Benchmark stage: prefill latency, decode speed at batch 1, generation throughput per batch size, peak memory.

Definitions (docs/measurement.md):
- prefill_ms: one forward pass over ``prompt_tokens`` tokens at batch 1 (KV cache on), median of ``repeats``;
- decode_ms_per_token / decode_tok_s: time between consecutive generation steps of a batch-1 ``generate`` of
  ``new_tokens`` tokens, measured by a logits processor that marks every step (the prefill step excluded);
- sequence_ms: the whole batch-1 ``generate`` (prefill + all new tokens);
- throughput_tok_s at batch b: b * new_tokens / wall time of ``generate`` at batch b;
- with ``kv_cache`` containing False, the decode, sequence and throughput measurements are repeated with
  ``use_cache=False`` (every new token recomputes the whole sequence) and stored as the same metrics suffixed
  ``_no_kv`` (decode_tok_s_no_kv, ...); prefill is one forward either way, measured once;
- peak_memory_bytes: this process's peak over the stage (CUDA max allocated, or peak RSS on CPU);
- decode_graph_tok_s (CUDA only): a static-cache decode step replayed as a CUDA graph, with its roofline
  (see decode_graph.py).
The whole stage runs inside the device's timing lease when one is given: no neighbour's forward pass overlaps it.
Generation is greedy and forced to exactly ``new_tokens`` tokens (min_new_tokens), prompts are random token ids
from a fixed seed, so every precision does the same amount of work.
"""
from __future__ import annotations

import logging

from ..errors import StageError
from ..measure import LatencyRecorder, PeakMemory, Summary, synchronize
from ..study import Benchmark

log = logging.getLogger(__name__)


def _prompts(tokenizer, model, batch: int, length: int, seed: int):
    import torch

    vocab = min(len(tokenizer), model.config.get_text_config().vocab_size)
    special = set(tokenizer.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    for s in special:  # keep special tokens (eos, pad) out of the prompt
        ids[ids == s] = (s + 7) % vocab if (s + 7) % vocab not in special else 3
    return ids


def _step_marker(recorder: LatencyRecorder):
    from transformers import LogitsProcessor

    class StepMarker(LogitsProcessor):
        def __call__(self, input_ids, scores):
            recorder.mark()
            return scores

    return StepMarker()


def run_benchmark(model, tokenizer, settings: Benchmark, device: str, seed: int = 0, lease=None,
                  weight_bytes: float | None = None, no_graph_capture: str | None = None) -> tuple[list[dict], dict]:
    """Metric rows of the benchmark stage, and row facts (peak memory kind, timing wait, graph decode problems).

    ``no_graph_capture``: the precision's reason why its decode step cannot be captured; the capture is skipped (a
    failed capture costs time and leaves the CUDA context in a state we do not want to reuse)."""
    from contextlib import nullcontext

    facts: dict = {"timing_exclusive": lease is not None}
    # the warm-up is not timed, so it runs before the exclusive section, beside neighbours: they wait only while
    # something is timed (a process's first generate also pays one-off set-up, seconds on a fresh worker)
    _warm_up(model, tokenizer, settings, seed)
    with (lease.exclusive() if lease is not None else nullcontext(0.0)) as waited:
        facts["timing_wait_s"] = waited
        rows, kind = _measure(model, tokenizer, settings, device, seed)
        facts["peak_memory_kind"] = kind
        if settings.graph_decode and device == "cuda" and no_graph_capture:
            facts["graph_decode_error"] = f"not attempted: {no_graph_capture}"
        elif settings.graph_decode and device == "cuda":
            from .decode_graph import graph_decode, measured_bandwidth_bytes_per_s

            one = _prompts(tokenizer, model, 1, settings.prompt_tokens, seed).to(model.device)
            g_rows, problem = graph_decode(model, one, settings.new_tokens, settings.repeats, weight_bytes or 0.0,
                                           measured_bandwidth_bytes_per_s() if weight_bytes else None)
            rows += g_rows
            facts["graph_decode_error"] = problem
        elif settings.graph_decode:  # every row without a kernel-level number says why (docs/measurement.md)
            facts["graph_decode_error"] = f"not measured: CUDA graphs need a CUDA device (this trial ran on {device})"
        else:
            facts["graph_decode_error"] = "not measured: Benchmark(graph_decode=False)"
    return rows, facts


def _generate_kwargs(settings: Benchmark, tokenizer, use_cache: bool = True) -> dict:
    return dict(max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=None, use_cache=use_cache)


def _suffix(use_cache: bool) -> str:
    """The metric name suffix of a KV-cache setting: none with the cache (the default), ``_no_kv`` without."""
    return "" if use_cache else "_no_kv"


def _warm_up(model, tokenizer, settings: Benchmark, seed: int) -> None:
    """``settings.warmup`` untimed generates at batch 1 per KV-cache setting, as the timed ones run."""
    import torch

    if not settings.warmup:
        return
    with torch.inference_mode():
        one = _prompts(tokenizer, model, 1, settings.prompt_tokens, seed).to(model.device)
        for use_cache in settings.kv_cache:
            for _ in range(settings.warmup):
                model.generate(input_ids=one, attention_mask=torch.ones_like(one),
                               **_generate_kwargs(settings, tokenizer, use_cache))


def _measure(model, tokenizer, settings: Benchmark, device: str, seed: int) -> tuple[list[dict], str]:
    import torch

    dev = model.device
    rows: list[dict] = []
    peak = PeakMemory(device)
    with peak.track(), torch.inference_mode():
        one = _prompts(tokenizer, model, 1, settings.prompt_tokens, seed).to(dev)
        mask1 = torch.ones_like(one)
        # prefill
        prefill = []
        for _ in range(settings.repeats):
            rec = LatencyRecorder(device)
            rec.mark()
            out = model(input_ids=one, attention_mask=mask1, use_cache=True)
            rec.mark()
            prefill.extend(rec.elapsed_ms())
            if not torch.isfinite(out.logits[:, -1]).all():
                raise StageError("the model produced NaN/inf logits on the benchmark prompt", "NaNLogits")
            del out
        rows.append(Summary(prefill).metric("benchmark", "prefill_ms", "ms", 1))
        for use_cache in settings.kv_cache:
            rows += _generation(model, tokenizer, settings, device, seed, one, use_cache)
        synchronize(device)
    rows.append({"stage": "benchmark", "metric": "peak_memory_bytes", "value": float(peak.peak_bytes),
                 "unit": f"bytes ({peak.kind})"})
    return rows, peak.kind


def _generation(model, tokenizer, settings: Benchmark, device: str, seed: int, one, use_cache: bool) -> list[dict]:
    """Decode at batch 1 (per-step marks and the whole sequence) and throughput per batch size, with or without the
    KV cache; metric names carry :func:`_suffix`."""
    import torch
    from transformers import LogitsProcessorList

    dev = model.device
    gen_kwargs = _generate_kwargs(settings, tokenizer, use_cache)
    sfx = _suffix(use_cache)
    mask1 = torch.ones_like(one)
    rows: list[dict] = []
    # decode at batch 1: per-step marks from a logits processor, plus the whole sequence
    step_ms, seq_ms = [], []
    for _ in range(settings.repeats):
        steps = LatencyRecorder(device)
        whole = LatencyRecorder(device)
        whole.mark()
        model.generate(input_ids=one, attention_mask=mask1, logits_processor=LogitsProcessorList([_step_marker(steps)]),
                       **gen_kwargs)
        whole.mark()
        deltas = steps.elapsed_ms()
        if deltas:
            step_ms.append(sum(deltas) / len(deltas))
        seq_ms.extend(whole.elapsed_ms())
    if step_ms:
        rows.append(Summary(step_ms).metric("benchmark", f"decode_ms_per_token{sfx}", "ms", 1))
        rows.append(Summary(step_ms).metric("benchmark", f"decode_tok_s{sfx}", "tokens/s", 1,
                                            transform=lambda ms: 1e3 / ms))
    rows.append(Summary(seq_ms).metric("benchmark", f"sequence_ms{sfx}", "ms", 1))
    # throughput per batch size
    for b in settings.batch_sizes:
        if b == 1:
            times = seq_ms
        else:
            ids = _prompts(tokenizer, model, b, settings.prompt_tokens, seed + b).to(dev)
            mask = torch.ones_like(ids)
            times = []
            for _ in range(settings.repeats):
                rec = LatencyRecorder(device)
                rec.mark()
                model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
                rec.mark()
                times.extend(rec.elapsed_ms())
        rows.append(Summary(times).metric("benchmark", f"throughput_tok_s{sfx}", "tokens/s", b,
                                          transform=lambda ms, b=b: b * settings.new_tokens / (ms / 1e3)))
    return rows
