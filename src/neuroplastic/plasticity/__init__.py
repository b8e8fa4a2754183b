from neuroplastic.plasticity.base import Rule, select_parameters
from neuroplastic.plasticity.engine import PlasticityEngine, RewardBaseline

__all__ = ["PlasticityEngine", "RewardBaseline", "Rule", "select_parameters"]
