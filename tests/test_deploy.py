"""The deploy path: attach, train, then strip or save_compressed, then load into a plain model."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

from clipq_search import attach_clipq, estimate_size, load_compressed, save_compressed, strip_clipq
from clipq_search.training.models import build_model


def _trained(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model("lenet5")
    attach_clipq(model, {"default": {"p": 0.85, "bits": 3}})
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, torch.randn(8, 1, 28, 28, generator=g)


def test_an_attached_model_s_state_dict_is_the_full_precision_network() -> None:
    """The trap the docs warn of: torch.save(model.state_dict()) of an attached model ships uncompressed weights."""
    model, x = _trained()
    with torch.no_grad():
        expected = model(x)
    plain = build_model("lenet5").eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.equal(plain(x), expected)


@pytest.mark.parametrize("way", ["strip", "save_compressed"])
def test_deployed_model_computes_what_the_trained_one_did(way: str, tmp_path: Path) -> None:
    model, x = _trained()
    with torch.no_grad():
        expected = model(x)
    plain = build_model("lenet5").eval()
    if way == "strip":
        plan = strip_clipq(model)
        path = tmp_path / "stripped.clipq"
        assert estimate_size(model, plan).total_bytes == save_compressed(model, path, plan).total_bytes
        assert path.stat().st_size == estimate_size(model, plan).total_bytes
        assert estimate_size(model, plan).rate > 5  # sized as compressed, not as a dense model
        plain.load_state_dict(model.state_dict())
    else:
        path = tmp_path / "model.clipq"
        written = save_compressed(model, path)
        assert written.total_bytes == path.stat().st_size
        plain.load_state_dict(load_compressed(path))
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


def test_the_stripped_file_equals_the_attached_one(tmp_path: Path) -> None:
    model, _ = _trained()
    save_compressed(model, tmp_path / "attached.clipq")
    plan = strip_clipq(model)
    save_compressed(model, tmp_path / "stripped.clipq", plan)
    assert (tmp_path / "attached.clipq").read_bytes() == (tmp_path / "stripped.clipq").read_bytes()


def test_the_package_lists_each_public_name_once_and_loads_it_on_first_use() -> None:
    """``__all__``, the names loaded on first use and the type checkers' imports stay one list."""
    import ast

    import clipq_search

    tree = ast.parse(Path(clipq_search.__file__).read_text())
    checked = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for sub in node.body
        if isinstance(sub, ast.ImportFrom)
        for alias in sub.names
    }
    errors = {"ClipQError", "ConfigError", "FormatError"}
    assert sorted(clipq_search.__all__) == sorted(errors | set(clipq_search._LAZY)) == sorted(errors | checked)
    for name in clipq_search.__all__:
        value = getattr(clipq_search, name)
        assert value is getattr(importlib.import_module(clipq_search._LAZY.get(name, "clipq_search.errors")), name)
    with pytest.raises(AttributeError):
        clipq_search.no_such_name  # noqa: B018
