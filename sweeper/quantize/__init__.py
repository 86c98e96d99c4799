"""Quantization back-ends that need more than a ``quantization_config``: torchao config objects (one place for torchao
version differences), HQQ applied after loading, and calibrated methods (AWQ) with a checkpoint cache.

Nothing here is imported by ``sweeper.precisions`` at import time: a precision whose library is missing must still be
listable.
"""
