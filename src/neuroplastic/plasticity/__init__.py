"""Plasticity rules that act on any ``nn.Module`` beside its optimizer.

See :mod:`neuroplastic.plasticity.base` for the interface and
:mod:`neuroplastic.plasticity.registry` for the names recipes use.
"""

from neuroplastic.plasticity.adaptive_lr import AdaptiveLR
from neuroplastic.plasticity.base import Rule, select_parameters
from neuroplastic.plasticity.consolidation import Consolidation, ReplayBuffer
from neuroplastic.plasticity.eligibility import EligibilityTrace
from neuroplastic.plasticity.engine import PlasticityEngine, RewardBaseline
from neuroplastic.plasticity.ewc import EWC
from neuroplastic.plasticity.hebbian import Hebbian
from neuroplastic.plasticity.homeostasis import Homeostasis
from neuroplastic.plasticity.traces import Traces

__all__ = [
    "EWC",
    "AdaptiveLR",
    "Consolidation",
    "EligibilityTrace",
    "Hebbian",
    "Homeostasis",
    "PlasticityEngine",
    "ReplayBuffer",
    "RewardBaseline",
    "Rule",
    "Traces",
    "select_parameters",
]
