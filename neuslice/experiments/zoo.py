"""Model zoo: torchvision's own architectures, plus the CIFAR-sized variants torchvision lacks.

``build(name, num_classes)`` returns ``torchvision.models.get_model(name, weights=None,
num_classes=num_classes)`` for the tested ImageNet architectures (:data:`NAMES`: ResNet-18/50,
VGG-16/19 without batch norm, MobileNetV3-Small; any other torchvision classification model
name works too), or one of the 32x32 variants (:data:`CIFAR_NAMES`):

* ``cifar_resnet18``: torchvision's ResNet-18 with a 3x3 stride-1 first conv and no max-pool,
  so that layer4 still sees 4x4 maps on 32x32 inputs;
* ``cifar_vgg16``: torchvision's VGG-16 with batch norm (``features`` unchanged), global average
  pooling and a 512-512-``num_classes`` classifier (15.0 M parameters at 10 classes).

Weights come only from a local file (or a state-dict mapping); nothing is ever downloaded::

    model = neuslice.experiments.zoo.build("resnet18", weights="resnet18_imagenet.pth")

torchvision is needed (``pip install neuslice[zoo]``); it is imported when a model is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["NAMES", "CIFAR_NAMES", "build", "load_weights", "cifar_resnet18", "cifar_vgg16"]

#: The torchvision architectures neuslice is tested on (any torchvision classification model
#: name is accepted by :func:`build`).
NAMES = ("resnet18", "resnet50", "vgg16", "vgg19", "mobilenet_v3_small")
#: 32x32-input variants built from torchvision's modules.
CIFAR_NAMES = ("cifar_resnet18", "cifar_vgg16")


def _torchvision():
    """torchvision, or an ``ImportError`` that says how to install it."""
    try:
        import torchvision
    except Exception as exc:  # ImportError, or RuntimeError/OSError from a mismatched build
        raise ImportError(
            f"neuslice.experiments.zoo builds torchvision's models, and torchvision does not "
            f"import ({type(exc).__name__}: {exc}); install it with `pip install "
            f"neuslice[zoo]` (a torchvision build matching torch {torch.__version__})"
        ) from exc
    return torchvision


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _stem_conv(in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs: ``conv1`` is a 3x3 stride-1 conv and
    ``maxpool`` an identity (11,173,962 parameters at 10 classes). Module names and every
    other shape are torchvision's."""
    _positive_int(num_classes, "num_classes")
    _positive_int(in_channels, "in_channels")
    model = _torchvision().models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _stem_conv(in_channels, 64, bias=False)
    model.maxpool = nn.Identity()
    return model


def cifar_vgg16(in_channels: int = 3, num_classes: int = 10, hidden: int = 512) -> nn.Module:
    """torchvision's VGG-16 with batch norm for 32x32 inputs: torchvision's ``features`` (13
    conv-BN-ReLU, 5 max-pools), ``avgpool`` to 1x1 and ``classifier`` Linear(512, hidden)-ReLU-
    Linear(hidden, num_classes) (14,990,922 parameters at 10 classes, hidden 512)."""
    _positive_int(in_channels, "in_channels")
    _positive_int(num_classes, "num_classes")
    _positive_int(hidden, "hidden")
    model = _torchvision().models.vgg16_bn(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = _stem_conv(in_channels, 64, bias=True)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(
        nn.Linear(512, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
    )
    for m in model.classifier:
        if isinstance(m, nn.Linear):  # torchvision's VGG initialisation
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


_CIFAR_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_vgg16": cifar_vgg16,
}


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(model: nn.Module, weights: str | os.PathLike | Mapping) -> nn.Module:
    """Load a state dict (a local file path or a mapping) into ``model``; ``FileNotFoundError``
    for a path that is not a file (nothing is downloaded), ``ValueError`` naming the missing,
    unexpected and wrongly shaped entries when it does not fit."""
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"weights file {path!r} does not exist; neuslice never downloads weights: "
                f"pass the path of a state dict saved with torch.save(model.state_dict(), path)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"cannot read a state dict from {path!r} ({type(exc).__name__}: {exc})"
            ) from exc
    else:
        state = weights
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise ValueError(
            f"weights must hold a state dict (a mapping of names to tensors), "
            f"got {type(state).__name__}"
        )
    if not any(torch.is_tensor(v) for v in state.values()):  # a checkpoint around it
        inner = [state[k] for k in ("state_dict", "model") if isinstance(state.get(k), Mapping)]
        state = inner[0] if inner else state
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch (file vs model): {_names(shapes, 4)}")
        raise ValueError(
            f"the weights do not fit {type(model).__name__}: "
            + "; ".join(parts)
            + " (is num_classes right?)" * bool(shapes)
        )
    model.load_state_dict(state)
    return model


def build(
    name: str, num_classes: int = 1000, weights: str | os.PathLike | Mapping | None = None
) -> nn.Module:
    """``name`` with ``num_classes`` outputs: random weights, or the state dict in ``weights``
    (a local file path or a mapping; never downloaded).

    ``name``: one of :data:`NAMES` or any other torchvision classification model (built by
    ``torchvision.models.get_model(name, weights=None, num_classes=num_classes)``), or one of
    :data:`CIFAR_NAMES` (3 input channels). ``ValueError`` for an unknown name or a bad
    ``num_classes``; ``ImportError`` without torchvision.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    _positive_int(num_classes, "num_classes")
    tv = _torchvision()
    if name in _CIFAR_BUILDERS:
        model = _CIFAR_BUILDERS[name](num_classes=num_classes)
    else:
        known = tv.models.list_models(module=tv.models)
        if name not in known:
            raise ValueError(
                f"unknown model {name!r}; choose from {list(NAMES + CIFAR_NAMES)} "
                f"or another torchvision classification model "
                f"(torchvision.models.list_models(module=torchvision.models))"
            )
        model = tv.models.get_model(name, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model
