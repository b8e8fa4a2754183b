"""What the gradient trainer measures while it trains, besides the loss: validation
metrics over its validation sets and samples from the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from neuroplastic.config import RunConfig
from neuroplastic.evaluation.lm import lm_metrics
from neuroplastic.training.inputs import stage_means


def validation_metrics(
    model: torch.nn.Module,
    val_sets: dict[str, list],
    byte_lengths: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], Any],
    curriculum: Any = None,
) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte of ``model``.

    Without a curriculum, the metrics of ``val_sets["val"]``. With one, every stage is
    evaluated: ``loss``/``ppl``/``bpb`` are the means over stages, ``<stage>/loss`` each
    stage's, ``stage_loss`` the current one's.
    """
    results = {
        name: lm_metrics(model, batches, byte_lengths, device, autocast)
        for name, batches in val_sets.items()
    }
    return results["val"] if curriculum is None else stage_means(results, curriculum)


@torch.no_grad()
def sample_text(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    device: torch.device,
    step: int,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = 50,
    seed: int | None = None,
) -> str:
    """``prompt`` (default ``train.sample_prompt``) and its continuation by ``model``.

    Sampling uses its own generator, seeded by ``seed`` (default ``train.seed + step``),
    so it does not disturb the training RNG; the model's train/eval mode is restored.
    """
    prompt = cfg.train.sample_prompt if prompt is None else prompt
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    ids = ids[-cfg.model.block_size :]
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.train.seed + step if seed is None else seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        torch.tensor([ids], device=device),
        max_new_tokens or cfg.train.sample_tokens,
        temperature=cfg.train.sample_temperature if temperature is None else temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=gen,
    )
    model.train(was_training)
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())
