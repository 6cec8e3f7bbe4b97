"""Model zoo: a registry of named factories plus torchvision and user-supplied models.

``build_model(name, num_classes=..., in_channels=..., image_size=...)`` accepts

* a registered name (:func:`list_models`): ``lenet300``, ``lenet5``, ``resnet20``;
* ``torchvision:<name>``: any torchvision classification model, untrained;
* ``package.module:factory``: a function in an importable module of your own.

Layer (module) names are stable and documented per model, because per-layer
compression plans are keyed by them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn import functional as F

from clipq_search.errors import ClipQError, ConfigError

__all__ = [
    "LeNet5",
    "LeNet300",
    "ResNet20",
    "build_model",
    "count_parameters",
    "list_models",
    "register_model",
]

ModelFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator: register ``factory(*, num_classes, in_channels, image_size) -> nn.Module`` as ``name``."""
    if not name or ":" in name:
        raise ValueError(f"model name {name!r} is invalid; use a non-empty name without ':'")

    def decorate(factory: _F) -> _F:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Registered model names, sorted (the prefix forms are not listed)."""
    return sorted(_REGISTRY)


def _check_dims(num_classes: int, in_channels: int, image_size: int) -> None:
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field}={value!r} is invalid; use an integer >= 1")


# --------------------------------------------------------------------------- LeNets


class LeNet300(nn.Module):
    """LeNet-300-100: ``fc1`` (in->300) ReLU ``fc2`` (300->100) ReLU ``fc3`` (100->classes).

    Input ``(B, C, H, W)`` is flattened; output logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5: ``conv1`` 20@5x5, pool 2, ``conv2`` 50@5x5, pool 2, ``fc1`` 500 ReLU, ``fc2``.

    Like Caffe's ``lenet_train_test.prototxt`` there is no ReLU after the
    convolutions (``conv_relu=False``, the default; ``True`` adds them).
    431,080 parameters for 28x28x1 input and 10 classes. Input
    ``(B, C, H, W)``, logits ``(B, num_classes)``.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, *, conv_relu: bool = False
    ) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(f"lenet5 needs image_size >= 16, got image_size={image_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.conv_relu = conv_relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.conv1(x))
        if self.conv_relu:
            x = F.relu(x)
        x = self.pool2(self.conv2(x))
        if self.conv_relu:
            x = F.relu(x)
        x = F.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


@register_model("lenet300")
def lenet300(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet300(num_classes, in_channels, image_size)


@register_model("lenet5")
def lenet5(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    return LeNet5(num_classes, in_channels, image_size)


# --------------------------------------------------------------------------- ResNet-20


class _ShortcutA(nn.Module):
    """Option-A shortcut (He et al. 2016, CIFAR): stride-2 subsample, zero-pad the new channels. No weights."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            _ShortcutA(planes - in_planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: ``conv1``/``bn1``, ``layer1..3`` of 3 basic blocks (16/32/64 channels), ``fc``.

    Option-A (parameter-free) shortcuts, so every weight is in a conv, BN or
    ``fc``: about 0.27M parameters. Any square input size works (global
    average pooling). Input ``(B, C, H, W)``, logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu"
                )

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


@register_model("resnet20")
def resnet20(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    if image_size < 8:
        raise ConfigError(f"resnet20 needs image_size >= 8, got image_size={image_size}")
    return ResNet20(num_classes, in_channels)


# --------------------------------------------------------------------------- prefix forms


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ClipQError(
            f"model 'torchvision:{name}' needs torchvision, which is not installed; "
            "pip install torchvision (or pip install 'clipq-search[vision]')"
        ) from exc
    known = set(torchvision.models.list_models(module=torchvision.models))
    if name not in known:
        raise ConfigError(
            f"unknown torchvision classification model {name!r}; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    if in_channels != 3:
        raise ConfigError(
            f"torchvision:{name} takes 3-channel images but in_channels={in_channels}; "
            "use an RGB dataset or a model of your own"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if not isinstance(model, nn.Module):  # pragma: no cover - torchvision always returns a module
        raise ClipQError(f"torchvision:{name} did not build an nn.Module")
    return model


def _build_user(ref: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"model reference {ref!r} is malformed; use 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ClipQError(
            f"cannot import module {module_name!r} for model {ref!r}: {type(exc).__name__}: {exc}; "
            "check the name and that its folder is on PYTHONPATH"
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ClipQError(f"model {ref!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ClipQError(f"model {ref!r}: {attr!r} is not callable; point at a function or class")
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        kwargs: dict[str, int] = {}
    else:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = offered
        else:
            kwargs = {
                k: v
                for k, v in offered.items()
                if k in params and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY
            }
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ClipQError(f"model {ref!r}: calling the factory failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ClipQError(f"model {ref!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Build an untrained model by name: registered, ``torchvision:<name>`` or ``package.module:factory``.

    The ``package.module:factory`` form imports and runs that module's code:
    only use references you trust. The factory receives whichever of
    ``num_classes``, ``in_channels`` and ``image_size`` its signature accepts.
    """
    _check_dims(num_classes, in_channels, image_size)
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if name.startswith("torchvision:"):
        return _build_torchvision(name.removeprefix("torchvision:"), num_classes, in_channels)
    if ":" in name:
        return _build_user(name, num_classes, in_channels, image_size)
    close = difflib.get_close_matches(name, list_models(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown model {name!r}; {hint}known models: {', '.join(list_models())}, "
        "or 'torchvision:<name>', or 'package.module:factory'"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())
