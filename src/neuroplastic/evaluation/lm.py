"""Language-model metrics: loss (nats/token), perplexity, bits per byte; the windows they
are measured over (:func:`sliding_windows`, the model's own context by default)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from neuroplastic.models.api import CausalLM, supports_targets_only
from neuroplastic.models.hf import hf_context_length


@torch.no_grad()
def lm_metrics(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    device: torch.device | str = "cpu",
    autocast=None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte of ``model`` over ``(inputs, targets)`` batches.

    ``model(x)`` must return ``(logits, _)``. Bits per byte divide the total negative
    log-likelihood (in bits) by the number of bytes of text the target tokens stand for
    (``byte_lengths[token_id]``; 0 for special tokens), so it is comparable across
    tokenizers; for a byte-level model it is the usual BPC. Targets equal to ``-100``
    (padding, prompt tokens of a supervised example, context-only positions of a sliding
    window) are left out of all three. ``progress`` shows a tqdm bar over the batches. A
    model that takes ``targets_only`` (a Hugging Face model) runs its output layer only
    where there are targets.
    """
    was_training = model.training
    model.eval()
    targets_only = supports_targets_only(model)
    nll, ntok, nbytes = 0.0, 0, 0
    byte_lengths = byte_lengths.cpu()
    if progress:
        import sys

        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating", unit="batch", file=sys.stderr, leave=False,
                       dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        kept = y[y != -100].cpu()
        if targets_only:
            # the model's mean over the kept targets, logits only at their positions
            with autocast() if autocast is not None else contextlib.nullcontext():
                _, loss = model(x, y, targets_only=True)
            nll += float(loss) * kept.numel() if kept.numel() else 0.0
        else:
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits, _ = model(x)
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            )
            nll += float(loss)  # cross_entropy skips targets == -100 (its ignore_index)
        ntok += kept.numel()
        nbytes += int(byte_lengths[kept].sum())
    model.train(was_training)
    mean = nll / max(ntok, 1)
    return {
        "loss": mean,
        "ppl": math.exp(min(mean, 50.0)),
        "bpb": nll / math.log(2) / max(nbytes, 1),
        "tokens": ntok,
    }


# =========================================================================== windows

# What one window costs beyond the model itself: its logits in float32, a float copy and
# cross_entropy's softmax (bytes per position per vocabulary entry).
_BYTES_PER_LOGIT = 12


def model_context(model: torch.nn.Module, tokenizer: object = None) -> int | None:
    """The context length ``model`` was built for: a
    :class:`~neuroplastic.models.api.CausalLM`'s ``context_length``; for a bare Hugging
    Face model its config's (:func:`~neuroplastic.models.hf.hf_context_length`), else the
    tokenizer's ``model_max_length``; None when nothing says."""
    if isinstance(model, CausalLM):
        return model.context_length
    value = hf_context_length(getattr(model, "config", None))
    if value is not None:
        return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return None


def free_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory on ``device``: CUDA's ``mem_get_info``, else MemAvailable of
    /proc/meminfo; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fit_to_memory(
    window: int, batch_size: int, vocab_size: int, free_bytes: int | None
) -> tuple[int, int, str | None]:
    """``(window, batch_size, note)`` such that one batch's logits (``window x vocab``
    floats, with the copies the loss makes) take at most half of ``free_bytes``; ``note``
    says what was lowered and why (None when nothing was)."""
    if not free_bytes:
        return window, batch_size, None
    budget = free_bytes // 2
    per_row = window * vocab_size * _BYTES_PER_LOGIT
    gb = 1024**3
    if per_row > budget:
        new = max(1, budget // (vocab_size * _BYTES_PER_LOGIT))
        note = (
            f"window lowered from {window} to {new} tokens: one window of {window} needs "
            f"~{per_row / gb:.1f} GB for its logits and {free_bytes / gb:.1f} GB is free "
            "(pass --context to choose)"
        )
        return int(new), 1, note
    if batch_size * per_row > budget:
        new_b = max(1, budget // per_row)
        return window, int(new_b), (
            f"batch size lowered from {batch_size} to {new_b} windows of {window} tokens to "
            f"fit {free_bytes / gb:.1f} GB of free memory"
        )
    return window, batch_size, None


def sliding_windows(
    tokens,
    window: int,
    stride: int | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Evaluation batches that score every token of ``tokens`` once, as Hugging Face's
    perplexity guide does.

    Window ``k`` reads ``tokens[s : s + window]`` (``s = k * stride``) and predicts the next
    token at each position; targets already scored by an earlier window are ``-100``, so
    each window after the first scores its last ``stride`` targets with up to ``window -
    stride`` tokens of context. ``stride == window`` (the default) is disjoint blocks. The
    first token is only context. The last window may be shorter (padded with target
    ``-100``). ``max_batches`` keeps the first batches of ``batch_size`` windows. Returns
    ``(batches, info)`` with ``info = {"window", "stride", "windows", "targets",
    "stream_tokens", "scored_end"}`` (``scored_end``: targets ``tokens[1:scored_end]``
    are scored).
    """
    import numpy as np

    stride = window if stride is None else stride
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 1 and 1 <= stride <= window, got {window}, {stride}")
    t = torch.from_numpy(np.asarray(tokens).astype(np.int64, copy=False))
    n = len(t)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    prev_end = 1  # targets t[1:prev_end] are scored
    s = 0
    limit = None if max_batches is None else max_batches * batch_size
    while prev_end < n and (limit is None or len(rows) < limit):
        end = min(s + window + 1, n)  # x = t[s:end-1], y = t[s+1:end]
        x = t[s : end - 1]
        y = t[s + 1 : end].clone()
        y[: max(0, prev_end - (s + 1))] = -100
        rows.append((x, y))
        prev_end = end
        s += stride
    batches = []
    for i in range(0, len(rows), batch_size):
        group = rows[i : i + batch_size]
        width = max(len(x) for x, _ in group)
        xs = torch.zeros((len(group), width), dtype=torch.long)
        ys = torch.full((len(group), width), -100, dtype=torch.long)
        for b, (x, y) in enumerate(group):
            xs[b, : len(x)] = x
            ys[b, : len(y)] = y
        batches.append((xs, ys))
    info = {
        "window": window,
        "stride": stride,
        "windows": len(rows),
        "targets": max(prev_end - 1, 0),
        "stream_tokens": n,
        "scored_end": prev_end,
    }
    return batches, info
