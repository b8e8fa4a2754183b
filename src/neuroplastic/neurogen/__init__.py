"""NeuroGen: a modular brain language model with the seed's Python API.

``from neuroplastic.neurogen import NeuroGenModel`` (see :mod:`neuroplastic.neurogen.model`);
the brain itself is :mod:`neuroplastic.models.brain`, its learning rules
:mod:`neuroplastic.models.brain_rules`, the streaming trainer behind
``neuroplastic neurogen train`` :mod:`neuroplastic.neurogen.train`.

Names are imported on first use, so that the command line can build its parser
(:mod:`neuroplastic.neurogen.cli`) without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BrainConfig", "NeuroGenModel", "make_config", "metadata_path"]

_WHERE = {
    "BrainConfig": "neuroplastic.models.brain",
    "NeuroGenModel": "neuroplastic.neurogen.model",
    "make_config": "neuroplastic.neurogen.model",
    "metadata_path": "neuroplastic.neurogen.model",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
