"""HQQ (half-quadratic quantization, calibration-free) through the hqq library, applied after ``from_pretrained``.

Why not transformers' ``HqqConfig``: transformers 5.x has no on-load quantization op for HQQ
(``HqqHfQuantizer.get_quantize_ops`` raises "HQQ is not available yet"), so ``from_pretrained(quantization_config=
HqqConfig(...))`` fails; hqq's own ``AutoHQQHFModel.quantize_model`` replaces the linear layers after a plain load.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def quantize_model(model: Any, nbits: int, group_size: int, compute_dtype: Any, device: str) -> Any:
    """Replace every decoder linear layer of ``model`` by an ``HQQLinear`` (the output head stays unquantized)."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    target = "cuda" if device == "cuda" else "cpu"
    if device == "cuda":
        import torch

        target = f"cuda:{torch.cuda.current_device()}"
    AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=compute_dtype, device=target)
    log.info("HQQ %d-bit (group %d) applied", nbits, group_size)
    return model
