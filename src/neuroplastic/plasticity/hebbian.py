"""Oja-stabilised Hebbian learning on ``nn.Linear`` layers, optionally reward-gated.

For each selected linear layer with weight ``W`` of shape ``(out, in)``, a forward
hook records the layer's input ``x`` (pre-synaptic) and output ``y`` (post-synaptic;
the layer's *pre-activation* output ``W x + b``, i.e. before any nonlinearity that
follows the layer) over all leading dimensions (batch * time, ``N`` rows). After the
optimizer step the weight moves by Oja's subspace rule in weight space::

    dW = lr * (y^T x - (y^T y) W) / N          # rows of y, x are the N samples
       = lr * y^T (x - y W) / N

For one output unit this is Oja's rule, which drives ``w`` to the unit-norm principal
component of the inputs; for several it converges to an orthonormal basis of the
principal subspace. The ``-(y^T y) W`` term keeps the weights bounded (no explosion
as with plain Hebb).

Details:

* Recording happens only while the module is in training mode, under ``no_grad`` on
  detached tensors (no effect on autograd), in float32 for float16/bfloat16 weights and
  outside autocast. *Every* training-mode forward pass is recorded, also ones that are
  not training steps (e.g. ``EWC.consolidate`` on a model left in training mode, or
  sampling without ``model.eval()``); run those in eval mode or call :meth:`clear`.
* Several forward passes between two ``after_step`` calls (gradient accumulation) are
  summed, and ``N`` counts all their rows. The ``W`` in the Oja term is the weight at
  the time of the forward pass (the one that produced ``y``); the update is added to
  the weight after the optimizer step.
* With ``subtract_bias=True`` the layer's bias is removed from ``y`` first, so
  ``y = W x`` exactly as in Oja's derivation.
* ``reward_gated=True``: the update is multiplied by the advantage; with no reward
  this step (advantage ``None``) nothing changes and the recorded activity is dropped.
  A negative advantage gives the anti-Hebbian direction.
* ``max_update_norm``: each layer's ``dW`` is scaled down to at most this Frobenius norm.
* Selection: ``params`` / ``exclude`` patterns select *modules*: an ``nn.Linear`` is
  used when its module name or the name of its weight (``"<module>.weight"``) matches.
  ``self.params`` are those weights and ``self.names`` their parameter names.
* :meth:`close` removes the hooks.
* Data parallel: the engine sums the recorded ``acc`` and the counts ``N`` over all
  ranks (:meth:`local_statistics`) before ``after_step``, so every rank applies the
  update of the global batch and the weights stay identical across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule, compile_patterns, pattern_match


class Hebbian(Rule):
    """Oja's subspace rule on selected ``nn.Linear`` weights (see module docs).

    Args:
        params, exclude: module-name patterns (globs or ``re:`` regexes).
        lr: Hebbian learning rate ``eta``.
        reward_gated: multiply the update by the reward advantage (``None`` -> no update).
        max_update_norm: clip each layer's update to this Frobenius norm (None: no clip).
        subtract_bias: use ``y = W x`` (without the layer's bias) as post-synaptic activity.
        trainable_only: only layers whose weight requires grad.
    """

    name = "hebbian"

    def __init__(
        self,
        params: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
        lr: float = 1e-3,
        reward_gated: bool = False,
        max_update_norm: float | None = None,
        subtract_bias: bool = False,
        trainable_only: bool = True,
    ):
        super().__init__(params=params, exclude=exclude, min_dim=2)
        if max_update_norm is not None and max_update_norm <= 0:
            raise UserError(f"Hebbian max_update_norm must be > 0, got {max_update_norm}.")
        self.lr = float(lr)
        self.reward_gated = bool(reward_gated)
        self.uses_reward = self.reward_gated
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.subtract_bias = bool(subtract_bias)
        self.trainable_only = bool(trainable_only)
        self.modules: list[nn.Linear] = []
        self._handles: list[Any] = []
        self.acc: list[torch.Tensor | None] = []
        self.count: list[int] = []
        self._act_abs_sum: list[torch.Tensor | None] = []
        self._act_numel: list[int] = []
        self._last_norm: torch.Tensor | float = 0.0
        self._last_act: torch.Tensor | float = 0.0

    # ------------------------------------------------------------------ binding

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Hebbian:
        self.close()
        self.model = model
        self.optimizer = optimizer
        inc = compile_patterns(self.patterns)
        exc = compile_patterns(self.exclude) if self.exclude else []
        names, modules, seen = [], [], set()
        for mname, mod in model.named_modules():
            if not isinstance(mod, nn.Linear) or id(mod) in seen:
                continue
            if self.trainable_only and not mod.weight.requires_grad:
                continue
            wname = f"{mname}.weight" if mname else "weight"
            if not any(pattern_match(r, mname) or pattern_match(r, wname) for r in inc):
                continue
            if any(pattern_match(r, mname) or pattern_match(r, wname) for r in exc):
                continue
            seen.add(id(mod))
            names.append(wname)
            modules.append(mod)
        if not modules:
            raise UserError(
                f"Plasticity rule {self.name!r} matched no nn.Linear modules with pattern "
                f"{self.patterns!r}; check the names with model.named_modules()."
            )
        self.names = names
        self.modules = modules
        self.params = [m.weight for m in modules]
        self.setup()
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(modules)]
        return self

    def setup(self) -> None:
        self.acc = [None] * len(self.params)
        self.count = [0] * len(self.params)
        self._act_abs_sum = [None] * len(self.params)
        self._act_numel = [0] * len(self.params)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks

    def _make_hook(self, i: int):
        def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            if not module.training or not args:
                return
            x = args[0]
            # full precision outside any autocast region the forward runs in
            with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                self._record(i, module, x, output)

        return hook

    def _record(self, i: int, module: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
        w = module.weight.detach()
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        x = x.detach().reshape(-1, x.shape[-1]).to(dtype)
        y = y.detach().reshape(-1, y.shape[-1]).to(dtype)
        if self.subtract_bias and module.bias is not None:
            y = y - module.bias.detach().to(dtype)
        # y^T x - (y^T y) W  ==  y^T (x - y W): no (out, out) matrix needed
        term = y.t() @ (x - y @ w.to(dtype))
        if self.acc[i] is None:
            self.acc[i] = term
            self._act_abs_sum[i] = y.abs().sum()
        else:
            self.acc[i].add_(term)
            self._act_abs_sum[i].add_(y.abs().sum())
        self.count[i] += x.shape[0]
        self._act_numel[i] += y.numel()

    def clear(self) -> None:
        """Drop the activity recorded since the last :meth:`after_step`."""
        self.setup()

    # ------------------------------------------------------------------ data parallel

    def local_statistics(self) -> list[torch.Tensor]:
        """``[acc..., act_abs_sum..., counts]``: the recorded sums (zeros where nothing was
        recorded) and, as one float64 vector, the row and element counts."""
        acc, sums = [], []
        for i, p in enumerate(self.params):
            dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
            acc.append(self.acc[i] if self.acc[i] is not None else torch.zeros(p.shape, dtype=dtype, device=p.device))
            s = self._act_abs_sum[i]
            sums.append(s if s is not None else torch.zeros((), dtype=dtype, device=p.device))
        counts = torch.tensor(
            [*self.count, *self._act_numel], dtype=torch.float64, device=self.params[0].device
        )
        return [*acc, *sums, counts]

    def set_global_statistics(self, tensors: list[torch.Tensor]) -> None:
        n = len(self.params)
        counts = [int(c) for c in tensors[2 * n].tolist()]
        self.count, self._act_numel = counts[:n], counts[n:]
        self.acc = [a if c > 0 else None for a, c in zip(tensors[:n], self.count)]
        self._act_abs_sum = [s if c > 0 else None for s, c in zip(tensors[n : 2 * n], self._act_numel)]

    def after_step(self, advantage: float | None) -> None:
        if self.reward_gated and advantage is None:
            self._last_norm = 0.0
            self.clear()
            return
        scale = self.lr * (float(advantage) if self.reward_gated else 1.0)
        updates, params = [], []
        for i, p in enumerate(self.params):
            if self.acc[i] is None or self.count[i] == 0:
                continue
            updates.append(self.acc[i].mul_(scale / self.count[i]))
            params.append(p)
        if updates:
            norms = torch._foreach_norm(updates)
            if self.max_update_norm is not None:
                factors = [torch.clamp(self.max_update_norm / (n + 1e-12), max=1.0) for n in norms]
                torch._foreach_mul_(updates, factors)
                norms = torch._foreach_norm(updates)
            with torch.no_grad():
                for p, u in zip(params, updates):
                    p.add_(u.to(p.dtype))
            self.acted += 1
            # kept as tensors: converting here would sync the device every step
            self._last_norm = torch.stack([n.float() for n in norms]).pow(2).sum().sqrt()
        else:
            self._last_norm = 0.0
        act = [(s, n) for s, n in zip(self._act_abs_sum, self._act_numel) if s is not None]
        if act:
            self._last_act = torch.stack([s.float() for s, _ in act]).sum() / sum(n for _, n in act)
        self.clear()

    @property
    def last_update_norm(self) -> float:
        return float(self._last_norm)

    @property
    def last_mean_abs_activation(self) -> float:
        return float(self._last_act)

    def stats(self) -> dict[str, float]:
        return {
            "update_norm": self.last_update_norm,
            "mean_abs_activation": self.last_mean_abs_activation,
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            acc=list(self.acc),
            count=list(self.count),
            act_abs_sum=list(self._act_abs_sum),
            act_numel=list(self._act_numel),
            last_update_norm=self.last_update_norm,
            last_mean_abs_activation=self.last_mean_abs_activation,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.setup()
        n = len(self.params)
        acc = list(state.get("acc") or [None] * n)
        sums = list(state.get("act_abs_sum") or [None] * n)
        if len(acc) != n or len(sums) != n:
            raise UserError(
                f"Saved state of rule {self.name!r} covers {len(acc)} layers but the rule selects "
                f"{n}; resume with the same model and rule settings."
            )
        for i, (a, s, p, name) in enumerate(zip(acc, sums, self.params, self.names)):
            if a is not None:
                if tuple(a.shape) != tuple(p.shape):
                    raise UserError(
                        f"Saved Hebbian state for {name} has shape {tuple(a.shape)}, the weight has "
                        f"{tuple(p.shape)}; resume with the same model."
                    )
                self.acc[i] = a.to(device=p.device).clone()
            if s is not None:
                self._act_abs_sum[i] = s.to(device=p.device).clone()
        self.count = [int(c) for c in state.get("count") or [0] * n]
        self._act_numel = [int(c) for c in state.get("act_numel") or [0] * n]
        self._last_norm = float(state.get("last_update_norm", 0.0))
        self._last_act = float(state.get("last_mean_abs_activation", 0.0))
