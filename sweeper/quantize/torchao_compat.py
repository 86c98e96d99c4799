"""torchao config objects for each precision, in one place so torchao's API changes are handled here only.

Tested with torchao 0.18 (CPU here, CUDA on the GPU hosts). Facts this module encodes (torchao 0.18):
- ``Int4WeightOnlyConfig``'s default packing ("plain", ``Int4Tensor``) needs the ``mslk`` kernels (not on PyPI); its
  "tile_packed_to_4d" packing uses the tinygemm kernel built into torch (CUDA, compute capability >= 8.0, bf16 only).
- On CPU the int4 weight-only tensor is the prototype ``Int4OpaqueTensor`` (``_weight_int4pack_mm_for_cpu``), reached
  through ``PrototypeInt4WeightOnlyConfig`` (group sizes 32, 64, 128).
- ``Float8DynamicActivationFloat8WeightConfig`` refuses anything but CUDA compute capability >= 8.9 (or MI300 / XPU).
"""
from __future__ import annotations

import importlib.metadata
from typing import Any

TESTED = "0.18"
CPU_INT4_GROUP_SIZES = (32, 64, 128)
CUDA_INT4_GROUP_SIZES = (32, 64, 128, 256)


def version() -> str:
    return importlib.metadata.version("torchao")


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"torchao {version()} lacks {what}; sweeper is tested with torchao {TESTED}.x "
                           f"(pip install 'quant-sweeper[torchao]')")


def int8_weight_only() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()  # per-row (per output channel) symmetric scales, round to nearest


def int8_dynamic_activation_int8_weight() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()  # per-token dynamic activations, per-row weights


def float8_dynamic(granularity: str) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    g = {"per_tensor": PerTensor(), "per_row": PerRow()}[granularity]
    return Float8DynamicActivationFloat8WeightConfig(granularity=g)


def int4_weight_only(group_size: int, device: str) -> Any:
    """The int4 weight-only config whose kernel exists on ``device`` ("cpu" or "cuda")."""
    if device == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError:
            PrototypeInt4WeightOnlyConfig = None
        _need(PrototypeInt4WeightOnlyConfig is not None, "PrototypeInt4WeightOnlyConfig (the CPU int4 layout)")
        return PrototypeInt4WeightOnlyConfig(group_size=group_size)
    import inspect

    from torchao.quantization import Int4WeightOnlyConfig

    _need("int4_packing_format" in inspect.signature(Int4WeightOnlyConfig).parameters,
          "Int4WeightOnlyConfig(int4_packing_format=...)")
    # "tile_packed_to_4d": tinygemm in torch itself; the default "plain" format needs mslk, which pip cannot install.
    return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")


def int4_group_sizes(device: str) -> tuple[int, ...]:
    return CPU_INT4_GROUP_SIZES if device == "cpu" else CUDA_INT4_GROUP_SIZES


def transformers_config(quant_type: Any) -> Any:
    """A ``TorchAoConfig`` around a torchao config object (transformers >= 4.56 and 5.x accept objects)."""
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=quant_type)


def linear_filter(module: Any, fqn: str) -> bool:
    """The modules ``quantize_`` may touch: linear layers except the output head (as transformers' TorchAoConfig)."""
    import torch

    return isinstance(module, torch.nn.Linear) and fqn.split(".")[-1] != "lm_head"
