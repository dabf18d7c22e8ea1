"""Decomposition of a model into modules: DeepArc (layer-level) and Incite (one module per
output, by mutation analysis)."""

from .incite import add_mutation_scores, mutation_scores, reference_mutation_scores
from .modules import Modules, decompose

__all__ = [
    "mutation_scores",
    "reference_mutation_scores",
    "add_mutation_scores",
    "Modules",
    "decompose",
]
