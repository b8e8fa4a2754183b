"""Synaptic tagging and capture into a slow weight copy, plus a replay buffer.

Every ``interval`` steps (in ``after_step``) each selected weight gets a score:

* ``tag_on="drift"``: ``|theta - theta_ref|``, the change since the weight was last
  captured (``theta_ref`` starts at the bound weights and is reset to ``theta`` for
  every tagged weight after capture);
* ``tag_on="change"``: a running mean of recent changes,
  ``m <- change_decay * m + (1 - change_decay) * |theta - theta_prev|`` where
  ``theta_prev`` is the weight at the previous check (``change_decay=0``: just the
  last change).

A weight is *tagged* when its score is larger than the threshold: ``threshold``
(absolute) or, with ``quantile=q``, the larger of ``threshold`` and the ``q``-quantile
of the scores of its parameter tensor (so about a fraction ``1-q`` of each tensor is
tagged). Tagged weights are *captured* into a slow copy::

    slow <- slow + capture_rate * tag * (theta - slow)

and, with ``pull > 0``, all fast weights are pulled toward the slow copy afterwards::

    theta <- theta - pull * (theta - slow)

(a soft reset toward what was consolidated; ``pull=0`` leaves the fast weights alone,
so the slow copy is just a consolidated read-out, e.g. to evaluate or to swap in).
``theta_prev`` / ``theta_ref`` are taken after the pull. Buffers of float16/bfloat16
parameters are float32.

:class:`ReplayBuffer` keeps a uniform sample of past batches (reservoir sampling) for
a trainer to interleave with new data; ``Consolidation(replay_capacity=n)`` owns one
(``rule.replay``) and saves it with its state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule


def _buffer_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _detach_batch(obj: Any, device: str | torch.device | None) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return (t if device is None else t.to(device)).clone()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise UserError(f"ReplayBuffer batches need str or int dict keys, got {k!r}.")
            out[k] = _detach_batch(v, device)
        return out
    # a namedtuple keeps its type in memory (it is a plain tuple after a checkpoint reload)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_detach_batch(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        items = [_detach_batch(v, device) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise UserError(
        f"ReplayBuffer can store tensors, dicts/lists/tuples of them and plain scalars, "
        f"not {type(obj).__name__}."
    )


def _clone_batch(obj: Any) -> Any:
    return _detach_batch(obj, None)


class ReplayBuffer:
    """A fixed-size uniform sample of all batches ever added (reservoir sampling).

    ``add(batch)`` keeps a detached copy (on ``device``, CPU by default; None keeps the
    batch's device) of every batch until ``capacity`` is reached; after that the
    ``n``-th batch replaces a random slot with probability ``capacity / n`` (Algorithm R),
    so the buffer is always a uniform sample of everything seen. ``sample(k)`` returns
    ``min(k, len)`` distinct stored batches in random order. All randomness comes from
    a private generator seeded with ``seed``; its state is part of :meth:`state_dict`,
    so a resumed buffer continues identically.
    """

    def __init__(self, capacity: int, seed: int = 0, device: str | torch.device | None = "cpu"):
        if int(capacity) < 1:
            raise UserError(f"ReplayBuffer capacity must be >= 1, got {capacity}.")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self.device = device
        self.items: list[Any] = []
        self.seen = 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self.items)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def add(self, batch: Any) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(_detach_batch(batch, self.device))
            return
        j = self._randint(self.seen)  # uniform in [0, seen)
        if j < self.capacity:
            self.items[j] = _detach_batch(batch, self.device)

    def sample(self, k: int) -> list[Any]:
        """``min(k, len(self))`` distinct stored batches (copies), in random order."""
        if not self.items or k <= 0:
            return []
        idx = torch.randperm(len(self.items), generator=self.generator)[: int(k)]
        return [_clone_batch(self.items[i]) for i in idx.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "seen": self.seen,
            "items": list(self.items),
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        items = list(state.get("items") or [])
        if len(items) > self.capacity:
            raise UserError(
                f"Saved replay buffer holds {len(items)} batches but the capacity is "
                f"{self.capacity}; resume with the same capacity."
            )
        self.items = [_detach_batch(b, self.device) for b in items]
        self.seen = int(state.get("seen", len(items)))
        rng = state.get("rng")
        if rng is not None:
            self.generator.set_state(rng.to(dtype=torch.uint8, device="cpu").clone())


class Consolidation(Rule):
    """Synaptic tagging and capture into a slow copy (see module docs).

    Args:
        params, exclude, min_dim: parameter selection.
        tag_on: ``"drift"`` (change since last capture) or ``"change"`` (recent change).
        threshold: absolute score above which a weight is tagged.
        quantile: if set (0..1), tag above ``max(threshold, q-quantile of the tensor's scores)``.
        capture_rate: fraction of the fast-slow gap the slow copy closes where tagged.
        pull: fraction of the fast-slow gap the fast weights close (all weights), 0 = off.
        change_decay: EMA decay of ``|change|`` for ``tag_on="change"``.
        interval: run every this many steps.
        replay_capacity: >0 creates ``self.replay``, a :class:`ReplayBuffer` saved with the rule.
        replay_seed: seed of that buffer.
    """

    name = "consolidation"

    def __init__(
        self,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
        min_dim: int = 0,
        tag_on: str = "drift",
        threshold: float = 1e-3,
        quantile: float | None = None,
        capture_rate: float = 0.1,
        pull: float = 0.0,
        change_decay: float = 0.0,
        interval: int = 1,
        replay_capacity: int = 0,
        replay_seed: int = 0,
    ):
        super().__init__(params=params, exclude=exclude, min_dim=min_dim)
        if tag_on not in ("drift", "change"):
            raise UserError(f"Consolidation tag_on must be 'drift' or 'change', got {tag_on!r}.")
        if threshold < 0:
            raise UserError(f"Consolidation threshold must be >= 0, got {threshold}.")
        if quantile is not None and not 0 <= quantile < 1:
            raise UserError(f"Consolidation quantile must be in [0, 1), got {quantile}.")
        if not 0 <= capture_rate <= 1:
            raise UserError(f"Consolidation capture_rate must be in [0, 1], got {capture_rate}.")
        if not 0 <= pull <= 1:
            raise UserError(f"Consolidation pull must be in [0, 1], got {pull}.")
        if not 0 <= change_decay < 1:
            raise UserError(f"Consolidation change_decay must be in [0, 1), got {change_decay}.")
        if int(interval) < 1:
            raise UserError(f"Consolidation interval must be >= 1, got {interval}.")
        self.tag_on = tag_on
        self.threshold = float(threshold)
        self.quantile = None if quantile is None else float(quantile)
        self.capture_rate = float(capture_rate)
        self.pull = float(pull)
        self.change_decay = float(change_decay)
        self.interval = int(interval)
        self.replay = (
            ReplayBuffer(int(replay_capacity), int(replay_seed))
            if int(replay_capacity) > 0
            else None
        )
        self.slow: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []  # theta at last capture (drift) / previous check (change)
        self.score: list[torch.Tensor] = []
        self.tags: list[torch.Tensor] = []
        self.checks = 0

    def setup(self) -> None:
        self.slow = [p.detach().to(_buffer_dtype(p)).clone() for p in self.params]
        self.ref = [p.detach().to(_buffer_dtype(p)).clone() for p in self.params]
        self.score = [torch.zeros_like(p, dtype=_buffer_dtype(p)) for p in self.params]
        self.tags = [torch.zeros_like(p, dtype=torch.bool) for p in self.params]
        self.checks = 0

    # ------------------------------------------------------------------ the rule

    def _theta(self) -> list[torch.Tensor]:
        return [
            p.detach() if p.dtype == _buffer_dtype(p) else p.detach().float() for p in self.params
        ]

    def thresholds(self, scores: list[torch.Tensor]) -> list[torch.Tensor | float]:
        if self.quantile is None:
            return [self.threshold] * len(scores)
        out: list[torch.Tensor | float] = []
        for s in scores:
            flat = s.reshape(-1)
            k = min(max(int(round(self.quantile * flat.numel())), 1), flat.numel())
            q = flat.kthvalue(k).values  # kthvalue: no size limit, unlike torch.quantile
            out.append(torch.clamp(q, min=self.threshold))
        return out

    def check(self) -> None:
        """One tag / capture / pull pass now (regardless of ``interval``)."""
        theta = self._theta()
        delta = torch._foreach_sub(theta, self.ref)
        torch._foreach_abs_(delta)
        if self.tag_on == "drift":
            self.score = delta
        else:
            torch._foreach_mul_(self.score, self.change_decay)
            torch._foreach_add_(self.score, delta, alpha=1 - self.change_decay)
        thr = self.thresholds(self.score)
        self.tags = [s > t for s, t in zip(self.score, thr)]
        # capture: slow += capture_rate * tag * (theta - slow)
        gap = torch._foreach_sub(theta, self.slow)
        masks = [t.to(g.dtype) for t, g in zip(self.tags, gap)]
        torch._foreach_mul_(gap, masks)
        torch._foreach_add_(self.slow, gap, alpha=self.capture_rate)
        if self.pull > 0:
            with torch.no_grad():
                gap = torch._foreach_sub(theta, self.slow)
                torch._foreach_mul_(gap, self.pull)
                for p, g in zip(self.params, gap):
                    p.sub_(g.to(p.dtype))
            theta = self._theta()
        if self.tag_on == "drift":
            self.ref = [torch.where(t, th, r) for t, th, r in zip(self.tags, theta, self.ref)]
        else:
            self.ref = [th.clone() for th in theta]
        self.checks += 1
        self.acted += 1

    def after_step(self, advantage: float | None) -> None:
        if (self.step_count + 1) % self.interval == 0:
            self.check()

    def stats(self) -> dict[str, float]:
        n = sum(t.numel() for t in self.tags)
        tagged = sum(int(t.sum()) for t in self.tags)
        diff = torch._foreach_sub(self._theta(), self.slow)
        dist = torch.stack([d.float().pow(2).sum() for d in diff]).sum().sqrt()
        out = {
            "tagged_fraction": tagged / max(n, 1),
            "slow_fast_distance": float(dist),
        }
        if self.replay is not None:
            out["replay_size"] = float(len(self.replay))
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            slow=list(self.slow),
            ref=list(self.ref),
            score=list(self.score),
            tags=list(self.tags),
            checks=self.checks,
            replay=None if self.replay is None else self.replay.state_dict(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)

        def load(key: str, dtype_of=_buffer_dtype) -> list[torch.Tensor]:
            return [
                t.to(dtype_of(p)) for t, p in zip(self._check_buffers(state[key], key), self.params)
            ]

        self.slow = load("slow")
        self.ref = load("ref")
        self.score = load("score")
        self.tags = load("tags", lambda p: torch.bool)
        self.checks = int(state.get("checks", 0))
        saved_replay = state.get("replay")
        if (saved_replay is None) != (self.replay is None):
            raise UserError(
                "Saved consolidation state and the rule disagree on replay_capacity (one has a "
                "replay buffer, the other not); resume with the same rule settings."
            )
        if self.replay is not None:
            self.replay.load_state_dict(saved_replay)
