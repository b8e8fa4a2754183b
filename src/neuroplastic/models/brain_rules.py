"""The brain's own learning rules: three-factor plasticity, synaptic tagging and capture,
homeostatic synaptic scaling, and consolidation by hippocampal replay.

They act on the synapse buffers of :class:`neuroplastic.models.brain.Brain` (``w_late``,
``w_early``, ``tags``, ``rate_ema``), which are not trained by gradient, so the
gradient-side rules of :mod:`neuroplastic.plasticity` (which select ``nn.Parameter``s by
name and read their gradients) do not apply to them. What does carry over is reused, handed
in by the caller (``models/`` sits below ``plasticity/``, so it does not import it):
:class:`~neuroplastic.plasticity.engine.RewardBaseline` turns reward into the dopamine
signal (reward-prediction error against a running baseline) and
:class:`~neuroplastic.plasticity.consolidation.ReplayBuffer` keeps the episodes that replay
consolidates (see :class:`neuroplastic.neurogen.NeuroGenModel`).

Per training step (one call of ``NeuroGenModel.train_step``) on streams ``b`` and tokens ``t``:

* **dopamine** ``delta[b,t] = r[b,t] - baseline`` with reward ``r = -CE`` (nats) of the
  next-token prediction at ``(b, t)``; the baseline is the running average of the steps'
  mean reward (decay ``dopamine_baseline_decay``, starting at the first step's mean),
  updated after the step;
* **three-factor rule**: the dopamine that follows a coincidence credits it, through an
  eligibility trace that decays by ``eligibility_decay`` per token:
  ``D[b,t] = sum_{t' >= t} eligibility_decay^(t'-t) * delta[b,t']`` and
  ``dw_s = three_factor_lr * mean_{b,t} D[b,t] * pre_s(t - delay) * post_s(t)``
  (pre/post: the rates of the synapse's source and target neuron, 0 when inactive); the
  mean runs over a strided subset of ``plasticity_streams`` streams (all when 0 or when
  there are fewer), an unbiased estimate at a fraction of the cost;
* **tagging and capture**: ``dw`` goes to an early-phase weight ``w_early`` that fades by
  ``early_decay`` per step; synapses with ``|w_early| > tag_threshold`` are tagged, and when
  the step's mean dopamine exceeds ``prp_threshold`` (plasticity-related proteins are made)
  or during replay, a fraction ``capture_rate`` of the tagged early weight is captured into
  the late-phase weight ``w_late``. The effective weight is ``clamp(w_late + w_early, 0, w_max)``.
  Without tagging ``dw`` goes straight into ``w_late``;
* **homeostatic scaling**: each neuron's firing rate (fraction of tokens it is active)
  is averaged with decay ``homeostasis_ema``; its incoming drive synapses are scaled by
  ``1 + homeostasis_rate * (target - rate) / target`` (clamped to ``1 +- homeostasis_rate``)
  with ``target = k / N`` of its module, so neurons that never win grow stronger inputs and
  ones that always win weaker (the thalamic relay is not scaled);
* **consolidation by replay**: every ``replay_interval`` steps, ``replay_batch`` stored
  episodes (token sequences, a uniform reservoir sample of everything trained on) are run
  through the brain again and learned from like new data, with capture forced.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Dopamine", "HippocampalReplay", "SynapticScaling", "SynapticTagging", "ThreeFactor"]


class Dopamine:
    """Reward-prediction error per token against the running baseline of the steps' reward.

    ``baseline``: a :class:`~neuroplastic.plasticity.engine.RewardBaseline` (``value``,
    ``var``, ``count``, ``eps``; calling it with a reward updates it).
    """

    def __init__(self, baseline):
        self.baseline = baseline
        self.last_mean = 0.0  # mean RPE of the last step (before normalisation)
        self.last_reward = 0.0

    def __call__(self, reward: torch.Tensor, update: bool = True) -> torch.Tensor:
        """``reward - baseline`` per token (nats); ``update`` moves the baseline afterwards."""
        b = self.baseline
        mean_r = float(reward.mean())
        # the first step has no history: its own mean is the baseline (not the EMA's 0)
        base = b.value if b.count > 0 else mean_r
        delta = reward - base
        self.last_mean = mean_r - base
        self.last_reward = mean_r
        if update:
            if b.count == 0:
                b.value, b.var, b.count = mean_r, 0.0, 1
            else:
                b(mean_r)
        return delta

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict(), "last_mean": self.last_mean,
                "last_reward": self.last_reward}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state["baseline"])
        self.last_mean = float(state.get("last_mean", 0.0))
        self.last_reward = float(state.get("last_reward", 0.0))


def lookahead(delta: torch.Tensor, decay: float) -> torch.Tensor:
    """``D[:, t] = sum_{t' >= t} decay^(t'-t) delta[:, t']`` (B, T)."""
    out = torch.empty_like(delta)
    run = torch.zeros_like(delta[:, 0])
    for t in range(delta.shape[1] - 1, -1, -1):
        run = delta[:, t] + decay * run
        out[:, t] = run
    return out


class ThreeFactor:
    """pre x post x dopamine (see the module docs)."""

    def __init__(self, lr: float):
        self.lr = lr
        self.last_update_norm = 0.0

    def scale(self, dw: torch.Tensor, n_tokens: int) -> torch.Tensor:
        dw = dw.mul_(self.lr / max(n_tokens, 1))
        self.last_update_norm = float(dw.norm())
        return dw

    def state_dict(self) -> dict[str, Any]:
        return {"last_update_norm": self.last_update_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update_norm = float(state.get("last_update_norm", 0.0))


class SynapticTagging:
    """Early-phase weights, tags and capture into the late phase (see the module docs)."""

    def __init__(self, tag_threshold: float, capture_rate: float, early_decay: float,
                 prp_threshold: float):
        self.tag_threshold = tag_threshold
        self.capture_rate = capture_rate
        self.early_decay = early_decay
        self.prp_threshold = prp_threshold
        self.captures = 0  # capture events
        self.captured_synapses = 0
        self.tagged_fraction = 0.0

    @torch.no_grad()
    def step(self, brain, dw: torch.Tensor | None, dopamine_mean: float, force: bool, w_max: float) -> None:
        if dw is not None:
            brain.w_early.add_(dw.to(brain.w_early.device))
        tags = (brain.w_early.abs() > self.tag_threshold).float()
        brain.tags.copy_(tags)
        n_tagged = float(tags.sum())
        self.tagged_fraction = n_tagged / max(tags.numel(), 1)
        if n_tagged > 0 and (force or dopamine_mean > self.prp_threshold):
            moved = tags.mul_(brain.w_early).mul_(self.capture_rate)
            brain.w_late.add_(moved).clamp_(0.0, w_max)
            brain.w_early.sub_(moved)
            self.captures += 1
            self.captured_synapses += int(n_tagged)
        brain.w_early.mul_(self.early_decay)

    def state_dict(self) -> dict[str, Any]:
        return {"captures": self.captures, "captured_synapses": self.captured_synapses,
                "tagged_fraction": self.tagged_fraction}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.captures = int(state.get("captures", 0))
        self.captured_synapses = int(state.get("captured_synapses", 0))
        self.tagged_fraction = float(state.get("tagged_fraction", 0.0))


class SynapticScaling:
    """Homeostatic scaling of each neuron's incoming drive toward its module's target rate."""

    def __init__(self, rate: float, ema: float):
        self.rate = rate
        self.ema = ema
        self.deviation = 0.0
        self.applied = 0

    @staticmethod
    def targets(brain) -> torch.Tensor:
        n_all, k = brain.n_all, brain.kmod.tolist()
        return torch.cat([torch.full((n,), k[i] / n) for i, n in enumerate(n_all)]).to(brain.device)

    @torch.no_grad()
    def observe(self, brain, counts: torch.Tensor, n_tokens: int) -> None:
        rate = counts.to(brain.rate_ema.device) / max(n_tokens, 1)
        brain.rate_ema.mul_(self.ema).add_(rate, alpha=1 - self.ema)

    @torch.no_grad()
    def apply(self, brain, scalable: torch.Tensor) -> None:
        target = self.targets(brain)
        r = brain.rate_ema
        factor = (1 + self.rate * (target - r) / target).clamp_(1 - self.rate, 1 + self.rate)
        f = factor[brain.syn_post.long()]
        f = torch.where(scalable, f, torch.ones_like(f))
        brain.w_late.mul_(f).clamp_(0.0, brain.cfg.w_max)
        brain.w_early.mul_(f)
        self.applied += 1

    def update_deviation(self, brain, modules: list[str]) -> None:
        target = self.targets(brain)
        dev = []
        for m in modules:
            sl = brain.neuron_slice(m)
            dev.append(((brain.rate_ema[sl] - target[sl]).abs() / target[sl]).mean())
        self.deviation = float(torch.stack(dev).mean()) if dev else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"deviation": self.deviation, "applied": self.applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.deviation = float(state.get("deviation", 0.0))
        self.applied = int(state.get("applied", 0))


class HippocampalReplay:
    """Episodes (input, target sequences) kept for replay: a reservoir sample of all seen.

    ``buffer``: a :class:`~neuroplastic.plasticity.consolidation.ReplayBuffer`.
    """

    def __init__(self, buffer, batch: int, interval: int):
        self.buffer = buffer
        self.batch = batch
        self.interval = interval
        self.events = 0  # consolidation (replay) events
        self.replayed_tokens = 0

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        for x, y in zip(inputs.cpu(), targets.cpu()):
            self.buffer.add({"x": x, "y": y})

    def due(self, step: int) -> bool:
        return len(self.buffer) > 0 and step % self.interval == 0

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.buffer.sample(self.batch)
        n = min(int(e["x"].numel()) for e in eps)
        x = torch.stack([e["x"][:n] for e in eps])
        y = torch.stack([e["y"][:n] for e in eps])
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "events": self.events,
                "replayed_tokens": self.replayed_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.events = int(state.get("events", 0))
        self.replayed_tokens = int(state.get("replayed_tokens", 0))
