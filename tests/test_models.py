from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from clipq_search.errors import ClipQError, ConfigError
from clipq_search.training.models import build_model, count_parameters, list_models, register_model


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [("lenet300", 1, 28), ("lenet5", 1, 28), ("lenet5", 3, 32), ("resnet20", 3, 32), ("resnet20", 1, 28)],
)
def test_forward_shape(name: str, channels: int, size: int) -> None:
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)


def test_registry_lists_zoo() -> None:
    assert {"lenet300", "lenet5", "resnet20"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_lenet_layer_names_and_sizes() -> None:
    lenet5 = build_model("lenet5")
    assert count_parameters(lenet5) == 431_080
    names = {n for n, m in lenet5.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert names == {"conv1", "conv2", "fc1", "fc2"}
    lenet300 = build_model("lenet300")
    names = [n for n, m in lenet300.named_modules() if isinstance(m, nn.Linear)]
    assert names == ["fc1", "fc2", "fc3"]
    assert [tuple(lenet300.get_submodule(n).weight.shape) for n in names] == [(300, 784), (100, 300), (10, 100)]


def test_lenet5_rejects_tiny_images() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        build_model("lenet5", image_size=12)


def test_resnet20_shortcuts_are_parameter_free() -> None:
    model = build_model("resnet20", in_channels=3, image_size=32)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # conv1 + 3 stages x 3 blocks x 2 convs
    assert 260_000 < count_parameters(model) < 280_000


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("lenet7")
    msg = str(info.value)
    assert "lenet300" in msg and "lenet5" in msg and "resnet20" in msg
    assert "torchvision:<name>" in msg and "timm:<name>" in msg and "package.module:factory" in msg


def test_register_duplicate_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(lambda **_: nn.Linear(1, 1))


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_user_model_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(
        tmp_path,
        monkeypatch,
        "my_zoo_mod",
        "from torch import nn\n"
        "def tiny(num_classes, image_size=0):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, num_classes))\n"
        "def takes_all(**kw):\n"
        "    assert set(kw) == {'num_classes', 'in_channels', 'image_size'}\n"
        "    return nn.Linear(1, kw['num_classes'])\n"
        "def not_a_model():\n"
        "    return 42\n",
    )
    model = build_model("my_zoo_mod:tiny", num_classes=4, in_channels=1, image_size=6)
    assert model(torch.randn(2, 1, 6, 6)).shape == (2, 4)
    assert build_model("my_zoo_mod:takes_all", num_classes=3).out_features == 3
    with pytest.raises(ClipQError, match="not a torch.nn.Module"):
        build_model("my_zoo_mod:not_a_model")
    with pytest.raises(ClipQError, match="no attribute 'missing'"):
        build_model("my_zoo_mod:missing")


def test_user_model_import_failure() -> None:
    with pytest.raises(ClipQError, match="no_such_pkg_xyz.mod:make") as info:
        build_model("no_such_pkg_xyz.mod:make")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="malformed"):
        build_model("pkg:")


def test_torchvision_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(ClipQError, match="pip install torchvision"):
        build_model("torchvision:resnet18", in_channels=3, image_size=32)


def test_torchvision_models_via_get_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object, int]] = []

    def get_model(name: str, *, weights: object, num_classes: int) -> nn.Module:
        calls.append((name, weights, num_classes))
        return nn.Linear(3, num_classes)

    models_ns = types.SimpleNamespace(get_model=get_model, list_models=lambda module=None: ["resnet18"])
    fake = types.SimpleNamespace(models=models_ns)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    model = build_model("torchvision:resnet18", num_classes=5, in_channels=3, image_size=32)
    assert isinstance(model, nn.Linear) and calls == [("resnet18", None, 5)]
    with pytest.raises(ConfigError, match="unknown torchvision"):
        build_model("torchvision:nope", in_channels=3)
    with pytest.raises(ConfigError, match="3-channel"):
        build_model("torchvision:resnet18", in_channels=1)
