"""Small, reproducible NeuroGen experiments: a corpus split, a fixed-budget training run,
held-out loss, and the unigram entropy to beat (used by the ablation, benchmark and tests)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuroplastic.errors import UserError


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str
    tokenizer: Any = None


def load_corpus(spec: str = "tinyshakespeare", tokenizer: str = "byte", val_fraction: float = 0.1,
                data_dir: str | None = None, max_chars: int = 0, field_name: str = "text") -> Corpus:
    """Token ids of a text source, the last ``val_fraction`` held out."""
    from neuroplastic.data.sources import load_documents
    from neuroplastic.data.tokenizers import build_tokenizer

    docs = load_documents(spec, field=field_name, data_dir=data_dir, max_chars=max_chars)
    tok = build_tokenizer(tokenizer, lambda: iter(docs))
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d))
        ids.append(tok.eos_id)
    arr = np.asarray(ids, dtype=np.int64)
    split = int(len(arr) * (1 - val_fraction))
    if split < 2 or len(arr) - split < 2:
        raise UserError(f"{spec} is too short to hold out {val_fraction:.0%} for validation.")
    return Corpus(arr[:split], arr[split:], tok.vocab_size, f"{spec} ({tok.kind} tokens)", tok)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best context-free model."""
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def windows(tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    x = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    return x[:, :-1], x[:, 1:]


def heldout_blocks(tokens: np.ndarray, seq_len: int, n_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_seq`` consecutive blocks of ``seq_len`` (+1) held-out tokens."""
    n = min(n_seq, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise UserError(f"the held-out split has fewer than {seq_len + 1} tokens.")
    arr = tokens[: n * seq_len + 1]
    return arr[:-1].reshape(n, seq_len), arr[1:].reshape(n, seq_len)


def heldout_loss(model, val: tuple[np.ndarray, np.ndarray], chunk: int = 32) -> float:
    x, y = val
    losses = [model.evaluate(x[i : i + chunk], y[i : i + chunk]) * len(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return float(sum(losses) / len(x))


@dataclass
class RunResult:
    steps: int
    tokens: int
    seconds: float
    val_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, held-out loss)
    train_losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train_fixed(model, corpus: Corpus, steps: int, batch: int, seq_len: int, seed: int,
                val: tuple[np.ndarray, np.ndarray], eval_every: int = 0,
                on_step: Callable[[int, float], None] | None = None) -> RunResult:
    """``steps`` train_steps on random windows (seeded), held-out loss at the end (and every
    ``eval_every`` steps); timing counts training only."""
    rng = np.random.default_rng(seed)
    res = RunResult(0, 0, 0.0, math.nan)
    if eval_every:
        res.curve.append((0, heldout_loss(model, val)))
    for s in range(1, steps + 1):
        x, y = windows(corpus.train, batch, seq_len, rng)
        t = time.perf_counter()
        loss = model.train_step(x, y)
        res.seconds += time.perf_counter() - t
        res.steps, res.tokens = s, res.tokens + x.size
        res.train_losses.append(loss)
        if on_step is not None:
            on_step(s, loss)
        if eval_every and (s % eval_every == 0 or s == steps):
            res.curve.append((res.tokens, heldout_loss(model, val)))
    res.val_loss = res.curve[-1][1] if res.curve and res.curve[-1][0] == res.tokens else heldout_loss(model, val)
    return res
