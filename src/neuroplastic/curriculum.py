"""Curriculum: stages of training data and when to move from one to the next.

The schedule (:class:`Curriculum`) decides the current stage from the step
(``advance="steps"``: boundaries as fractions of the run) or from the stage's
validation loss (``advance="plateau"``: no improvement of ``min_delta`` for
``patience`` evaluations). :class:`CurriculumStream` serves batches from the current
stage (or from every stage so far with ``cumulative``), each stage with its own
resumable :class:`~neuroplastic.data.batching.PackedBlocks`. Both are fully
described by their ``state_dict()``, so a resumed run is in the same stage at the
same data position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from neuroplastic.data.batching import PackedBlocks
from neuroplastic.errors import UserError


class Curriculum:
    def __init__(
        self,
        stages: list[str],
        max_steps: int,
        advance: str = "steps",
        boundaries: list[float] | None = None,
        patience: int = 3,
        min_delta: float = 0.01,
    ):
        if not stages:
            raise UserError("A curriculum needs at least one stage.")
        self.stages = list(stages)
        self.max_steps = max_steps
        self.advance = advance
        n = len(stages)
        self.boundaries = list(boundaries) if boundaries else [i / n for i in range(1, n)]
        self.patience = patience
        self.min_delta = min_delta
        self.current = 0
        self.best = float("inf")
        self.bad_evals = 0
        self.changes: list[list] = []  # [step, stage index]

    @property
    def stage(self) -> str:
        return self.stages[self.current]

    def stage_for_step(self, step: int) -> int:
        idx = 0
        for b in self.boundaries:
            if step >= round(b * self.max_steps):
                idx += 1
        return min(idx, len(self.stages) - 1)

    def update(self, step: int, val_loss: float | None = None) -> bool:
        """Move to the next stage when due; returns True when the stage changed."""
        old = self.current
        if self.advance == "steps":
            self.current = max(self.current, self.stage_for_step(step))
        elif val_loss is not None and self.current < len(self.stages) - 1:
            if val_loss < self.best - self.min_delta:
                self.best = val_loss
                self.bad_evals = 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= self.patience:
                    self.current += 1
                    self.best = float("inf")
                    self.bad_evals = 0
        if self.current != old:
            self.changes.append([step, self.current])
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "changes": [list(c) for c in self.changes],
            "stages": list(self.stages),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["stages"]) != self.stages:
            raise UserError(
                f"The checkpoint's curriculum stages {state['stages']} differ from the config's "
                f"{self.stages}; resume with the same curriculum."
            )
        self.current = int(state["current"])
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])
        self.changes = [list(c) for c in state["changes"]]


class CurriculumStream:
    """Batches from the current stage of a :class:`Curriculum` (resumable)."""

    def __init__(
        self,
        stage_tokens: dict[str, np.ndarray],
        schedule: Curriculum,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        cumulative: bool = False,
    ):
        self.schedule = schedule
        self.cumulative = cumulative
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.loaders = {
            name: PackedBlocks(stage_tokens[name], block_size, batch_size, seed=seed + i,
                               name=f"curriculum stage {name!r}")
            for i, name in enumerate(schedule.stages)
        }
        self._mix_draws = 0  # the stage of mixed draw i comes from rng([seed, 7919, i])

    @property
    def epoch(self) -> int:
        return self.loaders[self.schedule.stage].epoch

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.schedule.current
        if self.cumulative and idx > 0:
            # one stage per batch, uniformly over the stages reached so far
            rng = np.random.default_rng([self.seed, 7919, self._mix_draws])
            idx = int(rng.integers(0, idx + 1))
            self._mix_draws += 1
        return self.loaders[self.schedule.stages[idx]].next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.state_dict(),
            "loaders": {k: v.state_dict() for k, v in self.loaders.items()},
            "mix_draws": self._mix_draws,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "schedule" not in state:
            raise UserError(
                "The checkpoint was trained without a curriculum; resume with the same curriculum settings."
            )
        self.schedule.load_state_dict(state["schedule"])
        for k, v in state["loaders"].items():
            if k in self.loaders:
                self.loaders[k].load_state_dict(v)
        self._mix_draws = int(state.get("mix_draws", 0))
