"""Perplexity stage: token perplexity of a text file over non-overlapping windows (the GPTQ convention).

The file is read whole, tokenized once (no special tokens added), cut to ``max_tokens`` if set, and split into
``len // context`` non-overlapping windows of ``context`` tokens (a shorter tail is dropped). Each window is scored on
its own: the mean negative log-likelihood of tokens 2..context given the tokens before them in that window.
token_perplexity = exp(total NLL / tokens scored). Numbers depend on the tokenizer, so compare within one model.
"""
from __future__ import annotations

import math

from ..errors import StageError
from ..study import Perplexity


def token_ids(tokenizer, path: str, max_tokens: int | None) -> list[int]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids


def token_perplexity(model, tokenizer, settings: Perplexity) -> list[dict]:
    import torch
    import torch.nn.functional as F

    ids = token_ids(tokenizer, settings.path, settings.max_tokens)
    n_windows = len(ids) // settings.context
    if n_windows == 0:
        raise StageError(f"{settings.path} has {len(ids)} tokens, fewer than one window of {settings.context}",
                         "TextTooShort")
    data = torch.tensor(ids[: n_windows * settings.context]).view(n_windows, settings.context)
    total_nll, scored = 0.0, 0
    with torch.inference_mode():
        for w in data:
            x = w.unsqueeze(0).to(model.device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            if not torch.isfinite(logits).all():
                raise StageError("the model produced NaN/inf logits in the perplexity stage", "NaNLogits")
            nll = F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            total_nll += nll
            scored += x.shape[1] - 1
    mean_nll = total_nll / scored
    return [
        {"stage": "perplexity", "metric": "token_perplexity", "value": math.exp(mean_nll), "n": scored, "unit": "ppl"},
        {"stage": "perplexity", "metric": "token_nll_mean", "value": mean_nll, "n": scored, "unit": "nats/token"},
        {"stage": "perplexity", "metric": "windows", "value": float(n_windows), "unit": f"windows of {settings.context}"},
    ]
