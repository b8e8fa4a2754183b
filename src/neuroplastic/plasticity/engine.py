"""PlasticityEngine: runs a list of rules beside any model and optimizer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule


class RewardBaseline:
    """Turns a reward into an advantage against a running baseline (EMA of reward).

    ``advantage_t = r_t - b_{t-1}``, then ``b_t = decay * b_{t-1} + (1 - decay) * r_t``.
    The baseline starts at 0, so a first reward of 0 gives advantage 0 (no plastic
    change) and a nonzero first reward moves the weights. With ``normalize`` the
    advantage is divided by a running standard deviation of rewards (floored at ``eps``).
    """

    def __init__(self, decay: float = 0.99, normalize: bool = False, eps: float = 1e-3):
        if not 0 <= decay < 1:
            raise UserError(f"Reward baseline decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.normalize = normalize
        self.eps = eps
        self.value = 0.0
        self.var = 0.0
        self.count = 0

    def __call__(self, reward: float) -> float:
        adv = reward - self.value
        if self.normalize:
            std = math.sqrt(self.var) if self.count > 1 else 1.0
            adv = adv / max(std, self.eps)
        d = self.decay
        delta = reward - self.value
        self.value = d * self.value + (1 - d) * reward
        self.var = d * (self.var + (1 - d) * delta * delta)
        self.count += 1
        return adv

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.var = float(state["var"])
        self.count = int(state["count"])


class PlasticityEngine:
    """Binds rules to a model (and optimizer) and calls their hooks in order."""

    def __init__(
        self,
        model: nn.Module,
        rules: Sequence[Rule],
        optimizer: torch.optim.Optimizer | None = None,
        baseline_decay: float = 0.99,
        normalize_advantage: bool = False,
        sync: bool = True,
        process_group: Any = None,
    ):
        self.model = model
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise UserError(
                f"Two plasticity rules share the name {sorted(dup)[0]!r}; give each a distinct name."
            )
        for r in self.rules:
            r.bind(model, optimizer)
        self.optimizer = optimizer
        self.baseline = RewardBaseline(baseline_decay, normalize_advantage)
        self.sync_enabled = bool(sync)
        self.process_group = process_group
        self.last_reward: float | None = None
        self.last_advantage: float | None = None

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)

    def penalty(self) -> torch.Tensor | None:
        total = None
        for r in self.rules:
            p = r.penalty()
            if p is not None:
                total = p if total is None else total + p
        return total

    def observe(self, loss: float | torch.Tensor) -> None:
        """Show every rule the step's training loss (before :meth:`after_backward`)."""
        for r in self.rules:
            r.observe(loss)

    def consolidating(self) -> list[Rule]:
        """The rules that implement :meth:`~neuroplastic.plasticity.base.Rule.consolidate`."""
        return [r for r in self.rules if r.implements("consolidate")]

    @property
    def replay(self) -> Any:
        """The replay buffer of the first rule that keeps one, or ``None``."""
        return next((r.replay for r in self.rules if r.replay is not None), None)

    def lr_multiplier(self) -> float:
        """Product of the rules' learning-rate multipliers for this step (AdaptiveLR's)."""
        mult = 1.0
        for r in self.rules:
            mult *= r.lr_multiplier()
        return mult

    def after_backward(self) -> None:
        for r in self.rules:
            r.after_backward()

    def advantage(self, reward: float | torch.Tensor | None) -> float | None:
        if reward is None:
            return None
        reward = float(reward)
        if not math.isfinite(reward):
            return None
        self.last_reward = reward
        self.last_advantage = self.baseline(reward)
        return self.last_advantage

    # ---------------------------------------------------------------- data parallel

    def world_size(self) -> int:
        """Processes the engine syncs with (1 without an initialised process group or with sync=False)."""
        if not self.sync_enabled:
            return 1
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def sync(self, reward: float | torch.Tensor | None = None) -> float | None:
        """Data parallel: combine what differs between ranks before the plastic updates.

        Sums every rule's :meth:`~neuroplastic.plasticity.base.Rule.local_statistics`
        (e.g. Hebbian activity) across ranks and returns the mean of the finite rewards
        the ranks were given (``None`` when none was), in one all-reduce per dtype. A
        no-op returning ``reward`` for one process. Gradients need nothing here: DDP has
        averaged them during backward. Called by :meth:`after_step`; every rank must call
        it at the same step.
        """
        if self.world_size() <= 1:
            return reward
        import torch.distributed as dist

        r = float(reward) if reward is not None else float("nan")
        ok = math.isfinite(r)
        device = _param_device(self.model)
        if dist.get_backend(self.process_group) != "nccl":
            device = torch.device("cpu")
        head = torch.tensor([r if ok else 0.0, 1.0 if ok else 0.0], dtype=torch.float64, device=device)
        tensors, spans = [head], []
        for rule in self.rules:
            stats = list(rule.local_statistics())
            spans.append(len(stats))
            tensors.extend(stats)
        reduced = _all_reduce_sum(tensors, self.process_group)
        i = 1
        for rule, n in zip(self.rules, spans):
            if n:
                rule.set_global_statistics(reduced[i : i + n])
            i += n
        total, count = reduced[0].tolist()
        return total / count if count > 0 else None

    def after_step(self, reward: float | torch.Tensor | None = None) -> float | None:
        """Apply the rules' plastic updates; returns the advantage used (or None).

        Under data parallelism the rules' activation statistics and the reward are first
        combined across ranks (:meth:`sync`).
        """
        reward = self.sync(reward)
        adv = self.advantage(reward)
        for r in self.rules:
            r.after_step(adv)
            r.step_count += 1
        return adv

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rules:
            for k, v in r.stats().items():
                out[f"{r.name}/{k}"] = float(v)
        if self.last_reward is not None:
            out["reward"] = self.last_reward
            out["advantage"] = float(self.last_advantage)
            out["reward_baseline"] = self.baseline.value
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.state_dict(),
            "rules": {r.name: r.state_dict() for r in self.rules},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state["baseline"])
        saved = state.get("rules", {})
        missing = [r.name for r in self.rules if r.name not in saved]
        if missing:
            raise UserError(
                f"The checkpoint has no state for plasticity rule {missing[0]!r}; resume with the "
                "rules the run was started with."
            )
        for r in self.rules:
            r.load_state_dict(saved[r.name])

    def close(self) -> None:
        for r in self.rules:
            r.close()


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _all_reduce_sum(tensors: list[torch.Tensor], group: Any = None) -> list[torch.Tensor]:
    """Sum each tensor across ranks: one flat all-reduce per (dtype, device); returns new tensors."""
    import torch.distributed as dist

    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, group=group)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view(tensors[i].shape)
            offset += n
    return out
