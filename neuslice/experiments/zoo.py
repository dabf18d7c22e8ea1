"""ImageNet architectures laid out exactly like torchvision's, without needing torchvision.

``build(name)`` returns ResNet-18/50, VGG-16/19 (no batch norm) or MobileNetV3-Small. The
builders here register the same modules under the same names as torchvision's (``conv1``,
``layer1.0.downsample.0``, ``features.1.block.1.fc1``, ``classifier.6``, ...), so a
torchvision state-dict file loads into them unchanged::

    model = neuslice.experiments.zoo.build("resnet18", weights="resnet18_imagenet.pth")

With ``source="auto"`` torchvision's own builder is used when torchvision imports, these
otherwise; ``source="neuslice"`` / ``"torchvision"`` force one. No weights are downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["NAMES", "build", "load_weights", "ResNet", "BasicBlock", "Bottleneck", "VGG",
           "VGG_CFGS", "MobileNetV3", "InvertedResidual", "SqueezeExcitation", "resnet18",
           "resnet50", "vgg16", "vgg19", "mobilenet_v3_small"]

NAMES = ("resnet18", "resnet50", "vgg16", "vgg19", "mobilenet_v3_small")
SOURCES = ("auto", "neuslice", "torchvision")


# ------------------------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus the (optionally downsampled) input, then ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in ResNet v1.5), 1x1 expand by 4, plus the input, ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages (64..512 planes), pool, ``fc``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int],
                 num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths)):
            setattr(self, f"layer{i + 1}", self._stage(block, planes, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        out = planes * block.expansion
        down = None
        if stride != 1 or self.inplanes != out:
            down = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride, bias=False),
                                 nn.BatchNorm2d(out))
        blocks = [block(self.inplanes, planes, stride, down)]
        self.inplanes = out
        blocks += [block(out, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (11,689,512 parameters at 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters at 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


# --------------------------------------------------------------------------------------- VGG
# Output channels of each 3x3 conv; "M" is a 2x2/2 max-pool.
VGG_CFGS: dict[str, list] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG without batch norm: ``features`` (conv3x3-ReLU / max-pool), ``avgpool``, flatten,
    ``classifier`` Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear.

    ``cfg``, ``hidden`` and ``pool_size`` default to torchvision's (``VGG_CFGS``, 4096, 7); a
    smaller VGG-style net is ``VGG([16, "M", 32, "M"], num_classes=10, hidden=64, pool_size=2)``.
    """

    def __init__(self, cfg: Sequence[int | str] = VGG_CFGS["vgg16"], num_classes: int = 1000,
                 hidden: int = 4096, pool_size: int = 7, dropout: float = 0.5,
                 in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                ch = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(ch * pool_size * pool_size, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG-16, configuration D, no batch norm (138,357,544 parameters at 1000 classes)."""
    return VGG(VGG_CFGS["vgg16"], num_classes)


def vgg19(num_classes: int = 1000) -> VGG:
    """VGG-19, configuration E, no batch norm (143,667,240 parameters at 1000 classes)."""
    return VGG(VGG_CFGS["vgg19"], num_classes)


# ------------------------------------------------------------------------------ MobileNetV3
def _div8(v: float) -> int:
    """``v`` rounded to a multiple of 8: at least 8 and not under 90 % of ``v``."""
    r = max(8, int(v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)


def _conv_bn_act(in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1,
                 act: Callable[..., nn.Module] | None = None) -> nn.Sequential:
    """``0``: conv without bias, ``1``: BatchNorm, ``2``: activation (if any)."""
    mods = [nn.Conv2d(in_ch, out_ch, k, stride, (k - 1) // 2, groups=groups, bias=False),
            _bn(out_ch)]
    if act is not None:
        mods.append(act(inplace=True))
    return nn.Sequential(*mods)


class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(mean_hw(x)))))`` with 1x1 convs ``fc1``/``fc2``."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidual(nn.Module):
    """``block``: [1x1 expand] - depthwise kxk - [SE] - 1x1 project (no activation); the input
    is added when the shape is kept."""

    def __init__(self, in_ch: int, k: int, expanded: int, out_ch: int, se: bool, hswish: bool,
                 stride: int):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != in_ch:
            layers.append(_conv_bn_act(in_ch, expanded, 1, act=act))
        layers.append(_conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, _div8(expanded // 4)))
        layers.append(_conv_bn_act(expanded, out_ch, 1))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_ch
        self.use_res_connect = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res_connect else y


# (in, kernel, expanded, out, squeeze-excitation, hardswish, stride) per inverted residual
_MOBILENET_V3_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3(nn.Module):
    """MobileNetV3: ``features`` (3x3/2 stem, inverted residuals, 1x1 conv to 6x width),
    ``avgpool``, ``classifier`` Linear-Hardswish-Dropout-Linear."""

    def __init__(self, setting: Sequence[tuple] = _MOBILENET_V3_SMALL, last_channel: int = 1024,
                 num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        first, last_in = setting[0][0], setting[-1][3]
        layers = [_conv_bn_act(3, first, 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidual(*cfg) for cfg in setting]
        layers.append(_conv_bn_act(last_in, 6 * last_in, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel), nn.Hardswish(inplace=True),
            nn.Dropout(dropout, inplace=True), nn.Linear(last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Small (2,542,856 parameters at 1000 classes)."""
    return MobileNetV3(_MOBILENET_V3_SMALL, 1024, num_classes)


# ------------------------------------------------------------------------------------- build
_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16, "vgg19": vgg19,
    "mobilenet_v3_small": mobilenet_v3_small,
}


def _torchvision():
    """torchvision, or None when it is missing or cannot be imported (e.g. built for another
    torch)."""
    try:
        import torchvision
    except Exception:  # ImportError, or RuntimeError/OSError from a mismatched build
        return None
    return torchvision


def _torchvision_model(tv, name: str, num_classes: int) -> nn.Module:
    fn = getattr(tv.models, name)
    try:
        return fn(weights=None, num_classes=num_classes)
    except TypeError:  # torchvision < 0.13 has no ``weights`` argument
        return fn(pretrained=False, num_classes=num_classes)


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(model: nn.Module, weights: str | os.PathLike | Mapping) -> nn.Module:
    """Load a state dict (a file path or a mapping) into ``model``; ``ValueError`` naming the
    missing, unexpected and wrongly shaped entries when it does not fit."""
    if isinstance(weights, (str, os.PathLike)):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read a state dict from {os.fspath(weights)!r} "
                             f"({type(exc).__name__}: {exc})") from exc
    else:
        state = weights
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise ValueError(f"weights must hold a state dict (a mapping of names to tensors), "
                         f"got {type(state).__name__}")
    if not any(torch.is_tensor(v) for v in state.values()):  # a checkpoint around it
        inner = [state[k] for k in ("state_dict", "model") if isinstance(state.get(k), Mapping)]
        state = inner[0] if inner else state
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch (file vs model): {_names(shapes, 4)}")
        raise ValueError(f"the weights do not fit {type(model).__name__}: " + "; ".join(parts)
                         + " (is num_classes right?)" * bool(shapes))
    model.load_state_dict(state)
    return model


def build(name: str, num_classes: int = 1000, weights: str | os.PathLike | Mapping | None = None,
          source: str = "auto") -> nn.Module:
    """Build ``name`` (one of ``NAMES``) with ``num_classes`` outputs and random weights, or the
    state dict in ``weights`` (a file path).

    ``source``: ``"auto"`` (torchvision's builder if torchvision imports, else this module's),
    ``"neuslice"`` or ``"torchvision"`` (``ImportError`` without it). Both give the same
    parameter names and shapes.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {list(NAMES)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose from {list(SOURCES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    tv = None if source == "neuslice" else _torchvision()
    if tv is None and source == "torchvision":
        raise ImportError("source='torchvision' needs an importable torchvision; use "
                          "source='neuslice' for this package's identical layout.")
    model = _torchvision_model(tv, name, num_classes) if tv is not None \
        else _BUILDERS[name](num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model
