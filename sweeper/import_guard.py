"""Keep transformers from importing an optional package that the trial does not use.

transformers imports hqq when it is installed (for a quantized KV cache the sweep never uses), and hqq's
``torch.compile`` decorators import torch's inductor: 11.5 s of a fresh worker's start on the H100 host
(docs/performance.md, run15), of which torch._dynamo, 6.9 s, is imported by generation anyway. A worker hides hqq
until a trial needs it; hiding is a ``None`` in ``sys.modules``, which ``importlib.util.find_spec`` (transformers'
availability check) reads as "not installed". It is only ever done in Ray workers, never in the user's process.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

HIDEABLE = ("hqq",)


def hide_unless_needed(needed: Iterable[str]) -> None:
    """Hide each package of HIDEABLE that ``needed`` does not name and that is not imported yet; show again (import
    normally) each one that ``needed`` names. sweeper's own hqq code imports hqq directly, so it works after a show
    even where transformers was imported while hqq was hidden."""
    needed = set(needed)
    for name in HIDEABLE:
        if name in needed:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        elif name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def for_precision(name: str) -> None:
    """:func:`hide_unless_needed` for a trial of precision ``name``, before the trial looks its precision up (which
    checks that its libraries are importable, so hqq must be visible again by then)."""
    from .precisions import REGISTRY

    precision = REGISTRY.get(name)
    hide_unless_needed(precision.requires if precision is not None else ())


# The library each precision quantizes with, imported before the load clock starts: a fresh worker's first
# from_pretrained would otherwise time the library's import (seconds) as part of that precision's load_s.
_LIBRARY_MODULES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "hqq": "hqq.core.quantize"}
# Libraries whose module-level ``torch.compile(fn)`` calls may be deferred (checked by reading their use of the
# result: bitsandbytes 0.4x-0.50 only ever calls it, as a fallback for devices without a kernel of their own).
_DEFER_COMPILE = frozenset({"bitsandbytes"})


def import_precision_library(library: str) -> float:
    """Import the quantization library ``library`` (a Precision's ``library``) if it is not imported yet; return the
    seconds it took (0.0 when there was nothing to import).

    bitsandbytes is imported with :func:`deferred_compile`: at import it wraps fallback kernels in ``torch.compile``,
    which imports torch's dynamo and inductor at once (2.8 s of its 2.9 s import on a 2-core machine), although its
    CUDA backend registers kernels of its own for those ops."""
    import importlib
    import time

    module = _LIBRARY_MODULES.get(library)
    if module is None or module in sys.modules:
        return 0.0
    t0 = time.perf_counter()
    if library in _DEFER_COMPILE:
        with deferred_compile():
            importlib.import_module(module)
    else:
        importlib.import_module(module)
    return time.perf_counter() - t0


class deferred_compile:
    """While active, ``torch.compile(fn, **kw)`` returns a function that calls ``torch.compile(fn, **kw)`` on its
    first call and the compiled function from then on. torch.compile compiles on the first call anyway; what moves
    is only the import of its machinery, from the decoration to that first call. If the real ``torch.compile``
    raises, the plain function is used, as bitsandbytes' own ``_try_torch_compile`` does at decoration."""

    def __enter__(self):
        import torch

        self._torch, self._real = torch, torch.compile
        torch.compile = self._lazy
        return self

    def __exit__(self, *exc):
        self._torch.compile = self._real
        return False

    def _lazy(self, model=None, **kwargs):
        import functools
        import threading

        if model is None:  # used as @torch.compile(**kwargs)
            return lambda fn: self._lazy(fn, **kwargs)
        real, lock, compiled = self._real, threading.Lock(), []

        @functools.wraps(model)
        def call(*args, **kw):
            if not compiled:
                with lock:
                    if not compiled:
                        try:
                            compiled.append(real(model, **kwargs))
                        except Exception:  # noqa: BLE001 - as bitsandbytes does when compile refuses
                            compiled.append(model)
            return compiled[0](*args, **kw)

        return call
