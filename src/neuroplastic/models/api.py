"""The model and tokenizer interfaces the upper layers (training, evaluation) work through.

:class:`CausalLM` is what the GPT, the Hebbian LM and the Hugging Face wrapper
(:class:`~neuroplastic.models.hf.HFCausalLM`) have in common; they get ``device``,
``context_length`` and ``supports_long_context`` from :class:`LanguageModel`.
:class:`TokenizerAdapter` is what our tokenizers
(:class:`~neuroplastic.data.tokenizers.Tokenizer`) and a wrapped ``transformers`` tokenizer
(:class:`~neuroplastic.data.tokenizers.TransformersTokenizer`, see
:func:`~neuroplastic.data.tokenizers.as_tokenizer`) have in common.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from neuroplastic.runtime import model_device

__all__ = ["CausalLM", "LanguageModel", "TokenizerAdapter", "forward_targets",
           "supports_targets_only"]


@runtime_checkable
class CausalLM(Protocol):
    """A causal language model.

    * ``logits, loss = model(idx, targets)``: ``idx`` and ``targets`` are ``(B, T)`` token
      ids with ``T <= context_length``, ``targets`` aligned with ``idx`` (already the next
      tokens); ``logits`` is ``(B, T, vocab)`` and ``loss`` the mean cross-entropy over
      targets that are not ``-100`` (``None`` without targets).
    * ``generate(idx, max_new_tokens, ...)`` continues ``(B, T)`` prompts: ``(B, T + new)``.
    * ``context_length``: the longest sequence one forward call takes; ``generate`` keeps
      the last ``context_length`` tokens unless ``supports_long_context`` (a recurrent
      memory carries the context past it).
    * ``device``: where the parameters are.
    """

    supports_long_context: bool

    @property
    def context_length(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


def _innermost(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` / DDP / FSDP wrappers."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            module = getattr(model, "module", None)
            inner = module if isinstance(module, nn.Module) else None
        if inner is None:
            return model
        model = inner
    return model


def supports_targets_only(model: nn.Module) -> bool:
    """Whether ``model`` (through compile/DDP/FSDP wrappers) takes ``targets_only=True``:
    the loss of ``model(idx, targets)`` with the output layer run only where there are
    targets (:class:`~neuroplastic.models.hf.HFCausalLM`)."""
    return bool(getattr(_innermost(model), "accepts_targets_only", False))


def forward_targets(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits, loss = model(idx, targets)``, computing logits only where they are needed
    when the model can (:func:`supports_targets_only`): the same loss, and ``logits``
    ``(N, vocab)``, one row per target that is not ``-100`` in row-major order (other
    models: ``(B, T, vocab)`` as usual). With a prompt masked by ``-100`` (supervised
    fine-tuning) this skips the output layer and its softmax over the prompt's positions
    (and over padding)."""
    if supports_targets_only(model):
        return model(idx, targets, targets_only=True)
    return model(idx, targets)


class LanguageModel(nn.Module):
    """Base of our :class:`CausalLM` models: ``device``, ``context_length`` from
    ``config.block_size`` and ``supports_long_context`` (False unless a subclass says)."""

    supports_long_context: bool = False
    config: Any

    @property
    def context_length(self) -> int:
        return int(self.config.block_size)

    @property
    def device(self) -> torch.device:
        return model_device(self)


@runtime_checkable
class TokenizerAdapter(Protocol):
    """A tokenizer: ``encode`` adds no special tokens, ``decode`` drops them.

    ``eos_id`` is the end-of-text id (None when the tokenizer has none), ``pad_id`` the id
    that fills batches, ``prefix_id`` the token that stands in for an empty context (bos,
    else eos, else 0).
    """

    vocab_size: int
    eos_id: int | None
    pad_id: int
    prefix_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...
