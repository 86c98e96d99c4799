"""KL divergence to the baseline's reference next-token distributions, and the prompt suite (docs/kl.md).

Flow: the baseline trial of a model calls :func:`compute_reference` on its model and stores the table at
``store.ref_path(reference_id(spec))``; every trial of that model (the baseline included) loads it and calls
:func:`kl_metrics`. Plain functions, no Ray.

Reference table (one row per sequence of the fixed token set; Parquet, no pickles)::

    seq            int32     position of the sequence in the token set
    source         string    "wikitext" or "prompt"
    category       string    prompt category (null for wikitext)
    prompt_id      string    prompt id from the suite (null for wikitext)
    input_ids      list<int32>  the exact token ids fed to every model (length L)
    prompt_len     int32     tokens of the (truncated) prompt; the rest is the baseline's greedy continuation
    truncated      bool      the prompt was cut to ``prompt_max_tokens``
    argmax         list<int32>  baseline's argmax at each of the L positions
  exact mode (vocab <= exact_max_vocab):
    logp           large_list<float32>  L x V log-probs, row-major
  top-k mode:
    topk_ids       large_list<int32>    L x k token ids (descending probability)
    topk_logp      large_list<float32>  L x k log-probs
    rest_logmass   list<float64>        log of the probability mass outside the top k, per position
    tail_plogp     list<float64>        sum over the tokens outside the top k of p log p, per position (error bound)

The schema metadata key ``sweeper.kl`` holds a JSON document: format version, reference id, mode, vocab size, k,
settings, model identity, baseline cell, token-set sources and library versions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..store import atomic_write_table
from ..study import KLSettings
from ..trials import TrialSpec, file_fingerprint, model_identity

log = logging.getLogger(__name__)

# Bump when the token set's construction or the KL definitions change: reference ids change with it.
TOKEN_SET_VERSION = 1
FORMAT_VERSION = 1
META_KEY = b"sweeper.kl"
SOURCE_WIKITEXT = "wikitext"
SOURCE_PROMPT = "prompt"


DEFAULT_SETTINGS = KLSettings()


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


AUTO: Any = _Auto()  # "derive from the spec" (see reference_text_path)


# ---------------------------------------------------------------------------------------------------------------
# prompt suite


def _suite_bytes() -> bytes:
    return resources.files("sweeper").joinpath("data/prompts.jsonl").read_bytes()


def prompt_suite() -> list[dict[str, str]]:
    """The prompt suite: dicts with category, id, prompt, in file order (12 categories x 8 prompts)."""
    out = []
    for i, line in enumerate(_suite_bytes().decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if not all(isinstance(d.get(k), str) and d[k] for k in ("category", "id", "prompt")):
            raise ValueError(f"sweeper/data/prompts.jsonl line {i}: needs non-empty category, id, prompt")
        out.append({"category": d["category"], "id": d["id"], "prompt": d["prompt"]})
    return out


def _selected_prompts(settings: KLSettings) -> list[dict[str, str]]:
    suite = prompt_suite()
    if settings.max_prompts_per_category is None:
        return suite
    counts: dict[str, int] = {}
    out = []
    for p in suite:
        if counts.get(p["category"], 0) < settings.max_prompts_per_category:
            counts[p["category"]] = counts.get(p["category"], 0) + 1
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# identity


def reference_text_path(spec: TrialSpec) -> str | None:
    """The WikiText file of the token set: the study's perplexity file when it exists, else None (prompts only)."""
    if spec.perplexity is not None and os.path.isfile(spec.perplexity.path):
        return spec.perplexity.path
    return None


def _model_key(spec: TrialSpec) -> dict[str, Any]:
    return model_identity(spec.model, spec.model_fingerprint)


def reference_identity(spec: TrialSpec, text_path: str | None | _Auto = AUTO,
                       settings: KLSettings = DEFAULT_SETTINGS) -> dict[str, Any]:
    """What determines a reference's numbers: the model, the baseline cell, the token set and its settings."""
    if text_path is AUTO:
        text_path = reference_text_path(spec)
    return {
        **_model_key(spec),
        "precision": spec.precision,
        "precision_options": spec.precision_options,
        "compute_dtype": spec.compute_dtype,
        "token_set_version": TOKEN_SET_VERSION,
        "settings": asdict(settings),
        "text": file_fingerprint(text_path) if text_path else None,
        "prompts": hashlib.sha256(_suite_bytes()).hexdigest()[:16],
    }


def reference_id(spec: TrialSpec, text_path: str | None | _Auto = AUTO, settings: KLSettings = DEFAULT_SETTINGS) -> str:
    """Short hash of :func:`reference_identity`; the same baseline cell in two studies gives the same id.

    Call it with the *baseline's* spec (the spec whose ``trial_id == baseline_id``); a non-baseline spec names a
    different cell and so a different reference.
    """
    ident = reference_identity(spec, text_path, settings)
    return "kl-" + hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# model helpers


def _device(model: Any) -> Any:
    import torch

    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _log_probs(model: Any, ids: list[int]) -> Any:
    """(L, V) float32 log-probs of the next token at every position, one unpadded sequence (so no batch effects)."""
    import torch

    x = torch.tensor([ids], dtype=torch.long, device=_device(model))
    with torch.inference_mode():
        logits = model(input_ids=x, use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _greedy(model: Any, tokenizer: Any, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids``, cut after the first EOS (the EOS is kept)."""
    import torch
    from transformers import GenerationConfig

    if new_tokens == 0:
        return []
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    # An explicit config: a model's own generation_config may ask for sampling.
    gc = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                          eos_token_id=sorted(eos) or None, pad_token_id=pad)
    x = torch.tensor([ids], dtype=torch.long, device=_device(model))
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
    new = out[0, len(ids):].tolist()
    for i, t in enumerate(new):
        if t in eos:
            return new[: i + 1]
    return new


def _special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before ordinary text (e.g. BOS), so WikiText chunks start like prompts do."""
    with_sp = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    if n > 0 and with_sp[n:] == without:
        return list(with_sp[:n])
    return []


def _wiki_ids(tokenizer: Any, text_path: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the file, reading only as much text as needed."""
    chars = max(4096, 8 * n_tokens)
    with open(text_path, encoding="utf-8") as fh:
        text = fh.read(chars)
        while True:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            # Margin of 16 tokens: the last tokens of a cut-off text may split a word differently.
            if len(ids) >= n_tokens + 16:
                return ids[:n_tokens]
            more = fh.read(chars)
            if not more:
                if len(ids) < n_tokens:
                    log.warning("%s has only %d tokens; the WikiText slice uses them all (asked %d)",
                                text_path, len(ids), n_tokens)
                return ids[:n_tokens]
            text += more
            chars *= 2


# ---------------------------------------------------------------------------------------------------------------
# reference


def _logsumexp64(x: Any, mask: Any) -> Any:
    """log(sum(exp(x))) over ``mask`` along the last dim, in float64; -inf where the mask is empty."""
    import torch

    return torch.logsumexp(x.double().masked_fill(~mask, float("-inf")), dim=-1)


def _topk_mask(topk_ids: Any, vocab: int) -> Any:
    import torch

    mask = torch.zeros(topk_ids.shape[0], vocab, dtype=torch.bool, device=topk_ids.device)
    mask.scatter_(1, topk_ids, True)
    return mask


def compute_reference(model: Any, tokenizer: Any, spec: TrialSpec, text_path: str | None | _Auto = AUTO,
                      settings: KLSettings = DEFAULT_SETTINGS) -> pa.Table:
    """Build the reference table on the baseline's model (see the module docstring for the schema).

    ``text_path``: the WikiText file (default: :func:`reference_text_path`); None leaves the WikiText part out.
    """
    import torch

    if text_path is AUTO:
        text_path = reference_text_path(spec)
    if not spec.is_baseline:
        log.warning("computing a KL reference on %s, which is not its model's baseline", spec.cell)
    rid = reference_id(spec, text_path, settings)
    prefix = _special_prefix(tokenizer)

    seqs: list[dict[str, Any]] = []
    if text_path is not None and settings.wiki_tokens > 0:
        ids = _wiki_ids(tokenizer, text_path, settings.wiki_tokens)
        for start in range(0, len(ids), settings.wiki_seq_len):
            chunk = prefix + ids[start:start + settings.wiki_seq_len]
            seqs.append({"source": SOURCE_WIKITEXT, "category": None, "prompt_id": None, "input_ids": chunk,
                         "prompt_len": len(chunk), "truncated": False})
    n_trunc = 0
    for p in _selected_prompts(settings):
        ids = tokenizer(p["prompt"], add_special_tokens=True)["input_ids"]
        truncated = len(ids) > settings.prompt_max_tokens
        n_trunc += truncated
        ids = list(ids[: settings.prompt_max_tokens])
        # The baseline's own continuation: KL also where generation actually goes, not only on the prompt text.
        cont = _greedy(model, tokenizer, ids, settings.continuation_tokens)
        seqs.append({"source": SOURCE_PROMPT, "category": p["category"], "prompt_id": p["id"],
                     "input_ids": ids + cont, "prompt_len": len(ids), "truncated": truncated})
    if n_trunc:
        log.info("%d suite prompts were truncated to %d tokens", n_trunc, settings.prompt_max_tokens)
    if not seqs:
        raise UserError("the KL token set is empty: no WikiText file and no prompts")

    vocab: int | None = None
    mode: str | None = None
    k = 0
    cols: dict[str, list] = {"argmax": [], "logp": [], "topk_ids": [], "topk_logp": [], "rest_logmass": [],
                             "tail_plogp": []}
    for s in seqs:
        lp = _log_probs(model, s["input_ids"])  # (L, V)
        if vocab is None:
            vocab = int(lp.shape[-1])
            mode = "exact" if vocab <= settings.exact_max_vocab else "topk"
            k = min(settings.top_k, vocab)
            log.info("KL reference %s: %d sequences, vocab %d, mode %s%s", rid, len(seqs), vocab, mode,
                     f" (k={k})" if mode == "topk" else "")
        cols["argmax"].append(lp.argmax(dim=-1).to(torch.int32).cpu().numpy())
        if mode == "exact":
            cols["logp"].append(lp.cpu().numpy().astype(np.float32).reshape(-1))
        else:
            top_lp, top_ids = torch.topk(lp, k, dim=-1)
            mask = _topk_mask(top_ids, vocab)
            rest = _logsumexp64(lp, ~mask)
            lp64 = lp.double()
            tail = torch.where(mask, torch.zeros_like(lp64), lp64.exp() * lp64).sum(-1)
            cols["topk_ids"].append(top_ids.to(torch.int32).cpu().numpy().reshape(-1))
            cols["topk_logp"].append(top_lp.cpu().numpy().astype(np.float32).reshape(-1))
            cols["rest_logmass"].append(rest.cpu().numpy())
            cols["tail_plogp"].append(tail.cpu().numpy())

    arrays: dict[str, pa.Array] = {
        "seq": pa.array(range(len(seqs)), pa.int32()),
        "source": pa.array([s["source"] for s in seqs], pa.string()),
        "category": pa.array([s["category"] for s in seqs], pa.string()),
        "prompt_id": pa.array([s["prompt_id"] for s in seqs], pa.string()),
        "input_ids": pa.array([s["input_ids"] for s in seqs], pa.list_(pa.int32())),
        "prompt_len": pa.array([s["prompt_len"] for s in seqs], pa.int32()),
        "truncated": pa.array([s["truncated"] for s in seqs], pa.bool_()),
        "argmax": _list_array(cols["argmax"], pa.int32(), large=False),
    }
    if mode == "exact":
        arrays["logp"] = _list_array(cols["logp"], pa.float32(), large=True)
    else:
        arrays["topk_ids"] = _list_array(cols["topk_ids"], pa.int32(), large=True)
        arrays["topk_logp"] = _list_array(cols["topk_logp"], pa.float32(), large=True)
        arrays["rest_logmass"] = _list_array(cols["rest_logmass"], pa.float64(), large=False)
        arrays["tail_plogp"] = _list_array(cols["tail_plogp"], pa.float64(), large=False)

    import transformers

    meta = {
        "format_version": FORMAT_VERSION,
        "reference_id": rid,
        "identity": reference_identity(spec, text_path, settings),
        "mode": mode,
        "vocab_size": vocab,
        "top_k": k if mode == "topk" else None,
        "settings": asdict(settings),
        "baseline_trial_id": spec.trial_id,
        "text_path": text_path,
        "n_positions": int(sum(len(s["input_ids"]) for s in seqs)),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device": str(_device(model)),
    }
    table = pa.table(arrays)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})


def _list_array(chunks: list[np.ndarray], typ: pa.DataType, large: bool) -> pa.Array:
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64 if large else np.int32)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    values = pa.array(np.concatenate(chunks) if chunks else np.zeros(0), typ)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(pa.array(offsets), values)


def reference_meta(reference: pa.Table) -> dict[str, Any]:
    raw = (reference.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise UserError("this table is not a KL reference (no 'sweeper.kl' schema metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"KL reference format {meta.get('format_version')!r} is not supported "
                        f"(this sweeper reads format {FORMAT_VERSION}); delete the reference and rerun the baseline")
    return meta


def write_reference(path: str | os.PathLike, reference: pa.Table) -> None:
    """Atomic write (temporary name, then rename), so a half-written reference is never read as whole."""
    atomic_write_table(Path(path), reference)


def read_reference(path: str | os.PathLike) -> pa.Table:
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise UserError(f"KL reference {path} does not exist; the model's baseline trial writes it") from None
    except Exception as e:
        raise UserError(f"KL reference {path} is unreadable ({type(e).__name__}: {e}); delete it and rerun the baseline") from None
    reference_meta(table)
    return table


# ---------------------------------------------------------------------------------------------------------------
# per-token KL


@dataclass
class TokenKL:
    """Per-position results over the whole token set (positions in reference order)."""

    kl: np.ndarray  # float64 nats, KL(P_ref || Q_model) per position
    top1: np.ndarray  # bool, model argmax == reference argmax
    seq: np.ndarray  # int, sequence index of each position
    source: list[str]  # per sequence
    category: list[str | None]  # per sequence
    mode: str
    # top-k mode only (None in exact mode): per position reference tail mass r and an upper bound on KL - kl
    tail_mass: np.ndarray | None = None
    error_bound: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _row_lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    if isinstance(arr, pa.ChunkedArray):  # pyarrow < 16 may keep chunks for large lists
        arr = pa.concat_arrays(arr.chunks)
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return offsets, values


def _waterfill_bound(neglogq_tail: Any, valid: Any, cap: Any) -> Any:
    """max over tail distributions w with w_j <= cap and sum w = 1 of sum_j w_j * neglogq_tail_j (per row).

    The maximum puts ``cap`` on the largest values until the mass is used up (a linear program over a capped simplex).
    """
    import torch

    vals = neglogq_tail.masked_fill(~valid, float("-inf"))
    s, _ = torch.sort(vals, dim=-1, descending=True)
    i = torch.arange(s.shape[-1], device=s.device, dtype=torch.float64)
    w = torch.clamp(1.0 - i[None, :] * cap[:, None], min=0.0)
    w = torch.minimum(w, cap[:, None].expand_as(w))
    s = s.masked_fill(s == float("-inf"), 0.0)  # outside the tail: weight 0 (a +inf, q_j = 0, stays: no bound)
    return (w * s).sum(-1)


def token_kl(model: Any, reference: pa.Table) -> TokenKL:
    """KL(P_ref || Q_model) and top-1 agreement at every position of the reference's token set."""
    import torch

    def _t(a: np.ndarray) -> Any:  # Arrow buffers are read-only: copy before handing them to torch
        return torch.from_numpy(np.array(a, copy=True))

    meta = reference_meta(reference)
    mode, vocab = meta["mode"], int(meta["vocab_size"])
    dev = _device(model)
    input_ids = reference.column("input_ids").to_pylist()
    argmax_off, argmax_val = _row_lists(reference.column("argmax"))
    if mode == "exact":
        lp_off, lp_val = _row_lists(reference.column("logp"))
    else:
        k = int(meta["top_k"])
        ti_off, ti_val = _row_lists(reference.column("topk_ids"))
        tl_off, tl_val = _row_lists(reference.column("topk_logp"))
        rm_off, rm_val = _row_lists(reference.column("rest_logmass"))
        tp_off, tp_val = _row_lists(reference.column("tail_plogp"))

    kls, top1s, seqidx, tails, bounds = [], [], [], [], []
    for i, ids in enumerate(input_ids):
        lq = _log_probs(model, ids)  # (L, V) float32
        L = lq.shape[0]
        if lq.shape[-1] != vocab:
            raise UserError(f"model vocabulary {lq.shape[-1]} differs from the KL reference's {vocab}: "
                            f"the reference belongs to another model")
        ref_arg = _t(argmax_val[argmax_off[i]:argmax_off[i + 1]].astype(np.int64)).to(dev)
        top1s.append((lq.argmax(dim=-1) == ref_arg).cpu().numpy())
        if mode == "exact":
            lp = _t(lp_val[lp_off[i]:lp_off[i + 1]].reshape(L, vocab)).to(dev).double()
            kl = (lp.exp() * (lp - lq.double())).sum(-1)
        else:
            tid = _t(ti_val[ti_off[i]:ti_off[i + 1]].reshape(L, k).astype(np.int64)).to(dev)
            tlp = _t(tl_val[tl_off[i]:tl_off[i + 1]].reshape(L, k)).to(dev).double()
            rest = _t(rm_val[rm_off[i]:rm_off[i + 1]]).to(dev)
            a_tail = _t(tp_val[tp_off[i]:tp_off[i + 1]]).to(dev)
            mask = _topk_mask(tid, vocab)
            lq_top = torch.gather(lq, 1, tid).double()
            lq_rest = _logsumexp64(lq, ~mask)  # same helper as the reference: identical inputs give identical numbers
            r = rest.exp()
            head = (tlp.exp() * (tlp - lq_top)).sum(-1)
            # Bucket term r log(r / q_rest); 0 when the tail is empty (r == 0).
            bucket = torch.where(r > 0, r * (rest - lq_rest), torch.zeros_like(r))
            kl = head + bucket
            # Error bound: KL - kl = r * (CE(p~, q~) - H(p~)), p~/q~ = tails renormalised. H(p~) is known from the
            # stored sum p log p; CE is at most its water-filling maximum, since every tail p_j <= the k-th top prob.
            bound = torch.zeros_like(r)
            has_tail = r > 0
            if bool(has_tail.any()):
                h_tail = rest - a_tail / r.clamp_min(1e-300)  # H(p~) = log r - A / r
                cap = (tlp[:, -1] - rest).exp()  # p_k / r
                for lo in range(0, L, 64):  # chunks: the sort is L x V float64
                    sl = slice(lo, lo + 64)
                    neglogq_tail = -(lq[sl].double() - lq_rest[sl, None])
                    ce_max = _waterfill_bound(neglogq_tail, ~mask[sl], cap[sl])
                    bound[sl] = torch.where(has_tail[sl], r[sl] * (ce_max - h_tail[sl]).clamp_min(0.0),
                                            torch.zeros_like(r[sl]))
            tails.append(r.cpu().numpy())
            bounds.append(bound.cpu().numpy())
        kls.append(kl.cpu().numpy())
        seqidx.append(np.full(L, i, dtype=np.int64))
    return TokenKL(
        kl=np.concatenate(kls), top1=np.concatenate(top1s), seq=np.concatenate(seqidx),
        source=reference.column("source").to_pylist(), category=reference.column("category").to_pylist(),
        mode=mode, tail_mass=np.concatenate(tails) if tails else None,
        error_bound=np.concatenate(bounds) if bounds else None, meta=meta,
    )


# ---------------------------------------------------------------------------------------------------------------
# metrics


def _cluster_stderr(x: np.ndarray, groups: np.ndarray) -> float | None:
    """Standard error of the mean of ``x`` with positions clustered by sequence (positions in one sequence are
    correlated, so the plain std/sqrt(n) would be too small)."""
    uniq = np.unique(groups)
    g = len(uniq)
    if g < 2 or len(x) == 0:
        return None
    m = x.mean()
    sums = np.bincount(np.searchsorted(uniq, groups), weights=x - m)
    return float(math.sqrt(g / (g - 1) * float((sums ** 2).sum())) / len(x))


def _row(spec: TrialSpec, stage: str, task: str | None, metric: str, value: float, n: int,
         stderr: float | None = None, lo: float | None = None, hi: float | None = None, unit: str | None = None) -> dict[str, Any]:
    return {"trial_id": spec.trial_id, "stage": stage, "task": task, "metric": metric, "batch_size": None,
            "value": float(value), "stderr": stderr, "n": int(n), "min": lo, "max": hi, "unit": unit}


def generation_metrics(model: Any, tokenizer: Any, spec: TrialSpec, prompts: Iterable[tuple[str, list[int]]],
                       gen_tokens: int) -> list[dict[str, Any]]:
    """stage="prompts", task=<category>: success_rate and avg_generated_tokens from greedy generation.

    Success: generate() returned without an exception and the decoded new text (special tokens skipped, up to the
    first EOS) is not blank. avg_generated_tokens counts new tokens before the first EOS, over prompts that did not raise.
    """
    per_cat: dict[str, dict[str, list]] = {}
    eos = _eos_ids(model, tokenizer)
    for cat, ids in prompts:
        d = per_cat.setdefault(cat, {"ok": [], "len": []})
        try:
            new = _greedy(model, tokenizer, ids, gen_tokens)
        except Exception as e:  # a failed generation is a measured outcome, not a crash of the trial
            log.warning("generation failed for a %s prompt: %s: %s", cat, type(e).__name__, e)
            d["ok"].append(False)
            continue
        if new and new[-1] in eos:
            new = new[:-1]
        text = tokenizer.decode(new, skip_special_tokens=True)
        d["ok"].append(bool(text.strip()))
        d["len"].append(len(new))
    rows = []
    for cat, d in per_cat.items():
        ok = np.asarray(d["ok"], dtype=np.float64)
        p = float(ok.mean())
        rows.append(_row(spec, "prompts", cat, "success_rate", p, len(ok),
                         stderr=math.sqrt(p * (1 - p) / len(ok)), unit="fraction"))
        if d["len"]:
            lens = np.asarray(d["len"], dtype=np.float64)
            se = float(lens.std(ddof=1) / math.sqrt(len(lens))) if len(lens) > 1 else None
            rows.append(_row(spec, "prompts", cat, "avg_generated_tokens", lens.mean(), len(lens), stderr=se,
                             lo=float(lens.min()), hi=float(lens.max()), unit="tokens"))
    return rows


def reference_prompts(reference: pa.Table) -> list[tuple[str, list[int]]]:
    """(category, prompt token ids) of the reference's prompts: every trial generates from the very same ids."""
    out = []
    for src, cat, ids, n in zip(reference.column("source").to_pylist(), reference.column("category").to_pylist(),
                                reference.column("input_ids").to_pylist(), reference.column("prompt_len").to_pylist()):
        if src == SOURCE_PROMPT:
            out.append((cat, ids[:n]))
    return out


def kl_metrics(model: Any, tokenizer: Any, reference: pa.Table, spec: TrialSpec) -> list[dict[str, Any]]:
    """Metric rows of one trial against its model's reference (docs/kl.md).

    stage="kl", task=None: kl_mean (stderr clustered by sequence), kl_median, kl_p95, top1_agreement; n = positions.
    In top-k mode also kl_tail_mass (mean reference mass outside the top k) and kl_error_bound (mean upper bound on
    the true KL minus the reported kl).
    stage="prompts", task=<category>: kl_mean, top1_agreement, success_rate, avg_generated_tokens.
    """
    meta = reference_meta(reference)
    if any(meta["identity"].get(k) != v for k, v in _model_key(spec).items()):
        raise UserError(f"KL reference {meta['reference_id']} was made for model {meta['identity']['model']!r}, "
                        f"not for {spec.model.id!r} of trial {spec.trial_id}")
    t = token_kl(model, reference)
    n = len(t.kl)
    rows = [
        _row(spec, "kl", None, "kl_mean", t.kl.mean(), n, stderr=_cluster_stderr(t.kl, t.seq),
             lo=float(t.kl.min()), hi=float(t.kl.max()), unit="nats"),
        _row(spec, "kl", None, "kl_median", float(np.quantile(t.kl, 0.5)), n, unit="nats"),
        _row(spec, "kl", None, "kl_p95", float(np.quantile(t.kl, 0.95)), n, unit="nats"),
        _row(spec, "kl", None, "top1_agreement", t.top1.mean(), n,
             stderr=_cluster_stderr(t.top1.astype(np.float64), t.seq), unit="fraction"),
    ]
    if t.mode == "topk":
        rows.append(_row(spec, "kl", None, "kl_tail_mass", t.tail_mass.mean(), n, lo=float(t.tail_mass.min()),
                         hi=float(t.tail_mass.max()), unit="probability"))
        rows.append(_row(spec, "kl", None, "kl_error_bound", t.error_bound.mean(), n, hi=float(t.error_bound.max()),
                         unit="nats"))
    pos_cat = np.asarray([t.category[s] if t.source[s] == SOURCE_PROMPT else "" for s in t.seq], dtype=object)
    for cat in dict.fromkeys(c for c, src in zip(t.category, t.source) if src == SOURCE_PROMPT):
        sel = pos_cat == cat
        x, g = t.kl[sel], t.seq[sel]
        rows.append(_row(spec, "prompts", cat, "kl_mean", x.mean(), len(x), stderr=_cluster_stderr(x, g),
                         lo=float(x.min()), hi=float(x.max()), unit="nats"))
        rows.append(_row(spec, "prompts", cat, "top1_agreement", t.top1[sel].mean(), len(x), unit="fraction"))
    rows += generation_metrics(model, tokenizer, spec, reference_prompts(reference),
                               int(meta["settings"]["gen_tokens"]))
    log.info("KL %s vs reference %s: mean %.4g nats, top-1 agreement %.4f over %d positions",
             spec.cell, meta["reference_id"], rows[0]["value"], rows[3]["value"], n)
    return rows
