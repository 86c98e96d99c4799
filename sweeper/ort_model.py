"""An ONNX Runtime session behind the interface the stages use: a transformers causal LM.

:class:`OrtCausalLM` is a ``PreTrainedModel`` with ``GenerationMixin``, so every stage runs on it unchanged:
``model(input_ids=..., attention_mask=..., use_cache=...)`` returns ``.logits`` (and ``.past_key_values``, a
``DynamicCache`` whose tensors are the session's ``present.*`` outputs), ``model.generate(...)`` is transformers' own
generation loop (greedy, logits processors, stopping criteria, ``use_cache=False``), lm-eval's HFLM wraps it, and
forward hooks (the timing lease) see every session run.

The graph (:mod:`sweeper.quantize.onnx_export`) takes the past as flat tensors; without a cache (``use_cache=False``
or the first forward) the past is empty and the whole sequence is computed. Tensors cross as NumPy arrays on the host
(zero-copy on CPU); with ``CUDAExecutionProvider`` they are copied to and from the GPU on every run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# the output's (and forward's) name for the cache: ``cache`` in recent transformers, ``past_key_values`` before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def providers(device: str) -> list[str]:
    """CUDA where the device is a GPU and onnxruntime-gpu provides it, else CPU."""
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model_file: Path, device: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # as many threads as torch uses in this worker (the trial's CPUs), so runtimes compare on the same cores
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=providers(device))


class OrtCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose forward pass is an ONNX Runtime session (see the module docstring)."""

    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config: Any, session: Any, kv_heads: list[int], head_dims: list[int], num_params: int):
        super().__init__(config)
        self.session = session
        self.kv_heads, self.head_dims = kv_heads, head_dims
        self._num_params = num_params
        self._inputs = {i.name for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def device(self) -> torch.device:  # inputs and outputs live on the host (module docstring)
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def num_parameters(self, *args, **kwargs) -> int:
        return self._num_params

    def tie_weights(self, *args, **kwargs) -> None:  # the exported graph holds whatever the model tied
        return None

    def get_input_embeddings(self):  # no torch module holds them
        return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = None,
                past_key_values: Any = None, **kwargs) -> CausalLMOutputWithPast:
        import numpy as np

        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.2x names it cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        batch, seq = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
        if position_ids is None:  # as the transformers models do without position ids: the cache positions
            position_ids = torch.arange(past, past + seq).expand(batch, seq)
        feed = {name: np.ascontiguousarray(t.cpu().numpy(), dtype=np.int64) for name, t in
                (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids))}
        for i, (heads, dim) in enumerate(zip(self.kv_heads, self.head_dims)):
            if past:
                layer = past_key_values.layers[i]
                # no copy for the session's own outputs; a reordered cache (beam search) may need one
                feed[f"past.{i}.key"] = np.ascontiguousarray(layer.keys.numpy())
                feed[f"past.{i}.value"] = np.ascontiguousarray(layer.values.numpy())
            else:
                feed[f"past.{i}.key"] = feed[f"past.{i}.value"] = np.zeros((batch, heads, 0, dim), np.float32)
        out = self.session.run(self._outputs, feed)
        logits = torch.from_numpy(out[0])
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
            for i in range(len(self.kv_heads)):
                k, v = torch.from_numpy(out[1 + 2 * i]), torch.from_numpy(out[2 + 2 * i])
                if past:  # present = past + new positions already: replace, no second concatenation
                    cache.layers[i].keys, cache.layers[i].values = k, v
                else:
                    cache.update(k, v, i)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})


def load(folder: Path, meta: dict[str, Any], model_id: str, revision: str | None, trust_remote_code: bool,
         device: str, threads: int | None = None) -> OrtCausalLM:
    """The ORT model of an export folder (:func:`sweeper.quantize.onnx_export.ensure_model`), with the original
    model's config and generation config."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    session = make_session(Path(folder) / "model.onnx", device, threads)
    model = OrtCausalLM(config, session, list(meta["kv_heads"]), list(meta["head_dims"]), int(meta["num_params"]))
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_id, revision=revision)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    return model.eval()
