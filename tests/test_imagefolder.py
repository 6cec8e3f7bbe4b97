"""Image folders: listed once and shipped as a list, subsets, loader processes that persist, image size."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from clipq_search.errors import ClipQError, ConfigError
from clipq_search.training.data import (
    DatasetSpec,
    FolderDataset,
    dataset_from_state,
    dataset_info,
    load_dataset,
    loader_workers,
)

from ._imagefolder import make_image_folder

pytest.importorskip("torchvision", reason="image folders need torchvision (the vision extra)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=3, train_per_class=8, val_per_class=2)


def test_splits_image_size_and_classes(folder: Path) -> None:
    spec = DatasetSpec("imagefolder", root=str(folder), val_size=6, image_size=24)
    splits = load_dataset(spec)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    assert splits.num_classes == 3 and splits.image_size == 24
    assert dataset_info(spec) == {"num_classes": 3, "in_channels": 3, "image_size": 24}
    x, y = next(splits.val.batches(4, shuffle=False))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = next(splits.train.batches(5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (5, 3, 24, 24)
    # the validation images are not augmented; the training ones are
    assert not splits.val.train and splits.train.train
    assert DatasetSpec("imagefolder", root=str(folder)).crop_size == 224
    with pytest.raises(ConfigError, match="image folders only"):
        DatasetSpec("fashion-mnist", image_size=32)


def test_subset_of_a_folder(folder: Path) -> None:
    """The paper strategy evaluates a subset of the training split: image folders have one."""
    train = load_dataset(DatasetSpec("imagefolder", root=str(folder), val_size=6, image_size=16)).train
    sub = train.subset(torch.tensor([0, 5, 7]), train=False)
    assert isinstance(sub, FolderDataset) and len(sub) == 3 and not sub.train
    assert list(sub.files) == [train.files[i] for i in (0, 5, 7)]
    assert torch.equal(next(sub.batches(3, shuffle=False))[1], torch.as_tensor(train.targets[[0, 5, 7]]))


def test_a_worker_rebuilds_the_split_without_listing_the_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = load_dataset(DatasetSpec("imagefolder", root=str(folder), val_size=6, image_size=16))
    state = splits.train.to_state()
    assert "num_workers" not in state  # the worker decides from its own CPUs
    assert isinstance(state["files"], np.ndarray) and isinstance(state["targets"], np.ndarray)

    def no_listing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the folder was listed again")

    import torchvision.datasets.folder as tv_folder

    monkeypatch.setattr(tv_folder, "make_dataset", no_listing)
    monkeypatch.setattr(tv_folder, "find_classes", no_listing)
    rebuilt = dataset_from_state(state, num_workers=0)
    assert isinstance(rebuilt, FolderDataset) and rebuilt.num_workers == 0 and len(rebuilt) == 18
    assert rebuilt.classes == splits.train.classes
    x, y = next(rebuilt.batches(6, shuffle=False))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == splits.train.targets[:6].tolist()


def test_loader_processes_persist_between_passes(folder: Path) -> None:
    splits = load_dataset(DatasetSpec("imagefolder", root=str(folder), val_size=6, image_size=16))
    data = dataset_from_state(splits.train.to_state(), num_workers=2)
    before = {p.pid for p in multiprocessing.active_children()}
    g = torch.Generator().manual_seed(0)
    first = [y for _, y in data.batches(6, shuffle=True, generator=g)]
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2  # still up after the pass: the next one does not start them again
    second = [y for _, y in data.batches(6, shuffle=True, generator=g)]
    assert {p.pid for p in multiprocessing.active_children()} - before == workers
    assert sorted(torch.cat(first).tolist()) == sorted(torch.cat(second).tolist())
    assert torch.cat(first).tolist() != torch.cat(second).tolist()  # a new order each pass
    data.close()


def test_loader_workers_follow_the_cpus_given() -> None:
    assert [loader_workers(c) for c in (0.5, 1, 2, 8, 8.5)] == [0, 0, 1, 7, 7]
    assert 0 <= loader_workers() <= 8


def test_an_empty_class_folder_is_one_clear_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1)
    (tmp_path / "train" / "class_99").mkdir()
    with pytest.raises(ClipQError, match="class_99"):
        load_dataset(DatasetSpec("imagefolder", root=str(tmp_path), val_size=1))
