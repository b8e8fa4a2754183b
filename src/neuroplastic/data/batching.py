"""Packed fixed-length training blocks with a resumable position.

The token stream (documents joined by the tokenizer's end-of-text id) is cut into
non-overlapping windows of ``block_size + 1`` tokens; inputs are the first
``block_size`` and targets the last ``block_size`` tokens of a window. Each epoch
visits every window once in an order drawn from ``seed + epoch``, so the whole
sequence of batches is a pure function of ``(seed, epoch, position)`` — which is all
``state_dict()`` stores. Resuming mid-epoch gives exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from neuroplastic.errors import UserError


def join_documents(docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate token lists, each followed by ``eos_id``, into one int32 array."""
    total = sum(len(d) + 1 for d in docs)
    out = np.empty(total, dtype=np.int32)
    i = 0
    for d in docs:
        n = len(d)
        out[i : i + n] = d
        out[i + n] = eos_id
        i += n + 1
    return out


class PackedBlocks:
    """Random-order batches of packed blocks, resumable from ``state_dict()``."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        name: str = "training",
    ):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise UserError(f"The {name} token stream must be 1-D, got shape {tokens.shape}.")
        self.tokens = torch.from_numpy(tokens.astype(np.int64, copy=False))
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_blocks = (len(tokens) - 1) // self.block_size
        if self.num_blocks < 1:
            raise UserError(
                f"The {name} data has {len(tokens)} tokens, fewer than one block of "
                f"{self.block_size + 1}; use more data or a smaller data.block_size."
            )
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_blocks)

    def _window(self, block: int) -> torch.Tensor:
        start = block * self.block_size
        return self.tokens[start : start + self.block_size + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``, each ``(batch_size, block_size)`` int64."""
        picks = []
        for _ in range(self.batch_size):
            if self.position >= self.num_blocks:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            picks.append(int(self._order[self.position]))
            self.position += 1
        windows = torch.stack([self._window(b) for b in picks])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_blocks"]) != self.num_blocks or int(state["block_size"]) != self.block_size:
            raise UserError(
                "The checkpoint's data position belongs to different data "
                f"({state['num_blocks']} blocks of {state['block_size']} tokens, now "
                f"{self.num_blocks} of {self.block_size}); resume with the same data settings."
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size


def sequential_blocks(
    tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: the first ``max_batches`` batches of consecutive blocks.

    The last batch may be smaller; when the stream is shorter than one block the
    single block is as long as the data allows.
    """
    t = torch.from_numpy(np.asarray(tokens).astype(np.int64, copy=False))
    n = (len(t) - 1) // block_size
    if n < 1:
        if len(t) < 2:
            raise UserError("The validation data is empty; use more data or a larger data.val_fraction.")
        return [(t[None, :-1].clone(), t[None, 1:].clone())]
    n = min(n, batch_size * max_batches)
    windows = t[: n * block_size + 1]
    xs = windows[:-1].view(n, block_size)
    ys = windows[1:].reshape(n, block_size)
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]
