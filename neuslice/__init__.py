"""neuslice: neuron-level semantic slicing of deep neural networks (NeuSemSlice).

Profile a model once, slice it with any strategy and metric, and evaluate or maintain it::

    prof = neuslice.profile(model, loader, num_classes=10)
    sl = neuslice.semantic_slice(prof, "taylor", threshold=0.95)
    with neuslice.masked(model, sl):
        ...
"""

from . import cka
from . import zoo
from .batchnorm import recalibrate_batchnorm
from .layers import find_layers, model_fingerprint
from .masking import masked
from .optim import MaskedOptimizer, trainable_fraction
from .profile import ALL_METRICS, METRICS, Profile, estimate_profile_memory, profile
from .restructure import restructure
from .slicing import Slice, categorywise_slice, global_slice, random_slice, semantic_slice

__version__ = "0.1.0"

__all__ = [
    "cka", "profile", "Profile", "estimate_profile_memory", "METRICS", "ALL_METRICS", "Slice", "global_slice",
    "categorywise_slice", "semantic_slice", "random_slice", "masked", "restructure", "MaskedOptimizer",
    "trainable_fraction", "find_layers", "recalibrate_batchnorm",
    "model_fingerprint", "__version__",
]
