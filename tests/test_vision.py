"""Real vision networks on a real image folder, through the command line; the ImageNet presets; published weights.

The folder is written by the tests (a few classes of tiny JPEG and PNG
images); budgets are a few steps, so the whole chain of each network runs in
well under a minute on a CPU. The commands run in the test process (``cli``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from clipq_search import load_compressed
from clipq_search.errors import ClipQError, ConfigError
from clipq_search.search.space import load_space
from clipq_search.search.trial import layer_names
from clipq_search.training.models import build_model, check_weights, pretrained_model

from ._imagefolder import make_image_folder
from .conftest import REPO, cli

torchvision = pytest.importorskip("torchvision", reason="vision models need torchvision (the vision extra)")

IMAGENET_INFO = {"num_classes": 1000, "in_channels": 3, "image_size": 224}
TINY = [
    "trial.train.max_steps=2", "trial.train.batch_size=8", "trial.eval_batch_size=16",
    "final.train.max_steps=2", "final.train.batch_size=8", "resources.cpus_per_trial=1",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder"), classes=3, train_per_class=12, val_per_class=4)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """In an interpreter of its own: ``env`` (TORCH_HOME) reaches the Ray workers this command starts."""
    return subprocess.run(
        [sys.executable, "run_search.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout


def _space(path: Path, model: str, root: Path, **extra: object) -> Path:
    data = {
        "name": path.stem,
        "model": model,
        "dataset": {"name": "imagefolder", "root": str(root), "val_size": 9, "image_size": 32},
        "baseline": {"train": {"max_steps": 2, "batch_size": 8}},
        "layers": {"default": {"p": [0.3, 0.9], "bits": [3, 6]}},
        "search": {"trials": 2, "concurrency": 1},  # one trial at a time: one Ray worker to start
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _chain(model: str, space: Path, results: Path, *, pretrain: bool) -> dict[str, object]:
    """pretrain (unless the space gives baseline.checkpoint), search, report, export, final, all through the CLI."""
    where = ["--results", str(results), *_sets(TINY)]
    if pretrain:
        out = _ok(cli("pretrain", str(space), *where))
        assert "baseline " + model in out
    _ok(cli("search", str(space), *where, "--trials", "2"))
    run = results / space.stem
    _ok(cli("report", str(run)))
    _ok(cli("export", str(run), "--max-drop", "100"))
    # the export's rule: on 12 images a class, accuracy moves by 11 points a mistake
    _ok(cli("final", str(run), "--max-drop", "100", *_sets(TINY[3:])))
    return json.loads((run / "final" / "metrics.json").read_text())


@pytest.mark.slow
def test_resnet18_and_mobilenet_v3_through_the_command_line(images: Path, tmp_path: Path) -> None:
    """Pretrain, a 2-trial search, report, export and final of two real networks on a real image folder.

    MobileNetV3 brings depthwise and grouped convolutions and squeeze-excitation blocks; its
    dense model is a given checkpoint (baseline.checkpoint), ResNet-18's is pretrained here.
    """
    mobile_ckpt = tmp_path / "mobilenet_v3_small.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), mobile_ckpt)
    spaces = {
        "torchvision:resnet18": _space(tmp_path / "rn18.yaml", "torchvision:resnet18", images),
        "torchvision:mobilenet_v3_small": _space(
            tmp_path / "mnv3.yaml", "torchvision:mobilenet_v3_small", images,
            baseline={"checkpoint": str(mobile_ckpt)},
        ),
    }
    results = tmp_path / "results"
    metrics = {m: _chain(m, s, results, pretrain=m.endswith("resnet18")) for m, s in spaces.items()}
    for model, m in metrics.items():
        run = results / spaces[model].stem
        trials = pd.read_csv(run / "trials.csv")
        assert list(trials["state"]) == ["COMPLETE", "COMPLETE"]
        assert (run / "report.html").is_file() and (run / "plan.json").is_file()
        assert m["rate"] > 2 and 0 <= m["compressed_test_top1"] <= 100 and m["control_test_top1"] is not None
        net = build_model(model, num_classes=3, in_channels=3, image_size=32)
        net.load_state_dict(load_compressed(run / "final" / "model.clipq"), strict=True)
        plan = json.loads((run / "final" / "plan.json").read_text())["layers"]
        assert set(plan) == set(layer_names(load_space(run / "space.yaml"), {**IMAGENET_INFO, "num_classes": 3}))
        for name, cfg in plan.items():  # every layer of the file is pruned-quantized with its plan's bits
            w = net.get_submodule(name).weight
            assert torch.unique(w[w != 0]).numel() <= 2 ** cfg["bits"] - 1, name
    mobile = build_model("torchvision:mobilenet_v3_small", num_classes=3, in_channels=3)
    compressed = json.loads((results / "mnv3" / "final" / "plan.json").read_text())["layers"]
    depthwise = [n for n in compressed if getattr(mobile.get_submodule(n), "groups", 1) > 1]
    squeeze = [n for n in compressed if ".fc1" in n or ".fc2" in n]
    assert depthwise and squeeze  # grouped convolutions and SE blocks are compressed too


def test_imagenet_presets_name_real_layers() -> None:
    """Every layer pattern and group of both ImageNet presets matches layers of the real torchvision model."""
    for preset, layers in (("imagenet_alexnet", 8), ("imagenet_resnet50", 54)):
        space = load_space(preset)
        names = layer_names(space, IMAGENET_INFO)
        assert len(names) == layers
        units = space.search_params(names)  # raises when a pattern or group member matches nothing
        assert sorted(n for u in units for n in u.layers) == sorted(names)  # every layer searched, once
        for group, members in space.layers.groups:
            unit = next(u for u in units if u.key == group)
            assert unit.layers and all(any(n == m or n.startswith(m.rstrip("*")) for m in members) for n in unit.layers)


@pytest.mark.slow
def test_imagenet_presets_run_on_a_small_folder_from_a_driver_without_gpu(images: Path, tmp_path: Path) -> None:
    """Both presets, paper sampler included, searched on a generated folder; budgets shrunk with --set."""
    common = [
        f"dataset.root={images}", "dataset.val_size=9", "resources.device=auto", "resources.gpus_per_trial=0",
        "resources.cpus_per_trial=1", "baseline.train.max_steps=1", "baseline.train.batch_size=8",
        "trial.train.max_steps=1", "trial.train.batch_size=8", "trial.eval_batch_size=16",
        "search.paper.lambdas=[10]", "search.paper.evals_per_layer=2", "search.paper.subset=8",
        "search.concurrency=1",
    ]
    sizes = {"imagenet_resnet50": 32, "imagenet_alexnet": 64}  # AlexNet's pooling needs at least 63 pixels

    for preset, size in sizes.items():
        sets = _sets([*common, f"dataset.image_size={size}"])
        out = _ok(cli("search", preset, "--results", str(tmp_path), "--trials", "1", *sets))
        assert "paper strategy: per-layer GP search" in out and "lambda 10:" in out
        trials = pd.read_csv(tmp_path / preset / "trials.csv")
        assert list(trials["state"]) == ["COMPLETE"] and list(trials["source"]) == ["paper"]


# -- published weights ----------------------------------------------------------------------------


def test_torchvision_weights_come_from_torchs_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ClipQError) as info:
        pretrained_model("torchvision:resnet18", "IMAGENET1K_V1", num_classes=1000)
    folder = tmp_path / "hub" / "checkpoints"
    assert "resnet18-f37072fd.pth" in str(info.value) and str(folder) in str(info.value)
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, DEFAULT"):
        check_weights("torchvision:resnet18", "IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="baseline.checkpoint"):
        check_weights("lenet300", "DEFAULT")
    folder.mkdir(parents=True)
    published = torchvision.models.resnet18(num_classes=1000)  # stands in for the published file
    torch.save(published.state_dict(), folder / "resnet18-f37072fd.pth")
    model, fresh = pretrained_model("torchvision:resnet18", "DEFAULT", num_classes=1000)
    assert not fresh
    pairs = zip(model.state_dict().values(), published.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # another class count: the backbone is the file's, the classifier is new
    model, fresh = pretrained_model("torchvision:resnet18", "IMAGENET1K_V1", num_classes=3)
    assert fresh and torch.equal(model.conv1.weight, published.conv1.weight) and model.fc.weight.shape == (3, 512)


def test_a_baseline_of_published_weights_is_evaluated_not_retrained(images: Path, tmp_path: Path) -> None:
    """Through the command line: a missing file is one line naming it; a cached one is evaluated as it is."""
    space = _space(tmp_path / "pre.yaml", "torchvision:resnet18", images, model_weights="IMAGENET1K_V1")
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    r = _cli("pretrain", str(space), "--results", str(tmp_path / "res"), env=env)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "resnet18-f37072fd.pth" in r.stderr and str(folder) in r.stderr
    folder.mkdir(parents=True)
    weights = torchvision.models.resnet18(num_classes=3).state_dict()  # a file of the dataset's class count
    torch.save(weights, folder / "resnet18-f37072fd.pth")
    out = _ok(_cli("pretrain", str(space), "--results", str(tmp_path / "res"), env=env))
    assert "evaluating torchvision:resnet18 with weights IMAGENET1K_V1" in out and "pretrain: epoch" not in out
    (ckpt,) = (tmp_path / "res" / "baselines").glob("*.pt")
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in weights.items())


def test_timm_weights_come_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm", reason="the timm extra is not installed")
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ClipQError) as info:
        pretrained_model("timm:resnet18.a1_in1k", "DEFAULT", num_classes=1000)
    assert "timm/resnet18.a1_in1k/model.safetensors" in str(info.value) and str(tmp_path) in str(info.value)
    published = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(published.state_dict(), repo / "snapshots" / revision / "model.safetensors")
    model, fresh = pretrained_model("timm:resnet18.a1_in1k", "DEFAULT", num_classes=1000)
    assert not fresh
    pairs = zip(model.state_dict().values(), published.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    model, fresh = pretrained_model("timm:resnet18.a1_in1k", "DEFAULT", num_classes=3)
    assert fresh and torch.equal(model.conv1.weight, published.conv1.weight)
