"""Text generation with stop strings for evaluation (chain-of-thought answers, lm-eval).

:func:`generate_until` continues a prompt with any of our models (GPT, Hebbian LM,
:class:`~neuroplastic.models.hf.HFCausalLM`: ``model.generate(idx, max_new_tokens, ...)``)
until the end-of-text token, a stop string or ``max_new_tokens``. The model's own
sampling loop has no stop strings, so generation runs in chunks of ``chunk`` tokens and
the text is checked after each; the result is cut before the first stop string. Chunks
re-read the prompt (one forward pass each), which is cheap next to token-by-token
decoding. ``temperature=0`` is greedy.

Tokenizers are ours or ``transformers`` ones (through
:func:`~neuroplastic.data.tokenizers.as_tokenizer`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from neuroplastic.data.tokenizers import as_tokenizer
from neuroplastic.errors import UserError
from neuroplastic.models.api import CausalLM

__all__ = ["check_finite_weights", "check_sampling", "generate_until"]


def check_sampling(
    *, temperature: float, top_k: int | None = None, top_p: float | None = None,
    num_samples: int = 1, max_new_tokens: int = 1,
) -> None:
    """UserError (naming the command-line option) for sampling settings that cannot work."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 means no top-k filter), got {top_k}.")
    if top_p is not None and not (0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1] (1 means no nucleus filter), got {top_p}.")
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}.")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}.")


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """UserError when any parameter or floating-point buffer of ``model`` holds NaN or inf."""
    bad = total = 0
    names: list[str] = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not torch.is_floating_point(t):
            continue
        n = int((~torch.isfinite(t.detach())).sum())
        total += t.numel()
        if n:
            bad += n
            names.append(name)
    if bad:
        raise UserError(
            f"the weights in {where} are not finite ({bad:,} of {total:,} values are NaN or inf, first in "
            f"{names[0]}); the run diverged before this checkpoint was saved, so generate from an earlier "
            "checkpoint (a checkpoints/step_N folder) or retrain with a lower learning rate."
        )


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return text, False
    return text[: min(hits)], True


@torch.no_grad()
def generate_until(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    until: Sequence[str] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    chunk: int = 64,
) -> str:
    """The text generated after ``prompt`` (a string or token ids), cut before the first
    string of ``until``; stops at end-of-text or after ``max_new_tokens`` tokens."""
    codec = as_tokenizer(tokenizer)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else "cpu"
    ids = codec.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        ids = [codec.prefix_id]
    window = model.context_length if isinstance(model, CausalLM) else None
    new: list[int] = []
    text = ""
    while len(new) < max_new_tokens:
        context = ids + new
        if window is not None:
            context = context[-window:]
        step = min(chunk, max_new_tokens - len(new))
        out = model.generate(
            torch.tensor([context], device=device), step, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_id=codec.eos_id, generator=generator,
        )
        got = out[0, len(context):].tolist()
        ended = codec.eos_id is not None and codec.eos_id in got
        if ended:
            got = got[: got.index(codec.eos_id)]
        new.extend(got)
        text, stopped = _cut(codec.decode(new), until)
        if stopped or ended or not got:
            return text
    return text
