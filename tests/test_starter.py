"""Presets by name, ``clipq-search spaces`` and ``clipq-search init``: what a newcomer starts from."""

from __future__ import annotations

import shlex
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from clipq_search.cli import main
from clipq_search.core.plan import compressible_layers
from clipq_search.errors import ConfigError
from clipq_search.search.space import list_presets, load_space
from clipq_search.search.starter import group_layers, starter_space
from clipq_search.training.models import build_model

from .conftest import REPO

PRESETS = {"smoke", "lenet300_fashion", "lenet5_fashion", "imagenet_alexnet", "imagenet_resnet50"}


def test_every_shipped_space_is_a_preset_with_a_description() -> None:
    presets = dict(list_presets())
    files = {p.stem for p in (REPO / "search_spaces").glob("*.yaml")}
    assert set(presets) == files == PRESETS
    assert all(presets.values()), presets


def test_the_commands_in_the_presets_headers_parse_and_their_storage_drivers_are_installed() -> None:
    """What a preset's header comment tells a user to run: the command line takes it, and its --storage URL's
    database driver is the one the package installs."""
    from clipq_search.cli import build_parser
    from clipq_search.search.study import check_storage

    found = 0
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        for n, line in enumerate(lines):
            if "python run_search.py " not in line:
                continue
            command, more = line.split("python run_search.py ", 1)[1], iter(lines[n + 1 :])
            while command.endswith("\\"):  # continued on the next comment line
                command = command[:-1] + next(more)
            args = build_parser().parse_args(shlex.split(command))
            assert Path(REPO, args.space).is_file() or args.space in PRESETS, (path.name, command)
            if getattr(args, "storage", None):
                check_storage(args.storage)
            found += 1
    assert found >= len(PRESETS)


def test_spaces_command_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "clipq-search search smoke" in out


def test_a_preset_name_loads_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    space = load_space("smoke", ["search.trials=3"])
    assert space.name == "smoke" and space.search.trials == 3
    assert space.to_dict() == load_space(REPO / "search_spaces" / "smoke.yaml", ["search.trials=3"]).to_dict()


def test_a_file_of_that_name_in_the_folder_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("smoke").write_text("name: mine\nmodel: lenet5\n")
    assert load_space("smoke").name == "mine"


def test_an_unknown_name_lists_the_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="neither a space file nor a preset; presets are: .*smoke"):
        load_space("smok")


@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_init_writes_a_space_that_loads_and_resolves_against_the_model(
    model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine.yaml"
    assert main(["init", model, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    layers = list(compressible_layers(build_model(model)))
    for name in layers:
        assert f"#   {name} " in text  # each layer listed with its shape and size
    space = load_space(out)
    units = space.search_params(layers)
    assert sorted(n for u in units for n in u.layers) == sorted(layers)
    assert dict(space.layers.overrides).keys() == {layers[0], layers[-1]}
    # the sampler and device it writes are the defaults a space without them gets
    bare = tmp_path / "bare.yaml"
    bare.write_text(f"name: bare\nmodel: {model}\n")
    assert space.search.sampler == load_space(bare).search.sampler
    assert space.resources.device == load_space(bare).resources.device


def test_init_groups_a_deep_model_by_its_blocks(tmp_path: Path) -> None:
    out = tmp_path / "r20.yaml"
    assert main(["init", "resnet20", "--dataset", "cifar10", "--out", str(out)]) == 0
    space = load_space(out)
    layers = list(compressible_layers(build_model("resnet20", in_channels=3, image_size=32)))
    units = space.search_params(layers)
    assert [u.key for u in units] == ["conv1", "layer1", "layer2", "layer3", "fc"]
    assert [n for u in units for n in u.layers] == layers  # every layer once, in model order
    assert space.dataset.name == "cifar10"


def test_init_prints_to_standard_output_without_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "lenet300"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "lenet300"


def test_init_never_replaces_a_file_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine.yaml"
    out.write_text("my own notes\n")
    assert main(["init", "lenet300", "--out", str(out)]) == 2
    assert "exists; give another file name or --force" in capsys.readouterr().err
    assert out.read_text() == "my own notes\n"
    assert main(["init", "lenet300", "--out", str(out), "--force"]) == 0
    assert load_space(out).model == "lenet300"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["init", "lenet3000"], "unknown model 'lenet3000'; did you mean 'lenet300'?"),
        (["init", "lenet300", "--dataset", "imagenet"], "--dataset 'imagenet' is unknown"),
        (["init", "lenet300", "--out", "/nonexistent-folder/x.yaml"], "does not exist"),
    ],
)
def test_init_bad_input_is_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1, err


def test_init_takes_a_user_model_from_module_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=10, in_channels=1, image_size=28):
            return nn.Sequential(
                nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.Flatten(),
                nn.Linear(4 * (image_size - 2) ** 2, num_classes),
            )
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["init", "mynets:tiny", "--out", str(tmp_path / "tiny.yaml")]) == 0
    space = load_space(tmp_path / "tiny.yaml")
    assert space.model == "mynets:tiny"
    assert [u.key for u in space.search_params(["0", "3"])] == ["0", "3"]


def test_grouping_keeps_model_order_and_bounds_the_number_of_units() -> None:
    assert group_layers([f"fc{i}" for i in range(5)]) == {}
    # one prefix level gives too few groups, the next too many: consecutive blocks are merged
    names = [f"features.{i}.conv" for i in range(16)] + ["classifier.0", "classifier.3"]
    groups = group_layers(names, max_units=12)
    assert 3 <= len(groups) <= 12
    assert [n for members in groups.values() for n in members] == names


def test_starter_for_an_image_folder_marks_the_root_as_required() -> None:
    text = starter_space("lenet5", "imagefolder")
    assert "REQUIRED" in text and yaml.safe_load(text)["dataset"]["name"] == "imagefolder"


@pytest.mark.slow
def test_the_wheel_carries_the_presets(tmp_path: Path) -> None:
    """``pip install clipq-search`` gets the presets: they are package data of the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("clipq_search-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in PRESETS:
        assert f"clipq_search/presets/{preset}.yaml" in names
    assert "clipq_search/core/operator.py" in names and "clipq_search/analysis/rundir.py" in names
