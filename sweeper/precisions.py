"""The precision registry: one row per precision a study can name.

Each precision knows how to build the ``from_pretrained`` arguments for a compute dtype (and device), whether the
compute dtype changes its computation (if not, the expansion keeps one trial), its bytes per parameter for memory
estimates, what hardware it needs, and which optional library it needs. ``sweep precisions`` prints this table.

Three ways a precision quantizes (all through the same load stage, :mod:`sweeper.stages.load`):
- on load, through ``from_pretrained(quantization_config=...)`` (bitsandbytes, torchao's ``TorchAoConfig``);
- after load, through ``post_load`` (HQQ: transformers 5 no longer quantizes with ``HqqConfig`` on load);
- calibrated (``calibrated=True``, AWQ): quantized once per (model, settings, compute dtype, device) on local text,
  cached under the results store, and loaded from that cache by every trial that needs it.
ONNX Runtime precisions (``runtime="onnxruntime"``) are exported to ONNX in fp32 (and quantized by ORT for int8) once
per model, cached the same way, and run by an ONNX Runtime session behind the transformers interface.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError

COMPUTE_DTYPES = ("fp32", "fp16", "bf16")
PACKAGE = "quant-sweeper"


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# (compute dtype, resolved options, device) -> from_pretrained kwargs
Build = Callable[[str, dict[str, Any], str], dict[str, Any]]
# (device, compute capability, compute dtype, resolved options) -> why not, or None
Check = Callable[[str, "tuple[int, int] | None", str, dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class Precision:
    name: str
    method: str  # "none" (plain dtype) or the quantization method
    library: str
    weight_bits: int
    activation_bits: int | None  # None: activations stay in the compute dtype
    group_size: int | None  # the default; a "group_size" option overrides it
    bytes_per_param: float  # quantized linear weights, including scales
    compute_dtype_matters: bool  # False: the precision fixes its own dtype (one trial per model)
    fixed_dtype: str | None  # the dtype of a plain-dtype precision
    hardware: str  # human-readable needs
    needs_cuda: bool
    min_compute_capability: tuple[int, int] | None
    options: dict[str, Any] = field(default_factory=dict)  # defaults of the study-settable options
    build: Build | None = None
    requires: tuple[str, ...] = ()  # importable modules it needs beyond the core dependencies
    extra: str | None = None  # the pip extra that installs them
    check: Check | None = None  # method-specific refusals (compute dtype, group size, ...) beyond the fields above
    post_load: Callable[[Any, str, dict[str, Any], str], Any] | None = None  # (model, compute dtype, opts, device)
    calibrated: bool = False  # quantized from calibration data through sweeper.quantize.calibrated (cached)
    # why its decode step cannot be captured in a CUDA graph (its kernels synchronise with the host), or None; the
    # benchmark stage records this reason instead of attempting a capture that is known to fail
    no_graph_capture: str | None = None
    # "torch" (a transformers model) or "onnxruntime" (exported to ONNX, run by an ORT session: sweeper.ort_model)
    runtime: str = "torch"
    onnx_int8: bool = False  # onnxruntime: the export quantized by ORT's quantize_dynamic (sweeper.quantize.onnx_export)
    dtype_rule: str | None = None  # what `sweep precisions` says of its compute dtype, where the field alone is unclear

    def effective_compute_dtype(self, requested: str) -> str:
        return self.fixed_dtype if not self.compute_dtype_matters else requested

    def from_pretrained_kwargs(self, compute_dtype: str, options: dict[str, Any] | None = None,
                               device: str = "cpu") -> dict[str, Any]:
        opts = self.resolve_options(options)
        if self.build is None:
            return {"dtype": torch_dtype(self.effective_compute_dtype(compute_dtype))}
        return self.build(self.effective_compute_dtype(compute_dtype), opts, device)

    def resolve_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise UserError(f"precision {self.name!r}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        return {**self.options, **options}

    def missing_library(self) -> str | None:
        """Why this precision cannot be used in this Python environment, or None."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        how = f"pip install '{PACKAGE}[{self.extra}]'" if self.extra else f"pip install {' '.join(missing)}"
        return f"precision {self.name!r} needs {', '.join(missing)}: {how}"

    def hardware_problem(self, device: str, capability: tuple[int, int] | None, compute_dtype: str | None = None,
                         options: dict[str, Any] | None = None) -> str | None:
        """Why this precision cannot run on ``device`` ("cuda"/"cpu"), or None if it can."""
        if self.needs_cuda and device != "cuda":
            return f"precision {self.name!r} needs a CUDA GPU ({self.hardware}); this worker has none"
        if self.min_compute_capability and device == "cuda" and capability is not None:
            if capability < self.min_compute_capability:
                need = ".".join(map(str, self.min_compute_capability))
                have = ".".join(map(str, capability))
                return f"precision {self.name!r} needs compute capability >= {need}; this GPU has {have}"
        if self.check is not None and compute_dtype is not None:
            return self.check(device, capability, self.effective_compute_dtype(compute_dtype),
                              self.resolve_options(options))
        return None


def _bnb_int8(compute_dtype: str, opts: dict[str, Any], device: str) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(opts["threshold"]))
    return {"dtype": torch_dtype(compute_dtype), "quantization_config": qc}


def _bnb_4bit(quant_type: str):
    def build(compute_dtype: str, opts: dict[str, Any], device: str) -> dict[str, Any]:
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


def _torchao(make: Callable[[dict[str, Any], str], Any]) -> Build:
    """A build for a torchao config made by ``make(opts, device)``, applied on load through ``TorchAoConfig``."""

    def build(compute_dtype: str, opts: dict[str, Any], device: str) -> dict[str, Any]:
        from .quantize import torchao_compat as ao

        # dtype: the weights are cast to the compute dtype before torchao quantizes them; it is also the dtype of
        # the unquantized modules and of the activations (W8A16, W4A16) or the dequantized output (W8A8, FP8).
        return {"dtype": torch_dtype(compute_dtype), "quantization_config": ao.transformers_config(make(opts, device))}

    return build


def _int4_check(device: str, capability: tuple[int, int] | None, compute_dtype: str, opts: dict[str, Any]) -> str | None:
    """torchao int4 weight-only kernels: CPU (any float dtype) or tinygemm on CUDA (bf16 only); their group sizes."""
    from .quantize.torchao_compat import int4_group_sizes

    sizes = int4_group_sizes(device)
    if opts.get("group_size") not in sizes:
        return (f"group_size {opts.get('group_size')!r} has no torchao int4 kernel on {device}; "
                f"allowed: {', '.join(map(str, sizes))}")
    if device == "cuda" and compute_dtype != "bf16":
        return f"torchao int4 on CUDA (tinygemm kernel) computes in bf16 only; this trial asks for {compute_dtype}"
    return None


def _hqq_post_load(nbits: int) -> Callable[[Any, str, dict[str, Any], str], Any]:
    def post_load(model: Any, compute_dtype: str, opts: dict[str, Any], device: str) -> Any:
        from .quantize.hqq import quantize_model

        return quantize_model(model, nbits, int(opts["group_size"]), torch_dtype(compute_dtype), device)

    return post_load


def _hqq_check(device: str, capability: tuple[int, int] | None, compute_dtype: str, opts: dict[str, Any]) -> str | None:
    if not isinstance(opts.get("group_size"), int) or opts["group_size"] <= 0:
        return f"group_size must be a positive integer, got {opts.get('group_size')!r}"
    return None


def _plain(name: str, bits: int, needs: str, cap=None) -> Precision:
    return Precision(
        name=name, method="none", library="torch", weight_bits=bits, activation_bits=bits, group_size=None,
        bytes_per_param=bits / 8, compute_dtype_matters=False, fixed_dtype=name, hardware=needs,
        needs_cuda=False, min_compute_capability=cap,
    )


def _ao():
    from .quantize import torchao_compat

    return torchao_compat


def _awq_check(device: str, capability: tuple[int, int] | None, compute_dtype: str, opts: dict[str, Any]) -> str | None:
    for key in ("calib_samples", "calib_seq_len", "scale_search"):
        if not isinstance(opts.get(key), int) or opts[key] < 1:
            return f"{key} must be a positive integer, got {opts.get(key)!r}"
    return _int4_check(device, capability, compute_dtype, opts)


_ORT_MODULES = ("onnxruntime", "onnx", "onnxscript")

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
            no_graph_capture="bitsandbytes LLM.int8 finds outlier columns on the host each forward (capture failed on "
                             "an H100, benchmarks/gpu/logs/run1_grid_graph_on_errors.txt)",
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
        # torchao through transformers' TorchAoConfig: weights quantized while loading (round to nearest).
        Precision(
            name="w8a16", method="int8 weight-only (RTN)", library="torchao", weight_bits=8, activation_bits=None,
            group_size=None, bytes_per_param=1.0 + 4 / 4096, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU", needs_cuda=False, min_compute_capability=None,
            build=_torchao(lambda o, d: _ao().int8_weight_only()), requires=("torchao",), extra="torchao",
        ),
        Precision(
            name="w8a8", method="int8 dynamic act + int8 weight", library="torchao", weight_bits=8, activation_bits=8,
            group_size=None, bytes_per_param=1.0 + 4 / 4096, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU", needs_cuda=False, min_compute_capability=None,
            build=_torchao(lambda o, d: _ao().int8_dynamic_activation_int8_weight()), requires=("torchao",),
            extra="torchao",
            no_graph_capture="torchao's dynamic int8 activation quantization synchronises with the host (capture "
                             "failed on an H100: 'operation not permitted when stream is capturing', run7)",
        ),
        # 4-bit weights + a bf16/fp16/fp32 scale and zero point per group of group_size weights.
        Precision(
            name="w4a16", method="int4 weight-only (RTN)", library="torchao", weight_bits=4, activation_bits=None,
            group_size=128, bytes_per_param=0.5 + 4 / 128, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CPU (group 32/64/128), or CUDA GPU with compute capability >= 8.0 and bf16",
            needs_cuda=False, min_compute_capability=(8, 0), options={"group_size": 128},
            build=_torchao(lambda o, d: _ao().int4_weight_only(int(o["group_size"]), d)), check=_int4_check,
            requires=("torchao",), extra="torchao",
        ),
        Precision(
            name="fp8", method="float8 dynamic act + float8 weight", library="torchao", weight_bits=8,
            activation_bits=8, group_size=None, bytes_per_param=1.0, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU with compute capability >= 8.9 (Ada, Hopper)", needs_cuda=True,
            min_compute_capability=(8, 9), options={"granularity": "per_tensor"},
            build=_torchao(lambda o, d: _ao().float8_dynamic(o["granularity"])),
            check=lambda d, c, cd, o: None if o["granularity"] in ("per_tensor", "per_row")
            else f"granularity must be per_tensor or per_row, got {o['granularity']!r}",
            requires=("torchao",), extra="torchao",
        ),
        # Calibrated: AWQ (torchao.prototype.awq) scale search on local text, then int4 weight-only packing.
        Precision(
            name="awq4", method="AWQ int4 weight-only (calibrated)", library="torchao", weight_bits=4,
            activation_bits=None, group_size=128, bytes_per_param=0.5 + 4 / 128, compute_dtype_matters=True,
            fixed_dtype=None,
            hardware="CPU (group 32/64/128), or CUDA GPU with compute capability >= 8.0 and bf16",
            needs_cuda=False, min_compute_capability=(8, 0),
            options={"group_size": 128, "calib_data": None, "calib_samples": 16, "calib_seq_len": 512,
                     "scale_search": 20},
            check=_awq_check, requires=("torchao",), extra="torchao", calibrated=True,
        ),
        # HQQ (half-quadratic, calibration-free) through the hqq library, applied right after loading.
        Precision(
            name="hqq4", method="HQQ 4-bit", library="hqq", weight_bits=4, activation_bits=None, group_size=64,
            bytes_per_param=0.5 + 4 / 64, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU", needs_cuda=False, min_compute_capability=None, options={"group_size": 64},
            check=_hqq_check, post_load=_hqq_post_load(4), requires=("hqq",), extra="hqq",
        ),
        Precision(
            name="hqq8", method="HQQ 8-bit", library="hqq", weight_bits=8, activation_bits=None, group_size=64,
            bytes_per_param=1.0 + 4 / 64, compute_dtype_matters=True, fixed_dtype=None,
            hardware="CUDA GPU or CPU", needs_cuda=False, min_compute_capability=None, options={"group_size": 64},
            check=_hqq_check, post_load=_hqq_post_load(8), requires=("hqq",), extra="hqq",
        ),
        # ONNX Runtime: the model exported to ONNX in fp32 with past key/values, run by an ORT session; int8 is ORT's
        # dynamic quantization of that export. The export is fp32 whatever the study's compute dtypes (one trial).
        Precision(
            name="ort-fp32", method="ONNX export (fp32)", library="onnxruntime", weight_bits=32, activation_bits=32,
            group_size=None, bytes_per_param=4.0, compute_dtype_matters=False, fixed_dtype="fp32",
            hardware="CPU (CPUExecutionProvider); CUDA GPU with onnxruntime-gpu", needs_cuda=False,
            min_compute_capability=None, requires=_ORT_MODULES, extra="onnx", runtime="onnxruntime",
            dtype_rule="fp32 (fixed: the export is fp32)",
            no_graph_capture="an ONNX Runtime session, not a torch module: no torch CUDA graph",
        ),
        # int8 weights per output channel (one fp32 scale per row) + dynamic uint8 activations per tensor
        Precision(
            name="ort-int8", method="ORT dynamic int8 (per-channel weights)", library="onnxruntime", weight_bits=8,
            activation_bits=8, group_size=None, bytes_per_param=1.0 + 4 / 4096, compute_dtype_matters=False,
            fixed_dtype="fp32", hardware="CPU (CPUExecutionProvider); CUDA GPU with onnxruntime-gpu",
            needs_cuda=False, min_compute_capability=None, requires=_ORT_MODULES, extra="onnx",
            runtime="onnxruntime", onnx_int8=True,
            dtype_rule="fixed: int8 matmuls (weights per channel, uint8 activations per tensor), rest fp32",
            no_graph_capture="an ONNX Runtime session, not a torch module: no torch CUDA graph",
        ),
    ]
}


def get(name: str) -> Precision:
    """The precision called ``name``; a user error if it is unknown or its library is not installed."""
    try:
        p = REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown precision {name!r}; allowed: {', '.join(REGISTRY)}") from None
    missing = p.missing_library()
    if missing:
        raise UserError(missing)
    return p


def table_rows() -> list[dict[str, Any]]:
    """The registry as rows a reader can scan (``sweep precisions``)."""
    return [
        {
            "name": p.name, "method": p.method,
            "library": p.library + (" (not installed)" if p.missing_library() else ""), "weight_bits": p.weight_bits,
            "activation_bits": p.activation_bits if p.activation_bits else "compute dtype",
            "group_size": p.group_size or "-",
            "compute_dtype": p.dtype_rule or ("study's compute_dtypes" if p.compute_dtype_matters else p.fixed_dtype),
            "options": ", ".join(f"{k}={v}" for k, v in p.options.items()) or "-",
            "hardware": p.hardware,
            "cuda_graph_decode": ("no: host sync" if p.runtime == "torch" else f"no: {p.library}") if p.no_graph_capture
            else "yes",
        }
        for p in REGISTRY.values()
    ]


def short_table_rows() -> list[dict[str, Any]]:
    """:func:`table_rows` cut to what fits in 100 columns (``sweep precisions``; ``--long`` shows every column)."""
    return [{"name": r["name"], "method": r["method"],
             "library": r["library"].replace(" (not installed)", " (missing)"),
             "weight bits": r["weight_bits"],
             "act bits": "compute" if r["activation_bits"] == "compute dtype" else r["activation_bits"],
             "compute": _short_compute(r["compute_dtype"])}
            for r in table_rows()]


def _short_compute(text: str) -> str:
    """The compute column of the short table: its first words (the whole rule is in ``--long``)."""
    if text == "study's compute_dtypes":
        return "per study"
    return text if len(text) <= 14 else text.split(" (")[0].split(",")[0][:14] + " (fixed)"
