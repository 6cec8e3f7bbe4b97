"""Model zoo: a registry of named factories plus torchvision and user-supplied models.

``build_model(name, num_classes=..., in_channels=..., image_size=...)`` accepts

* a registered name (:func:`list_models`): ``lenet300``, ``lenet5``, ``resnet20``;
* ``torchvision:<name>``: any torchvision classification model, untrained
  or with its published weights (``weights``, from torch's local cache);
* ``timm:<name>``: a timm model (the ``timm`` extra), likewise;
* ``package.module:factory``: a function in an importable module of your own.

Layer (module) names are stable and documented per model, because per-layer
compression plans are keyed by them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn import functional as F

from clipq_search.errors import ClipQError, ConfigError, clip, shown

__all__ = [
    "LeNet5",
    "LeNet300",
    "ResNet20",
    "build_model",
    "count_parameters",
    "check_weights",
    "list_models",
    "pretrained_model",
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
            f"unknown torchvision classification model {shown(name)}; "
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
        raise ConfigError(f"model reference {shown(ref)} is malformed; use 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a module's code must not end the command silently
        raise ClipQError(
            f"cannot import module {shown(module_name)} for model {shown(ref)}: {type(exc).__name__}: "
            f"{clip(str(exc))}; check the name and that its folder is on PYTHONPATH"
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ClipQError(f"model {shown(ref)}: module {shown(module_name)} has no attribute {shown(attr)}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ClipQError(f"model {shown(ref)}: {shown(attr)} is not callable; point at a function or class")
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
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too (e.g. builtins:exit): one clear error, never a silent exit
        raise ClipQError(
            f"model {shown(ref)}: calling the factory failed ({type(exc).__name__}: {clip(str(exc))}); "
            "'module:factory' must name a function or class that returns a torch.nn.Module"
        ) from None
    if not isinstance(model, nn.Module):
        raise ClipQError(
            f"model {shown(ref)}: the factory returned {type(model).__name__}, not a torch.nn.Module; "
            "'module:factory' must name a function or class that returns one"
        )
    return model


# --------------------------------------------------------------------------- published weights


def _torchvision_entry(name: str, weights: str) -> Any:
    """torchvision's description of the weight set ``weights`` of model ``name`` (its URL, its classes)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision:{name} has no published weights; remove model_weights") from None
    names = list(enum.__members__)
    if weights not in names:
        raise ConfigError(
            f"model_weights={shown(weights)} is not a weight set of torchvision:{name}; use one of {', '.join(names)}"
        )
    return enum[weights]


def check_weights(name: str, weights: str) -> None:
    """That ``weights`` names published weights of model ``name``; whether their file is cached is not checked.

    The file is looked for where the model is built (a Ray worker's own cache).
    """
    if not isinstance(weights, str) or not weights:
        raise ConfigError(f"model_weights={shown(weights)} is invalid; give a weight set name such as DEFAULT")
    if name.startswith("torchvision:"):
        _torchvision_entry(name.removeprefix("torchvision:"), weights)
        return
    if name.startswith("timm:"):
        short = name.removeprefix("timm:")
        if weights != "DEFAULT":
            raise ConfigError(
                f"model_weights={shown(weights)} for timm:{short}: timm's weights are named by the model's tag; "
                f"use model_weights: DEFAULT and a tagged name such as timm:{short.split('.')[0]}.a1_in1k"
            )
        timm = _import_timm(short)
        _timm_exists(timm, short)
        from timm.models import get_pretrained_cfg

        if get_pretrained_cfg(short) is None:
            raise ConfigError(f"timm:{short} has no pretrained weights; remove model_weights, or name a tagged model")
        return
    raise ConfigError(
        f"model_weights applies to torchvision: and timm: models, not {shown(name)}; for a model of your own, "
        "give its trained state dict as baseline.checkpoint"
    )


def _torchvision_weights(name: str, weights: str) -> tuple[Path, int]:
    """The cached file of torchvision's weights ``weights`` of model ``name`` and their class count."""
    import torch

    entry = _torchvision_entry(name, weights)
    filename = os.path.basename(urllib.parse.urlparse(entry.url).path)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / filename
    if not path.is_file():
        raise ClipQError(
            f"torchvision:{name} weights {entry.name} are not in torch's cache ({path} is missing) and nothing is "
            f"downloaded; put {filename} (from {entry.url}) in {folder} (TORCH_HOME sets that folder)"
        )
    return path, len(entry.meta.get("categories") or ()) or 1000


def _load_torchvision_weights(model: nn.Module, path: Path, name: str, weight_classes: int) -> bool:
    """Load a cached torchvision weight file into ``model``; True when its classifier stays newly initialised.

    The classifier's tensors (those whose first dimension is the weights' class
    count) keep their initialisation when the dataset has another number of
    classes; every other tensor must match the file.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load's errors vary with the damage
        raise ClipQError(
            f"{path} is not a readable torch weight file ({type(exc).__name__}); delete it and put the published "
            "file there again"
        ) from None
    own = model.state_dict()
    if not isinstance(state, dict):
        raise ClipQError(f"{path} holds a {type(state).__name__}, not torchvision:{name}'s weights; put the "
                         "published file there again")
    # Files older than BatchNorm's step counter lack it; BatchNorm fills it in on loading.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ClipQError(
            f"{path} does not hold torchvision:{name}'s weights (missing {', '.join(missing[:3]) or 'nothing'}, "
            f"unexpected {', '.join(unexpected[:3]) or 'nothing'}); put the published file there again"
        )
    fresh = [k for k in state if state[k].shape != own[k].shape]
    for k in fresh:
        if state[k].shape[:1] != (weight_classes,):
            raise ClipQError(
                f"{path}: tensor {k} has shape {tuple(state[k].shape)}, the model {tuple(own[k].shape)}; "
                f"it is not torchvision:{name}'s weight file"
            )
        state[k] = own[k]
    model.load_state_dict(state, strict=False)
    return bool(fresh)


def _timm_weights(name: str) -> tuple[str, int]:
    """The cached file of timm model ``name``'s pretrained weights (Hugging Face or torch cache) and their classes."""
    import torch
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"timm:{name} has no pretrained weights; remove model_weights, or name a tagged model")
    classes = int(cfg.num_classes or 1000)
    tried: list[str] = []
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo = cfg.hf_hub_id.partition("@")[0]
        files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
        for filename in [*files, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return found, classes
        tried.append(
            f"{repo}/model.safetensors in the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HOME sets it; "
            f"on a machine with internet: huggingface-cli download {repo} model.safetensors, then copy the cache)"
        )
    if cfg.url:
        filename = os.path.basename(urllib.parse.urlparse(cfg.url).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if path.is_file():
            return str(path), classes
        tried.append(f"{filename} (from {cfg.url}) in {path.parent} (TORCH_HOME sets it)")
    raise ClipQError(
        f"timm:{name}'s pretrained weights are not cached here and nothing is downloaded; put "
        + " or ".join(tried or ["its weight file in timm's cache"])
    )


def pretrained_model(
    name: str, weights: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224
) -> tuple[nn.Module, bool]:
    """``name`` (``torchvision:`` or ``timm:``) with its published weights, read from the library's cache.

    ``weights``: a torchvision weight set (``IMAGENET1K_V2``, ``DEFAULT``) or,
    for timm, ``DEFAULT`` (the weights of the tagged model name, e.g.
    ``timm:resnet50.a1_in1k``). Never downloads: a missing file is a
    :class:`ClipQError` naming it and the folder it belongs in. Returns the
    model and whether its classifier is newly initialised (the dataset has
    another class count than the weights).
    """
    _check_dims(num_classes, in_channels, image_size)
    check_weights(name, weights)
    if name.startswith("torchvision:"):
        short = name.removeprefix("torchvision:")
        model = _build_torchvision(short, num_classes, in_channels)
        path, classes = _torchvision_weights(short, weights)
        return model, _load_torchvision_weights(model, path, short, classes)
    short = name.removeprefix("timm:")
    timm = _import_timm(short)
    file, classes = _timm_weights(short)
    model = timm.create_model(
        short, pretrained=True, num_classes=num_classes, in_chans=in_channels, pretrained_cfg_overlay={"file": file}
    )
    return model, classes != num_classes


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ClipQError(
            f"model 'timm:{name}' needs timm, which is not installed; pip install 'clipq-search[timm]'"
        ) from exc
    return timm


def _timm_exists(timm: Any, name: str) -> None:
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown timm model {shown(name)}; {hint}see timm.list_models()")


def _build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    timm = _import_timm(name)
    _timm_exists(timm, name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def build_model(
    name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, weights: str | None = None
) -> nn.Module:
    """Build a model by name: registered, ``torchvision:<name>``, ``timm:<name>`` or ``package.module:factory``.

    Untrained, unless ``weights`` names published weights of a torchvision or
    timm model (:func:`pretrained_model`: read from the local cache only).

    The ``package.module:factory`` form imports and runs that module's code:
    only use references you trust. The factory receives whichever of
    ``num_classes``, ``in_channels`` and ``image_size`` its signature accepts.
    """
    if weights is not None:
        return pretrained_model(name, weights, num_classes=num_classes, in_channels=in_channels,
                                image_size=image_size)[0]
    _check_dims(num_classes, in_channels, image_size)
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if name.startswith("torchvision:"):
        return _build_torchvision(name.removeprefix("torchvision:"), num_classes, in_channels)
    if name.startswith("timm:"):
        return _build_timm(name.removeprefix("timm:"), num_classes, in_channels)
    if ":" in name:
        return _build_user(name, num_classes, in_channels, image_size)
    close = difflib.get_close_matches(name, list_models(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown model {shown(name)}; {hint}known models: {', '.join(list_models())}, "
        "or 'torchvision:<name>', 'timm:<name>', or 'package.module:factory'"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters())
