"""The profiling pass: per-layer, per-category contribution scores and neuron-HSIC statistics
from one streaming pass over a loader (``neuslice.profile`` -> ``Profile``).

Modules: ``config`` (ProfileConfig), ``profile`` (the pass: plan / consume / finish),
``result`` (Profile), ``passes`` (per-batch forward and DeepLIFT passes), ``layer_state`` and
``pass_state`` (what accumulates), ``stats`` (moments, covariance, minibatch HSIC), ``scores``
(metrics from the statistics), ``deeplift`` (the rescale rule), ``planning`` (shapes, memory).
"""

from .config import ProfileConfig
from .result import Profile
from .scores import ALL_METRICS, METRICS

__all__ = ["Profile", "ProfileConfig", "METRICS", "ALL_METRICS"]
