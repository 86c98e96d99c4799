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
