"""What a worker imports, and when: transformers kept from importing an optional package the trial does not use, and
a precision's quantization library imported before its load clock starts (:func:`import_precision_library`).

transformers imports hqq when it is installed (for a quantized KV cache the sweep never uses), and hqq's
``torch.compile`` decorators import torch's inductor: 11.5 s of a fresh worker's start on the H100 host
(docs/performance.md, run15), of which torch._dynamo, 6.9 s, is imported by generation anyway. A worker hides hqq
until a trial needs it; hiding is a ``None`` in ``sys.modules``, which ``importlib.util.find_spec`` (transformers'
availability check) reads as "not installed". It is only ever done in the processes that run trials (Ray workers,
warm workers), never in the user's process.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from contextlib import nullcontext

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


# The modules of each precision's quantization library that its load uses, imported before the load clock starts: a
# fresh worker's first from_pretrained would otherwise time their import (seconds) as part of that precision's load_s.
_LIBRARY_MODULES = {"bitsandbytes": ("bitsandbytes",), "torchao": ("torchao",),
                    "hqq": ("hqq.core.quantize", "hqq.models.hf.base"), "onnxruntime": ("onnxruntime",)}
# bitsandbytes versions whose module-level ``torch.compile(fn)`` calls are known to only ever be called (never
# inspected): 0.48-0.50 wrap fallback kernels for devices without their own (its CUDA backend registers its own).
# Other versions are imported plainly.
_DEFER_COMPILE_UP_TO = {"bitsandbytes": (0, 50)}
_DEFER_LOCK = threading.Lock()


def import_precision_library(library: str) -> float:
    """Import the modules of the quantization library ``library`` (a Precision's ``library``) that are not imported
    yet; return the seconds it took (0.0 when there was nothing to import).

    bitsandbytes is imported with :func:`deferred_compile`: at import it wraps fallback kernels in ``torch.compile``,
    which imports torch's inductor then and there (a plain import took 2.25-3.20 s on the 2-core machine, the
    deferred one 0.025-0.042 s, ``benchmarks/logs/import_costs_cpu.txt``; part of the difference, torch's dynamo, is
    then imported by the first load instead)."""
    import importlib
    import time

    missing = [m for m in _LIBRARY_MODULES.get(library, ()) if m not in sys.modules]
    if not missing:
        return 0.0
    t0 = time.perf_counter()
    with (deferred_compile() if _may_defer(library) else nullcontext()):
        for module in missing:
            importlib.import_module(module)
    return time.perf_counter() - t0


def _may_defer(library: str) -> bool:
    import importlib.metadata
    import re

    limit = _DEFER_COMPILE_UP_TO.get(library)
    if limit is None:
        return False
    try:
        m = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(library))
    except importlib.metadata.PackageNotFoundError:
        return False
    return m is not None and (int(m.group(1)), int(m.group(2))) <= limit


class deferred_compile:
    """While active, ``torch.compile(fn, **kw)`` called by this thread on a plain function returns a function that
    calls ``torch.compile(fn, **kw)`` on its first call and the compiled function from then on. torch.compile compiles
    on the first call anyway; what moves is only the import of its machinery, from the decoration to that first call.
    Other threads, and modules (``nn.Module``) or other callables, get the real ``torch.compile``. If the real one
    raises, the plain function is used, as bitsandbytes' own ``_try_torch_compile`` does at decoration."""

    def __enter__(self):
        import torch

        _DEFER_LOCK.acquire()  # one deferral at a time: each restores what it replaced
        self._torch, self._real, self._owner = torch, torch.compile, threading.get_ident()
        torch.compile = self._lazy
        return self

    def __exit__(self, *exc):
        self._torch.compile = self._real
        _DEFER_LOCK.release()
        return False

    def _lazy(self, model=None, **kwargs):
        import functools
        import inspect

        if threading.get_ident() != self._owner:
            return self._real(model, **kwargs) if model is not None else self._real(**kwargs)
        if model is None:  # used as @torch.compile(**kwargs)
            return lambda fn: self._lazy(fn, **kwargs)
        if not inspect.isfunction(model):
            return self._real(model, **kwargs)
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
