"""Rules by name, so recipes can list them in YAML: ``{type: traces, plasticity_lr: 1e-4}``."""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from neuroplastic.errors import UserError
from neuroplastic.plasticity.base import Rule

RULES: dict[str, str] = {
    "traces": "neuroplastic.plasticity.traces:Traces",
    "eligibility": "neuroplastic.plasticity.eligibility:EligibilityTrace",
    "hebbian": "neuroplastic.plasticity.hebbian:Hebbian",
    "ewc": "neuroplastic.plasticity.ewc:EWC",
    "adaptive_lr": "neuroplastic.plasticity.adaptive_lr:AdaptiveLR",
    "homeostasis": "neuroplastic.plasticity.homeostasis:Homeostasis",
    "consolidation": "neuroplastic.plasticity.consolidation:Consolidation",
}


def rule_class(kind: str) -> type[Rule]:
    if kind not in RULES:
        close = difflib.get_close_matches(kind, list(RULES), n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(RULES)}."
        raise UserError(f"Unknown plasticity rule {kind!r}; {hint}")
    module, cls = RULES[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_rule(spec: dict[str, Any]) -> Rule:
    """A rule from ``{"type": name, **constructor_kwargs}`` (``name`` optional: the rule's name)."""
    spec = dict(spec)
    kind = str(spec.pop("type"))
    cls = rule_class(kind)
    custom_name = spec.pop("name", None)
    sig = inspect.signature(cls.__init__)
    valid = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    for key in spec:
        if key not in valid and not accepts_any:
            close = difflib.get_close_matches(key, valid, n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid: {', '.join(valid)}."
            raise UserError(f"Plasticity rule {kind!r} has no option {key!r}; {hint}")
    try:
        rule = cls(**spec)
    except (TypeError, ValueError) as exc:
        raise UserError(f"Plasticity rule {kind!r}: {exc}") from exc
    if custom_name:
        rule.name = str(custom_name)
    return rule
