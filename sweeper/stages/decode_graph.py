"""Kernel-level decode speed: a static KV cache and one decode step captured as a CUDA graph, replayed.

HF eager ``generate`` at batch 1 is bound by Python and kernel launches (about 15 tokens/s on an H100 for 0.5B and 8B
models alike), so it says little about the quantized kernels. Here the decode step (embedding -> logits -> greedy
next token -> position + 1) is captured once into a CUDA graph over a transformers ``StaticCache`` and replayed, so
the time is the GPU's time for the step. This avoids ``torch.compile`` (whose static-cache ``generate`` path crashed
on the GPU image) and works for any model whose step has no host synchronisation; where capture fails (e.g.
bitsandbytes LLM.int8's outlier split needs the host), the reason is recorded instead of a number.

The roofline is weight bytes read per step over the measured device bandwidth (a large device-to-device copy,
bytes read + written over time): the fastest a memory-bound batch-1 decode can go.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _step_inputs(model, prompt_ids, new_tokens: int):
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_ids.shape[1] + new_tokens + 1)
    n = prompt_ids.shape[1]
    pos = torch.arange(n, device=prompt_ids.device)
    out = model(input_ids=prompt_ids, position_ids=pos.unsqueeze(0), cache_position=pos, past_key_values=cache,
                use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)  # (1, 1)
    cur = torch.tensor([n], device=prompt_ids.device)
    return cache, tok, cur


def _rewind(cache, cur, pos: int) -> None:
    """Set the decode position back to ``pos``: the step's position tensor and, where the cache keeps its own write
    position (transformers 5.17's StaticLayer.cumulative_length, a device tensor that ``update`` advances and that
    ignores ``cache_position``), that counter too; the cache rows after ``pos`` are simply overwritten."""
    import torch

    cur.fill_(pos)
    for layer in getattr(cache, "layers", []):
        counter = getattr(layer, "cumulative_length", None)
        if torch.is_tensor(counter):
            counter.fill_(pos)


def _make_step(model, cache, tok, cur):
    def step():
        logits = model(input_ids=tok, position_ids=cur.unsqueeze(0), cache_position=cur, past_key_values=cache,
                       use_cache=True).logits
        tok.copy_(logits[:, -1:].argmax(-1))
        cur.add_(1)

    return step


def static_greedy_tokens(model, prompt_ids, new_tokens: int) -> list[int]:
    """Greedy tokens from the static-cache step function, without a graph (checks the step against ``generate``)."""
    import torch

    with torch.inference_mode():
        cache, tok, cur = _step_inputs(model, prompt_ids, new_tokens)
        step = _make_step(model, cache, tok, cur)
        out = [int(tok.item())]
        for _ in range(new_tokens - 1):
            step()
            out.append(int(tok.item()))
    return out


_BANDWIDTH: dict[int, float] = {}  # device index -> measured bytes/s (one measurement per process and GPU)


def measured_bandwidth_bytes_per_s(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of the current GPU.

    ``nbytes`` is the total of both buffers (default 1 GiB: 512 MiB each, ten times an H100's 50 MB L2, and small
    enough to fit a trial's memory share); measured once per process and GPU, after a warm-up copy.
    """
    import torch

    dev = torch.cuda.current_device()
    if dev in _BANDWIDTH:
        return _BANDWIDTH[dev]
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3
    del a, b
    torch.cuda.empty_cache()
    _BANDWIDTH[dev] = 2 * (nbytes // 2) * repeats / secs
    return _BANDWIDTH[dev]


def graph_decode(model, prompt_ids, new_tokens: int, repeats: int, weight_bytes: float,
                 bandwidth: float | None) -> tuple[list[dict], str | None]:
    """Metric rows (decode_graph_tok_s, roofline numbers) or ([], reason) where capture is not possible."""
    import torch

    from ..measure import Summary

    if prompt_ids.device.type != "cuda":
        return [], "CUDA graphs need a CUDA device"
    try:
        with torch.inference_mode():
            cache, tok, cur = _step_inputs(model, prompt_ids, new_tokens)
            step = _make_step(model, cache, tok, cur)
            start_pos = int(cur.item())
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            per_token_ms = []
            steps = max(1, new_tokens - 8)
            for _ in range(repeats):
                _rewind(cache, cur, start_pos)  # else the cache's own write position runs past max_cache_len
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(steps):
                    graph.replay()
                b.record()
                torch.cuda.synchronize()
                per_token_ms.append(a.elapsed_time(b) / steps)
            del graph
    except Exception as e:  # capture is not possible for this precision's kernels: say why
        # a failed capture surfaces as capture_end's "operation failed due to a previous error during capture";
        # the first error raised inside the captured step is the reason
        first = e
        while first.__context__ is not None and first.__context__ is not first:
            first = first.__context__
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        why = f"{type(first).__name__}: {str(first).splitlines()[0][:300]}" if str(first) else type(first).__name__
        if first is not e:
            why += f" (then {type(e).__name__}: {str(e).splitlines()[0][:150]})"
        return [], why
    rows = [Summary(per_token_ms).metric("benchmark", "decode_graph_tok_s", "tokens/s", 1, transform=lambda ms: 1e3 / ms)]
    if bandwidth:
        roof = bandwidth / weight_bytes
        tok_s = rows[0]["value"]
        rows += [
            {"stage": "benchmark", "metric": "decode_roofline_tok_s", "batch_size": 1, "value": roof,
             "unit": "tokens/s (weight bytes / measured bandwidth)"},
            {"stage": "benchmark", "metric": "decode_roofline_fraction", "batch_size": 1, "value": tok_s / roof,
             "unit": "fraction"},
            {"stage": "benchmark", "metric": "device_bandwidth_bytes_per_s", "value": bandwidth, "unit": "bytes/s"},
        ]
    return rows, None
