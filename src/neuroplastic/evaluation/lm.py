"""Language-model metrics: loss (nats/token), perplexity, bits per byte."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def lm_metrics(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    device: torch.device | str = "cpu",
    autocast=None,
) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte of ``model`` over ``(inputs, targets)`` batches.

    ``model(x)`` must return ``(logits, _)``. Bits per byte divide the total negative
    log-likelihood (in bits) by the number of bytes of text the target tokens stand for
    (``byte_lengths[token_id]``; 0 for special tokens), so it is comparable across
    tokenizers; for a byte-level model it is the usual BPC. Targets equal to ``-100``
    (padding, prompt tokens of a supervised example) are left out of all three.
    """
    was_training = model.training
    model.eval()
    nll, ntok, nbytes = 0.0, 0, 0
    byte_lengths = byte_lengths.cpu()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits, _ = model(x)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        )
        nll += float(loss)  # cross_entropy skips targets == -100 (its ignore_index)
        kept = y[y != -100].cpu()
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
