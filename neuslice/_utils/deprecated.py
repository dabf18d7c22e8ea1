"""Old module paths (``neuslice.evaluate``, ``neuslice.optim``, ...) kept as warning aliases.

Each old path is a small proxy module in ``sys.modules``: importing it costs nothing, and the
first attribute read imports the new module and emits a ``DeprecationWarning`` naming it.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

# old module under neuslice. -> new module under neuslice.
MOVED = {
    "_hooks": "_utils.hooks",
    "_io": "_utils.io",
    "_progress": "_utils.progress",
    "profile": "profiling.profile",
    "_passes": "profiling.passes",
    "_layer_state": "profiling.layer_state",
    "_scores": "profiling.scores",
    "stats": "profiling.stats",
    "deeplift": "profiling.deeplift",
    "memory": "runtime.memory",
    "distributed": "runtime.distributed",
    "checkpoint": "runtime.checkpoint",
    "restructure": "maintenance.restructure",
    "optim": "maintenance.masked_optimizer",
    "batchnorm": "maintenance.batchnorm",
    "pruning": "maintenance.pruning",
    "readapt": "maintenance.readapt",
    "incremental": "maintenance.incremental",
    "deeparc": "decomposition.deeparc",
    "data": "experiments.data",
    "models": "experiments.models",
    "zoo": "experiments.zoo",
    "train": "experiments.train",
    "evaluate": "experiments.sweep",
    "reproduce": "experiments.reproduce",
    "reproduce_rq3": "experiments.reproduce_rq3",
    "reproduce_rq4": "experiments.reproduce_rq4",
    "report_plots": "experiments.plots",
    "cli": "experiments.cli",
}


class _Alias(types.ModuleType):
    def __init__(self, old: str, new: str):
        super().__init__(old, f"Deprecated alias of {new}.")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        new = self.__dict__["_new"]
        warnings.warn(
            f"{self.__name__} has moved to {new}; import it from there "
            f"({self.__name__} will be removed in a future release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    def __dir__(self):
        return dir(importlib.import_module(self.__dict__["_new"]))


def install(package: str) -> None:
    """Register every old path of ``package`` as an alias (existing entries are kept)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(f"{package}.{old}", _Alias(f"{package}.{old}", f"{package}.{new}"))
