"""Text generation with stop strings for evaluation (chain-of-thought answers, lm-eval).

:func:`generate_until` continues a prompt with any of our models (GPT, Hebbian LM,
:class:`~neuroplastic.models.hf.HFCausalLM`: ``model.generate(idx, max_new_tokens, ...)``)
until the end-of-text token, a stop string or ``max_new_tokens``. The model's own
sampling loop has no stop strings, so generation runs in chunks of ``chunk`` tokens and
the text is checked after each; the result is cut before the first stop string. Chunks
re-read the prompt (one forward pass each), which is cheap next to token-by-token
decoding. ``temperature=0`` is greedy.

Tokenizers are ours (``encode``/``decode``/``eos_id``) or ``transformers`` ones
(``encode(add_special_tokens=False)``, ``decode(skip_special_tokens=True)``,
``eos_token_id``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from neuroplastic.errors import UserError

__all__ = ["TextCodec", "check_finite_weights", "check_sampling", "generate_until"]


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


class TextCodec:
    """encode / decode / eos for our tokenizers and ``transformers`` tokenizers alike."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.own = hasattr(tokenizer, "eos_id") and not hasattr(tokenizer, "eos_token_id")
        if self.own:
            self.eos_id = int(tokenizer.eos_id)
        else:
            eos = getattr(tokenizer, "eos_token_id", None)
            self.eos_id = None if eos is None else int(eos)

    def encode(self, text: str) -> list[int]:
        if self.own:
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if self.eos_id is None or int(i) != self.eos_id]
        if self.own:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def prefix_id(self) -> int:
        """A token to start from when the prompt is empty (bos, else eos)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if isinstance(bos, int):
            return bos
        return self.eos_id if self.eos_id is not None else 0


def _window(model: torch.nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "block_size", None)
    return int(value) if isinstance(value, int) and value > 0 else None


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
    codec = tokenizer if isinstance(tokenizer, TextCodec) else TextCodec(tokenizer)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else "cpu"
    ids = codec.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        ids = [codec.prefix_id]
    window = _window(model)
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
