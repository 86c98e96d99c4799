"""The precision registry: one row per precision a study can name.

Each precision knows how to build the ``from_pretrained`` arguments for a compute dtype, whether the compute dtype
changes its computation (if not, the expansion keeps one trial), its bytes per parameter for memory estimates, and what
hardware it needs. ``sweep precisions`` prints this table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError

COMPUTE_DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass(frozen=True)
class Precision:
    name: str
    method: str  # "none" (plain dtype) or the quantization method
    library: str
    weight_bits: int
    activation_bits: int | None  # None: activations stay in the compute dtype
    group_size: int | None
    bytes_per_param: float  # quantized linear weights, including scales
    compute_dtype_matters: bool  # False: the precision fixes its own dtype (one trial per model)
    fixed_dtype: str | None  # the dtype of a plain-dtype precision
    hardware: str  # human-readable needs
    needs_cuda: bool
    min_compute_capability: tuple[int, int] | None
    options: dict[str, Any] = field(default_factory=dict)  # defaults of the study-settable options
    build: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None  # (compute dtype, options) -> kwargs

    def effective_compute_dtype(self, requested: str) -> str:
        return self.fixed_dtype if not self.compute_dtype_matters else requested

    def from_pretrained_kwargs(self, compute_dtype: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        opts = self.resolve_options(options)
        if self.build is None:
            return {"dtype": torch_dtype(self.effective_compute_dtype(compute_dtype))}
        return self.build(self.effective_compute_dtype(compute_dtype), opts)

    def resolve_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise UserError(f"precision {self.name!r}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        return {**self.options, **options}

    def hardware_problem(self, device: str, capability: tuple[int, int] | None) -> str | None:
        """Why this precision cannot run on ``device`` ("cuda"/"cpu"), or None if it can."""
        if self.needs_cuda and device != "cuda":
            return f"precision {self.name!r} needs a CUDA GPU ({self.hardware}); this worker has none"
        if self.min_compute_capability and device == "cuda" and capability is not None:
            if capability < self.min_compute_capability:
                need = ".".join(map(str, self.min_compute_capability))
                have = ".".join(map(str, capability))
                return f"precision {self.name!r} needs compute capability >= {need}; this GPU has {have}"
        return None


def _bnb_int8(compute_dtype: str, opts: dict[str, Any]) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(opts["threshold"]))
    return {"dtype": torch_dtype(compute_dtype), "quantization_config": qc}


def _bnb_4bit(quant_type: str):
    def build(compute_dtype: str, opts: dict[str, Any]) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
            bnb_4bit_use_double_quant=bool(opts["double_quant"]),
        )
        # dtype sets the non-quantized modules (norms, embeddings, head) to the compute dtype as well.
        return {"dtype": torch_dtype(compute_dtype), "quantization_config": qc}

    return build


def _plain(name: str, bits: int, needs: str, cap=None) -> Precision:
    return Precision(
        name=name, method="none", library="torch", weight_bits=bits, activation_bits=bits, group_size=None,
        bytes_per_param=bits / 8, compute_dtype_matters=False, fixed_dtype=name, hardware=needs,
        needs_cuda=False, min_compute_capability=cap,
    )


REGISTRY: dict[str, Precision] = {
    p.name: p
    for p in [
        _plain("fp32", 32, "any"),
        _plain("fp16", 16, "any (slow on CPU)"),
        _plain("bf16", 16, "CPU, or GPU with compute capability >= 8.0", cap=(8, 0)),
        Precision(
            name="int8", method="LLM.int8", library="bitsandbytes", weight_bits=8, activation_bits=16,
            group_size=None, bytes_per_param=1.0 + 4 / 4096, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU (bitsandbytes >= 0.48)", needs_cuda=False, min_compute_capability=None,
            options={"threshold": 6.0}, build=_bnb_int8,
        ),
        # 4-bit weights plus one fp32 absmax per 64-weight block (or 8-bit absmax + fp32 per 256 with double quant).
        Precision(
            name="nf4", method="NF4", library="bitsandbytes", weight_bits=4, activation_bits=None, group_size=64,
            bytes_per_param=0.5 + 4 / 64, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU (bitsandbytes >= 0.48)", needs_cuda=False, min_compute_capability=None,
            options={"double_quant": False}, build=_bnb_4bit("nf4"),
        ),
        Precision(
            name="fp4", method="FP4", library="bitsandbytes", weight_bits=4, activation_bits=None, group_size=64,
            bytes_per_param=0.5 + 4 / 64, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU (bitsandbytes >= 0.48)", needs_cuda=False, min_compute_capability=None,
            options={"double_quant": False}, build=_bnb_4bit("fp4"),
        ),
    ]
}


def get(name: str) -> Precision:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown precision {name!r}; allowed: {', '.join(REGISTRY)}") from None


def table_rows() -> list[dict[str, Any]]:
    """The registry as rows a reader can scan (``sweep precisions``)."""
    return [
        {
            "name": p.name, "method": p.method, "library": p.library, "weight_bits": p.weight_bits,
            "activation_bits": p.activation_bits if p.activation_bits else "compute dtype",
            "group_size": p.group_size or "-",
            "compute_dtype": "study's compute_dtypes" if p.compute_dtype_matters else p.fixed_dtype,
            "options": ", ".join(f"{k}={v}" for k, v in p.options.items()) or "-",
            "hardware": p.hardware,
        }
        for p in REGISTRY.values()
    ]
