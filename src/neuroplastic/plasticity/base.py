"""The plasticity interface: rules that act on any ``nn.Module`` beside its optimizer.

A :class:`Rule` selects parameters by name pattern and implements some of the hook
points the :class:`~neuroplastic.plasticity.engine.PlasticityEngine` calls each step::

    loss = model(batch).loss + engine.penalty()   # penalty(): EWC and friends
    loss.backward()
    engine.observe(loss)                           # observe(): the step's loss (AdaptiveLR)
    engine.after_backward()                        # after_backward(): read gradients
    optimizer.step()
    engine.after_step(reward=r)                    # after_step(advantage): plastic updates
    optimizer.zero_grad(set_to_none=True)

Rules never know a concrete model. They keep their buffers as lists of tensors aligned
with ``self.params`` so that the hot path is a handful of ``torch._foreach_*`` calls,
not a Python loop over single parameters.

Optional abilities are part of the interface with no-op defaults: :meth:`Rule.observe`,
:meth:`Rule.consolidate`, :meth:`Rule.lr_multiplier`, :attr:`Rule.replay` and
:attr:`Rule.last_update_norm`; :meth:`Rule.implements` says whether a rule overrides one.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from neuroplastic.errors import UserError


def compile_patterns(patterns: str | Sequence[str]) -> list:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                compiled.append(re.compile(p[3:]))
            except re.error as exc:
                raise UserError(f"Parameter pattern {p!r} is not a valid regular expression ({exc}).") from exc
        else:
            compiled.append(re.compile(fnmatch.translate(p)))
    return compiled


def select_parameters(
    model: nn.Module,
    patterns: str | Sequence[str] = "*",
    exclude: str | Sequence[str] = (),
    min_dim: int = 0,
    trainable_only: bool = True,
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs whose name matches any pattern.

    Patterns are shell globs on the full parameter name (``"*attn*"``,
    ``"transformer.h.*.mlp.*.weight"``) or regular expressions prefixed with ``re:``
    (searched, not anchored). Tied parameters appear once.
    """
    inc = compile_patterns(patterns)
    exc = compile_patterns(exclude) if exclude else []
    out = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        if trainable_only and not p.requires_grad:
            continue
        if p.dim() < min_dim:
            continue
        if not any(pattern_match(r, name) for r in inc):
            continue
        if any(pattern_match(r, name) for r in exc):
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def pattern_match(regex, name: str) -> bool:
    # fnmatch.translate anchors with \Z; plain regexes are searched
    return bool(regex.match(name) if regex.pattern.endswith(r"\Z") else regex.search(name))


class Rule:
    """Base class of a plasticity rule; subclasses override the hooks they need.

    Subclasses call ``super().__init__(params=..., exclude=..., min_dim=...)`` and do
    their own set-up in :meth:`setup` once ``self.names`` / ``self.params`` are bound.
    """

    name = "rule"
    #: whether after_step uses the reward advantage (for engine bookkeeping and docs)
    uses_reward = False
    #: a buffer of past batches for the trainer to interleave with new data
    #: (a :class:`~neuroplastic.plasticity.consolidation.ReplayBuffer`), or ``None``
    replay: Any = None

    def __init__(
        self,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
        min_dim: int = 0,
    ):
        self.patterns = params
        self.exclude = exclude
        self.min_dim = min_dim
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.step_count = 0
        #: steps on which the rule changed something (the parameters, the learning rate or
        #: the loss): an ablation reports a rule that never acted instead of judging it
        self.acted = 0

    # ---- binding

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Rule:
        self.model = model
        self.optimizer = optimizer
        selected = select_parameters(model, self.patterns, self.exclude, self.min_dim)
        if not selected:
            raise UserError(
                f"Plasticity rule {self.name!r} matched no parameters with pattern "
                f"{self.patterns!r}; check the names with model.named_parameters()."
            )
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.setup()
        return self

    def setup(self) -> None:
        """Allocate buffers (called by :meth:`bind`)."""

    def close(self) -> None:
        """Remove hooks (rules that register forward hooks override this)."""

    # ---- hooks

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_backward(self) -> None:
        """Read gradients (called after backward, before the optimizer step)."""

    def after_step(self, advantage: float | None) -> None:
        """Apply plastic updates after the optimizer step.

        ``advantage`` is the reward minus its running baseline, or ``None`` when no
        reward was given this step (reward-modulated updates are then skipped).
        """

    def stats(self) -> dict[str, float]:
        return {}

    # ---- optional abilities (no-ops here)

    def observe(self, loss: float | torch.Tensor) -> None:
        """See the step's training loss (called before :meth:`after_backward`)."""

    def consolidate(self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        """End of a task or curriculum stage: consolidate on ``batches`` of it.

        ``loss_fn(model, batch)`` returns the batch's loss. Callers skip building the
        batches for rules where :meth:`implements` ``("consolidate")`` is false.
        """

    def lr_multiplier(self) -> float:
        """Factor on the scheduled learning rate this step (read after :meth:`after_backward`)."""
        return 1.0

    @property
    def last_update_norm(self) -> float | None:
        """Norm of the latest plastic update, or ``None`` for a rule that does not report one."""
        return None

    @classmethod
    def implements(cls, ability: str) -> bool:
        """Whether this rule overrides ``ability`` (a method or property of :class:`Rule`)."""
        return getattr(cls, ability) is not getattr(Rule, ability)

    # ---- data parallelism

    def local_statistics(self) -> list[torch.Tensor]:
        """Sums over this process's data that :meth:`after_step` turns into an update.

        Under data parallelism the engine all-reduces (sums) them across ranks and hands
        the totals to :meth:`set_global_statistics` before ``after_step``, so the update is
        the one a single process with all ranks' data would make. Rules that read only
        parameters or (already all-reduced) gradients have none: the default.
        Every rank must return the same number, shapes and dtypes of tensors.
        """
        return []

    def set_global_statistics(self, tensors: list[torch.Tensor]) -> None:
        """Take the across-rank sums of :meth:`local_statistics` (same order)."""

    # ---- state

    def state_dict(self) -> dict[str, Any]:
        """Tensors (lists aligned with ``self.names``) and scalars; must round-trip exactly."""
        return {"step_count": self.step_count, "acted": self.acted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state.get("step_count", 0))
        self.acted = int(state.get("acted", 0))

    # ---- helpers for subclasses

    def grads(self) -> list[torch.Tensor]:
        """Gradients aligned with ``self.params`` (zeros where a parameter has none)."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def zeros_like_params(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [torch.zeros_like(p, dtype=dtype or p.dtype) for p in self.params]

    def _check_buffers(
        self, state_list: Iterable[torch.Tensor], key: str, like_params: bool = True
    ) -> list[torch.Tensor]:
        """Copy a saved list of tensors onto the parameters' devices, checking count and shapes.

        ``like_params``: each tensor must have its parameter's shape (traces, Fisher, ...).
        """
        state_list = list(state_list)
        if len(state_list) != len(self.params):
            raise UserError(
                f"Saved state {key!r} of rule {self.name!r} has {len(state_list)} tensors but the "
                f"rule selects {len(self.params)} parameters; resume with the same model and rule settings."
            )
        out = []
        for t, p, n in zip(state_list, self.params, self.names):
            if like_params and tuple(t.shape) != tuple(p.shape):
                raise UserError(
                    f"Saved state {key!r} of rule {self.name!r} for {n} has shape {tuple(t.shape)}, "
                    f"the parameter has {tuple(p.shape)}; resume with the same model."
                )
            out.append(t.to(device=p.device).clone())
        return out
