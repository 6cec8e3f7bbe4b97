from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from clipq_search.errors import ClipQError, ConfigError, FormatError
from clipq_search.training.data import (
    DEFAULT_ROOTS,
    ArrayDataset,
    DatasetSpec,
    dataset_from_state,
    iter_batches,
    load_dataset,
    num_batches,
    read_cifar10,
    read_idx,
    read_mnist,
)

FASHION = Path(os.environ.get("CLIPQ_FASHION_MNIST", DEFAULT_ROOTS["fashion-mnist"]))
HAVE_FASHION = any((FASHION / f).is_file() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"))
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {FASHION}")


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x0000 0x08 ndim, big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(
    root: Path, n_train: int = 60, n_test: int = 20, size: int = 28, gz: bool = True
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
        else:
            (root / name).write_bytes(idx_bytes(arr))
    return arrays


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    rec = np.concatenate([labels.reshape(-1, 1), images.reshape(len(labels), -1)], axis=1).astype(np.uint8)
    return rec.tobytes()


def write_cifar(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, (per_batch,), dtype=np.uint8)
        (root / name).write_bytes(cifar_bytes(x, y))
        all_x.append(x)
        all_y.append(y)
    return np.concatenate(all_x), np.concatenate(all_y)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_mnist_roundtrip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    tx, ty, vx, vy = read_mnist(tmp_path)
    assert tx.shape == (60, 1, 28, 28) and tx.dtype == torch.uint8
    assert ty.shape == (60,) and ty.dtype == torch.int64
    assert vx.shape == (20, 1, 28, 28) and vy.shape == (20,)
    np.testing.assert_array_equal(tx[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(vy.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 12)
    with pytest.raises(FormatError, match="magic"):
        read_idx(path)


def test_read_idx_truncated(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((5, 28, 28), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-30])
    with pytest.raises(FormatError, match="gzip"):
        read_idx(path)


def test_read_idx_wrong_ndim(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros((5,), np.uint8)))
    with pytest.raises(FormatError, match="3"):
        read_idx(path, ndim=3)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((59,), np.uint8)))
    with pytest.raises(FormatError, match="59 labels"):
        read_mnist(tmp_path)


def test_missing_dir_message(tmp_path: Path) -> None:
    spec = DatasetSpec("fashion-mnist", root=str(tmp_path / "nowhere"))
    with pytest.raises(ClipQError) as info:
        load_dataset(spec)
    msg = str(info.value)
    assert "\n" not in msg
    assert "nowhere" in msg and "does not exist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte" in msg


def test_missing_file_message(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ClipQError, match="IDX files"):
        load_dataset(DatasetSpec("mnist", root=str(tmp_path)))


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("sub", [False, True])
def test_read_cifar10(tmp_path: Path, sub: bool) -> None:
    folder = tmp_path / "cifar-10-batches-bin" if sub else tmp_path
    x, y = write_cifar(folder)
    tx, ty, vx, vy = read_cifar10(tmp_path)
    assert tx.shape == (20, 3, 32, 32) and vx.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(tx.numpy(), x[:20])
    np.testing.assert_array_equal(vy.numpy(), y[20:])
    splits = load_dataset(DatasetSpec("cifar10", root=str(tmp_path), val_size=5))
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (3, 32, 10)
    assert len(splits.train) == 15 and len(splits.val) == 5


def test_cifar_truncated(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(FormatError, match="data_batch_3.bin"):
        read_cifar10(tmp_path)


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(ClipQError, match="cifar-10-binary.tar.gz"):
        read_cifar10(tmp_path)


# --------------------------------------------------------------------------- specs and splits


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="fashion-mnist, mnist, cifar10, imagefolder"):
        DatasetSpec("imagenet1k")
    with pytest.raises(ConfigError, match="root is required"):
        DatasetSpec("mnist")
    with pytest.raises(ConfigError, match="val_size"):
        DatasetSpec("fashion-mnist", val_size=-1)


def test_val_size_too_large(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    with pytest.raises(ConfigError, match="val_size=60"):
        load_dataset(DatasetSpec("mnist", root=str(tmp_path), val_size=60))


def test_split_fixed_and_disjoint(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=200)
    spec = DatasetSpec("mnist", root=str(tmp_path), val_size=50, split_seed=3)
    a, b = load_dataset(spec), load_dataset(DatasetSpec("mnist", root=str(tmp_path), val_size=50, split_seed=3))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert len(a.train) == 150 and len(a.val) == 50
    # Images are random bytes, so each row identifies its source index.
    full = read_mnist(tmp_path)[0].flatten(1)
    rows = {bytes(r.numpy()): i for i, r in enumerate(full)}
    train_ids = {rows[bytes(r.numpy())] for r in a.train.images.flatten(1)}
    val_ids = {rows[bytes(r.numpy())] for r in a.val.images.flatten(1)}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 200
    other = load_dataset(DatasetSpec("mnist", root=str(tmp_path), val_size=50, split_seed=4))
    assert not torch.equal(other.val.images, a.val.images)
    none = load_dataset(DatasetSpec("mnist", root=str(tmp_path), val_size=0))
    assert none.val is None and len(none.train) == 200


# --------------------------------------------------------------------------- ArrayDataset


def small_dataset(n: int = 10, channels: int = 1) -> ArrayDataset:
    images = torch.arange(n * channels * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, channels, 2, 2)
    return ArrayDataset(images, torch.arange(n) % 3, (0.5,) * channels, (0.25,) * channels)


def test_batches_normalize_and_cover() -> None:
    ds = small_dataset(10)
    batches = list(ds.batches(4, shuffle=False))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x0, y0 = batches[0]
    assert x0.dtype == torch.float32 and x0.shape == (4, 1, 2, 2)
    expected = (ds.images[:4].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x0, expected)
    assert [len(y) for _, y in ds.batches(4, shuffle=True, drop_last=True)] == [4, 4]
    assert ds.num_batches(4) == 3 and ds.num_batches(4, drop_last=True) == 2
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ys1 = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=g1)])
    ys2 = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=g2)])
    assert torch.equal(ys1, ys2) and sorted(ys1.tolist()) == sorted(ds.labels.tolist())


def test_state_roundtrip_and_subset() -> None:
    ds = small_dataset(10, channels=3)
    state = ds.to_state()
    assert isinstance(state["images"], np.ndarray) and isinstance(state["mean"], list)
    state["images"].setflags(write=False)  # as arrays come back from Ray's object store
    back = dataset_from_state(state)
    assert isinstance(back, ArrayDataset)
    assert torch.equal(back.images, ds.images) and back.mean == ds.mean and back.std == ds.std
    sub = ds.subset([1, 3])
    assert len(sub) == 2 and torch.equal(sub.labels, ds.labels[[1, 3]])


def test_array_dataset_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="one per channel"):
        ArrayDataset(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), (0.5,), (0.5,))


def test_iter_batches_accepts_dataloader() -> None:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(10, 1, 2, 2), torch.arange(10)), batch_size=4
    )
    assert num_batches(loader, 999) == 3
    assert sum(len(y) for _, y in iter_batches(loader, 999, shuffle=False)) == 10


def test_imagefolder_needs_torchvision(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ClipQError, match="pip install torchvision"):
            load_dataset(DatasetSpec("imagefolder", root=str(tmp_path)))
    else:
        pytest.skip("torchvision is installed")


# --------------------------------------------------------------------------- real data


@needs_fashion
def test_real_fashion_mnist() -> None:
    splits = load_dataset(DatasetSpec("fashion-mnist", root=str(FASHION)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    x = torch.cat([xb for xb, _ in splits.train.batches(5000, shuffle=False)])
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


def test_shuffled_order_moves_to_the_data_once_per_pass() -> None:
    """Data resident on an accelerator is indexed there: the shuffled order is not copied to it batch by batch.

    The "meta" device stands in for a GPU: every copy of an index tensor from the CPU to it is counted.
    """
    from torch.overrides import TorchFunctionMode

    copies: list[tuple[int, ...]] = []

    class CountCopies(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
                src = args[0]
                target = next((a for a in (*args[1:], kwargs.get("device")) if isinstance(a, str | torch.device)), None)
                if src.device.type == "cpu" and src.dtype == torch.int64 and target is not None:
                    if torch.device(target).type == "meta":
                        copies.append(tuple(src.shape))
            return func(*args, **kwargs)

    images = torch.zeros(40, 1, 4, 4, dtype=torch.uint8, device="meta")
    labels = torch.zeros(40, dtype=torch.int64, device="meta")
    data = ArrayDataset(images, labels, (0.5,), (0.5,))
    with CountCopies():
        batches = list(data.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and batches[0][0].device.type == "meta"
    assert copies == [(40,)]  # the whole order, once
