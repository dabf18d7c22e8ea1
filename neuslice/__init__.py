"""neuslice: neuron-level semantic slicing of deep neural networks (NeuSemSlice).

Profile a model once, slice it with any strategy and metric, and evaluate or maintain it::

    prof = neuslice.profile(model, loader, num_classes=10)
    sl = neuslice.semantic_slice(prof, "taylor", threshold=0.3, model=model, loader=loader)
    with neuslice.masked(model, sl):
        ...

Layers (``docs/ARCHITECTURE.md``): the core (``cka``, ``layers``, ``slicing``, ``masking``),
``profiling``, ``runtime``, ``maintenance``, ``decomposition``, ``ops``; ``experiments`` is the
paper-reproduction harness built on them and is never imported by the library.
"""

import sys as _sys

from . import cka
from ._utils import deprecated as _deprecated
from .layers import find_layers, model_fingerprint
from .maintenance.batchnorm import recalibrate_batchnorm
from .maintenance.masked_optimizer import MaskedOptimizer, trainable_fraction
from .maintenance.restructure import restructure
from .masking import masked
from .profiling.config import ProfileConfig
from .profiling.profile import ALL_METRICS, METRICS, Profile, estimate_profile_memory, profile
from .slicing import Slice, categorywise_slice, global_slice, random_slice, semantic_slice
from .consumer import ConsumerCurves, consumer_r2_curves, consumer_r2_slice
from .decomposition.incite import add_mutation_scores, mutation_scores
from .decomposition.modules import Modules, decompose

__version__ = "0.2.0"

__all__ = [
    "cka",
    "profile",
    "Profile",
    "estimate_profile_memory",
    "ProfileConfig",
    "METRICS",
    "ALL_METRICS",
    "Slice",
    "global_slice",
    "categorywise_slice",
    "semantic_slice",
    "random_slice",
    "consumer_r2_curves",
    "consumer_r2_slice",
    "ConsumerCurves",
    "masked",
    "restructure",
    "MaskedOptimizer",
    "trainable_fraction",
    "find_layers",
    "recalibrate_batchnorm",
    "model_fingerprint",
    "mutation_scores",
    "add_mutation_scores",
    "Modules",
    "decompose",
    "__version__",
]

_deprecated.install(__name__)


def __getattr__(name: str):
    # ``neuslice.zoo``, ``neuslice.evaluate``, ...: the old module paths, as warning aliases.
    if name in _deprecated.MOVED:
        return _sys.modules[f"{__name__}.{name}"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
