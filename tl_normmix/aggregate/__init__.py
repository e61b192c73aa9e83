"""Across layers: rollouts of per-layer maps, and the whole-model decomposition that carries
per-token vectors through every block."""

from tl_normmix.aggregate.decomposition import ModelDecomposition, decompose_model
from tl_normmix.aggregate.rollouts import rollout

__all__ = ["ModelDecomposition", "decompose_model", "rollout"]
