"""Datasets: readers for the on-disk formats, a fast in-memory dataset, fixed splits.

Small image datasets (Fashion-MNIST, MNIST, CIFAR-10) are decoded once per
process into uint8 tensors and served by :class:`ArrayDataset`, which batches
by tensor indexing (no per-item ``DataLoader`` overhead) and serialises to
plain numpy arrays so it can be shipped to Ray workers. Image folders (e.g. an
ImageNet-style tree) go through torchvision and a ``DataLoader`` wrapped in
:class:`FolderDataset`. Both expose the same ``batches(...)`` interface; use
:func:`iter_batches` / :func:`num_batches` to consume either (or a plain
``DataLoader``).

The validation split is a fixed, seeded permutation of the training set, so the
same :class:`DatasetSpec` gives the same split on every call and machine.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from clipq_search._io import read_regular
from clipq_search.errors import ClipQError, ConfigError, FormatError
from clipq_search.training import DATASET_NAMES

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_ROOTS",
    "NORMALIZATION",
    "ArrayDataset",
    "BatchSource",
    "DataSplits",
    "DatasetSpec",
    "FolderDataset",
    "dataset_from_state",
    "dataset_info",
    "iter_batches",
    "load_dataset",
    "loader_workers",
    "num_batches",
    "read_cifar10",
    "read_cifar10_batch",
    "read_idx",
    "read_mnist",
    "scan_image_folder",
]


DEFAULT_ROOTS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

#: Per-channel (mean, std) of the training images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
}

_HOW_TO_GET = {
    "fashion-mnist": (
        "install the Debian package (apt-get install dataset-fashion-mnist) or "
        "put the four Fashion-MNIST IDX files in that folder"
    ),
    "mnist": "put the four MNIST IDX files (from https://yann.lecun.com/exdb/mnist/) in that folder",
}

IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


# --------------------------------------------------------------------------- readers


DATA_FILE_LIMIT = 2 << 30  # the largest data file read, before and after gunzip (Fashion-MNIST's: 47 MB)


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when the name ends in ``.gz``; a regular file, bounded in size."""
    try:
        raw = read_regular(path, DATA_FILE_LIMIT, "data file")
        if path.suffix != ".gz":
            return raw
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as fh:
            data = fh.read(DATA_FILE_LIMIT + 1)
        if len(data) > DATA_FILE_LIMIT:
            raise FormatError(f"{path} unpacks to more than {DATA_FILE_LIMIT >> 30} GiB; it is not a dataset file")
        return data
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise FormatError(f"{path}: corrupt or truncated gzip data ({exc}); download the file again") from exc
    except OSError as exc:
        raise ClipQError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Decode one IDX file (MNIST format), gzipped or not, into a numpy array.

    Checks the magic number (two zero bytes, a type code, the number of dims),
    optionally that there are exactly ``ndim`` dimensions, and that the payload
    size matches the header. Any mismatch raises :class:`FormatError`.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise FormatError(f"{path}: file is {len(raw)} bytes, too short for an IDX header; download it again")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 + type code + ndim), "
            "not an MNIST-format file; replace it with the real IDX file"
        )
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    nd = raw[3]
    if ndim is not None and nd != ndim:
        raise FormatError(f"{path}: IDX file has {nd} dimensions, expected {ndim}; wrong file in this slot?")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise FormatError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header}); download it again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=nd, offset=4))
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise FormatError(
            f"{path}: IDX file {what}: {len(raw)} bytes, header dims {dims} need {expected}; download it again"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_file(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(name: str, root: Path, expected: str) -> ClipQError:
    how = _HOW_TO_GET.get(name, f"put {expected} in that folder")
    if not root.is_dir():
        return ClipQError(f"{name} data folder {root} does not exist (expected {expected} there); {how}")
    return ClipQError(f"{name} data incomplete in {root}: expected {expected}; {how}")


def read_mnist(root: str | os.PathLike[str], *, name: str = "mnist") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read the four MNIST-format IDX files in ``root`` (``.gz`` or raw).

    Returns uint8 images ``(N, 1, H, W)`` and int64 labels ``(N,)`` for train
    and test: ``(train_x, train_y, test_x, test_y)``.
    """
    root = Path(root)
    paths: dict[str, Path] = {}
    for key, fname in IDX_FILES.items():
        found = _find_file(root, fname)
        if found is None:
            expected = "the four IDX files " + ", ".join(f"{f}[.gz]" for f in IDX_FILES.values())
            raise _missing(name, root, expected)
        paths[key] = found
    out: list[Tensor] = []
    for split in ("train", "test"):
        img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(img_path, ndim=3)
        labels = read_idx(lab_path, ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise FormatError(f"{img_path}/{lab_path}: expected unsigned-byte IDX data (type code 0x08)")
        if images.shape[0] != labels.shape[0]:
            raise FormatError(
                f"{lab_path}: {labels.shape[0]} labels but {img_path} holds {images.shape[0]} images; "
                "the files come from different sets"
            )
        if images.shape[1] != images.shape[2]:
            raise FormatError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected square")
        if labels.size and int(labels.max()) >= 10:
            raise FormatError(f"{lab_path}: label {int(labels.max())} out of range 0..9; not an MNIST label file")
        out.append(torch.from_numpy(images).unsqueeze(1))
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return out[0], out[1], out[2], out[3]


def read_cifar10_batch(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Decode one CIFAR-10 binary batch: records of 1 label byte + 3072 CHW bytes.

    Returns uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise FormatError(
            f"{path}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records; "
            "truncated or not a CIFAR-10 binary batch"
        )
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if int(labels.max()) >= 10:
        raise FormatError(f"{path}: label {int(labels.max())} out of range 0..9; not a CIFAR-10 batch")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).copy()
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_cifar10(root: str | os.PathLike[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read the CIFAR-10 binary distribution from ``root`` or ``root/cifar-10-batches-bin``.

    Returns ``(train_x, train_y, test_x, test_y)``; images uint8 ``(N, 3, 32, 32)``.
    """
    root = Path(root)
    base = root / "cifar-10-batches-bin" if (root / "cifar-10-batches-bin").is_dir() else root
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    if not all((base / n).is_file() for n in names):
        expected = "data_batch_1.bin..data_batch_5.bin and test_batch.bin"
        how = "download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there"
        where = "does not exist" if not root.is_dir() else "lacks them"
        raise ClipQError(f"cifar10 needs {expected} in {root} (or its cifar-10-batches-bin/), but it {where}; {how}")
    parts = [read_cifar10_batch(base / n) for n in CIFAR10_TRAIN_FILES]
    test_x, test_y = read_cifar10_batch(base / CIFAR10_TEST_FILE)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), test_x, test_y


@functools.lru_cache(maxsize=4)
def _load_arrays(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decoded arrays per (dataset, folder), cached for the process: decoding is the slow part.

    Callers must not modify the returned tensors in place.
    """
    if name == "cifar10":
        return read_cifar10(root)
    return read_mnist(root, name=name)


# --------------------------------------------------------------------------- datasets


@runtime_checkable
class BatchSource(Protocol):
    """What training and evaluation consume: a sized dataset that yields ``(x, y)`` batches."""

    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]: ...


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid; use an integer >= 1")


class ArrayDataset:
    """Images held in memory as uint8, normalised per batch.

    ``images``: uint8 ``(N, C, H, W)``; ``labels``: int64 ``(N,)``; ``mean``/``std``:
    per-channel statistics of images scaled to [0, 1] (length C). Batches are
    float32 ``(B, C, H, W)``, ``(x / 255 - mean) / std``, and int64 ``(B,)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"ArrayDataset.images must be a uint8 tensor (N, C, H, W), got {got}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"ArrayDataset.labels must be an int64 tensor of shape ({images.shape[0]},), got {got}")
        channels = images.shape[1]
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean_t) != channels or len(std_t) != channels:
            raise ValueError(
                f"ArrayDataset mean/std have {len(mean_t)}/{len(std_t)} entries; expected one per channel ({channels})"
            )
        if any(not s > 0 for s in std_t):
            raise ValueError(f"ArrayDataset.std={std_t} must be > 0 in every channel")
        self.images = images
        self.labels = labels
        self.mean = mean_t
        self.std = std_t
        self._consts: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, shape={tuple(self.images.shape[1:])}, device={self.images.device})"

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy whose tensors live on ``device`` (e.g. keep a small dataset resident on the GPU)."""
        return ArrayDataset(self.images.to(device), self.labels.to(device), self.mean, self.std)

    def subset(self, indices: Tensor | Sequence[int] | np.ndarray) -> ArrayDataset:
        """A new dataset holding the items at ``indices`` (copied), same normalisation."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return ArrayDataset(self.images[idx], self.labels[idx], self.mean, self.std)

    def _normalize(self, x: Tensor) -> Tensor:
        # (x/255 - mean)/std as one fused multiply-add per channel; constants cached per device.
        consts = self._consts.get(x.device)
        if consts is None:
            scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=x.device).view(1, -1, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std, strict=True)], device=x.device)
            consts = self._consts[x.device] = (shift.view(1, -1, 1, 1), scale)
        return torch.addcmul(consts[0], x.float(), consts[1])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)``: float32 ``(B, C, H, W)`` normalised images, int64 ``(B,)`` labels.

        With ``shuffle`` the order is ``torch.randperm(N, generator=generator)``
        (drawn once per call), so a seeded generator gives a reproducible epoch.
        Indexing happens where the data lives: the order is moved there once per
        call, not per batch (each move to a GPU would wait for it); only the
        uint8 batch is moved to ``device``.
        """
        _check_batch_size(batch_size)
        n = len(self)
        order = None
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.images.device, non_blocking=True)
        stop = n - n % batch_size if drop_last else n
        target = torch.device(device) if device is not None else self.images.device
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                xb, yb = self.images[start:end], self.labels[start:end]
            else:
                idx = order[start:end]
                xb, yb = self.images[idx], self.labels[idx]
            xb = xb.to(target, non_blocking=True)
            yb = yb.to(target, non_blocking=True)
            yield self._normalize(xb), yb

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        _check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def to_state(self) -> dict[str, Any]:
        """Plain numpy arrays and numbers (no pickled objects): cheap to ship to Ray workers."""
        return {
            "kind": "array",
            "images": self.images.cpu().numpy(),
            "labels": self.labels.cpu().numpy(),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ArrayDataset:
        """Inverse of :meth:`to_state`. Shares memory with the arrays when possible."""
        images = np.asarray(state["images"])
        labels = np.asarray(state["labels"])
        # Arrays from Ray's object store are read-only; torch wants writable memory.
        if not images.flags.writeable:
            images = images.copy()
        if not labels.flags.writeable:
            labels = labels.copy()
        return cls(
            torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64, copy=False)), state["mean"], state["std"]
        )


def _import_torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:
        raise ClipQError(
            "this needs torchvision, which is not installed; "
            "pip install torchvision (or pip install 'clipq-search[vision]')"
        ) from exc
    return torchvision


def loader_workers(cpus: float | None = None) -> int:
    """Image-decoding processes for one training or evaluation process that may use ``cpus`` CPUs.

    One CPU is left to the process that trains (it also feeds the GPU); with a
    single CPU images are decoded in that process (0 workers). ``None``: the
    CPUs this process may run on, at most 8 workers.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, int(cpus) - 1))
    return max(0, math.floor(cpus + 1e-9) - 1)


def scan_image_folder(folder: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes (sorted sub-folder names, as torchvision's ``ImageFolder``), files and class of every image.

    Files are paths relative to ``folder`` as a numpy bytes array (one block of
    memory, cheap to ship to Ray workers and to share with loader processes);
    targets are int64. The only place an image folder is listed.
    """
    _import_torchvision()
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = os.path.expanduser(os.fspath(folder))
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise ClipQError(
            f"{root}: {exc}; put one sub-folder per class there, each holding images ({', '.join(IMG_EXTENSIONS)})"
        ) from None
    prefix = os.path.join(root, "")
    rel = [os.fsencode(path[len(prefix):] if path.startswith(prefix) else path) for path, _ in samples]
    files = np.array(rel, dtype=np.bytes_) if rel else np.array([], dtype="S1")
    targets = np.array([t for _, t in samples], dtype=np.int64)
    return list(classes), files, targets


class _ImageFiles(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``(image, class)`` items read from files with PIL and transformed (what the loader processes run)."""

    def __init__(self, root: str, files: np.ndarray, targets: np.ndarray, transform: Callable[[Any], Tensor]) -> None:
        self.root, self.files, self.targets, self.transform = root, files, targets, transform

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from torchvision.datasets.folder import default_loader

        image = default_loader(os.path.join(self.root, os.fsdecode(bytes(self.files[i]))))
        return self.transform(image), int(self.targets[i])


class FolderDataset:
    """An image-folder split (one sub-folder per class): its list of files, decoded by ``DataLoader`` workers.

    The folder is listed once (:func:`scan_image_folder`, or the ``files`` and
    ``targets`` given); its state is that list as numpy arrays, so a worker
    that rebuilds it reads no directory. ``num_workers`` loader processes
    decode images; they persist from one pass to the next (one loader per
    batch size and order). Batches are float32 ``(B, 3, S, S)`` with ImageNet
    normalisation, ``S = image_size``: a random resized crop and flip for
    training, a resize to ``S * 256 / 224`` and a centre crop otherwise.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        train: bool,
        files: np.ndarray | None = None,
        targets: np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        image_size: int = 224,
        num_workers: int | None = None,
    ) -> None:
        _import_torchvision()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size={image_size!r} is invalid; use an integer >= 1")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 0):
            raise ConfigError(f"num_workers={num_workers!r} is invalid; use an integer >= 0")
        self.folder = os.path.expanduser(os.fspath(folder))
        if files is None or targets is None or classes is None:
            classes, files, targets = scan_image_folder(self.folder)
        if files.shape != targets.shape:
            raise ValueError(f"FolderDataset: {files.shape[0]} files but {targets.shape[0]} targets")
        self.train = train
        self.files, self.targets, self.classes = files, targets, list(classes)
        self.image_size = image_size
        self.num_workers = loader_workers() if num_workers is None else num_workers
        self._loaders: dict[tuple[Any, ...], tuple[torch.Generator | None, torch.utils.data.DataLoader[Any]]] = {}

    def _transform(self) -> Callable[[Any], Tensor]:
        from torchvision import transforms as T

        mean, std = NORMALIZATION["imagefolder"]
        size = self.image_size
        if self.train:
            steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def __repr__(self) -> str:
        return f"FolderDataset({self.folder!r}, train={self.train}, n={len(self)}, image_size={self.image_size})"

    def subset(self, indices: Tensor | Sequence[int] | np.ndarray, *, train: bool | None = None) -> FolderDataset:
        """A new split of the items at ``indices`` (same folder and loader settings; ``train``: augment them)."""
        idx = np.asarray(torch.as_tensor(indices, dtype=torch.int64).cpu(), dtype=np.int64)
        return FolderDataset(
            self.folder,
            train=self.train if train is None else train,
            files=self.files[idx],
            targets=self.targets[idx],
            classes=self.classes,
            image_size=self.image_size,
            num_workers=self.num_workers,
        )

    def _loader(
        self, batch_size: int, shuffle: bool, generator: torch.Generator | None, drop_last: bool, pin: bool
    ) -> torch.utils.data.DataLoader[Any]:
        """The loader for these settings, made once: its worker processes stay up between passes."""
        key = (batch_size, shuffle, drop_last, pin)
        cached = self._loaders.get(key)
        if cached is not None and cached[0] is generator:
            return cached[1]
        loader = torch.utils.data.DataLoader(
            _ImageFiles(self.folder, self.files, self.targets, self._transform()),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
        )
        self._loaders[key] = (generator, loader)
        return loader

    def close(self) -> None:
        """Stop the loader processes (they also stop when this dataset is garbage-collected)."""
        self._loaders.clear()

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches on ``device`` (pinned memory, copied without blocking, for CUDA)."""
        _check_batch_size(batch_size)
        target = torch.device(device) if device is not None else torch.device("cpu")
        loader = self._loader(batch_size, shuffle, generator, drop_last, target.type == "cuda")
        for xb, yb in loader:
            yield xb.to(target, non_blocking=True), yb.to(target, non_blocking=True)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        _check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def to_state(self) -> dict[str, Any]:
        """Plain data: the folder, its file list and classes, the image size; no loader settings.

        How many processes decode images is decided where the data is used
        (``dataset_from_state(..., num_workers=...)``), from that worker's CPUs.
        """
        return {
            "kind": "folder",
            "folder": self.folder,
            "train": self.train,
            "files": self.files,
            "targets": self.targets,
            "classes": list(self.classes),
            "image_size": self.image_size,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, num_workers: int | None = None) -> FolderDataset:
        """Inverse of :meth:`to_state`, without listing the folder again."""
        return cls(
            state["folder"],
            train=bool(state["train"]),
            files=np.asarray(state["files"]),
            targets=np.asarray(state["targets"], dtype=np.int64),
            classes=[str(c) for c in state["classes"]],
            image_size=int(state["image_size"]),
            num_workers=num_workers,
        )


def dataset_from_state(state: dict[str, Any], *, num_workers: int | None = None) -> ArrayDataset | FolderDataset:
    """Rebuild an :class:`ArrayDataset` or :class:`FolderDataset` from its ``to_state()``.

    ``num_workers``: image-decoding processes of a folder dataset (see :func:`loader_workers`).
    """
    kind = state.get("kind", "array")
    if kind == "array":
        return ArrayDataset.from_state(state)
    if kind == "folder":
        return FolderDataset.from_state(state, num_workers=num_workers)
    raise FormatError(f"dataset state has kind={kind!r}; expected 'array' or 'folder'")


def num_batches(data: BatchSource | Iterable[Any], batch_size: int, *, drop_last: bool = False) -> int:
    """Batches per pass over ``data``: from ``data.num_batches`` or, for a ``DataLoader``, ``len(data)``."""
    if hasattr(data, "num_batches"):
        return int(data.num_batches(batch_size, drop_last=drop_last))
    return len(data)  # type: ignore[arg-type]  # a DataLoader: its own batch size applies


def iter_batches(
    data: BatchSource | Iterable[Any],
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``data`` as ``(x, y)`` batches on ``device``.

    ``data`` is anything with ``batches(...)`` (:class:`ArrayDataset`,
    :class:`FolderDataset`) or an iterable of ``(x, y)`` pairs such as a
    ``DataLoader``, whose own batch size and shuffling then apply.
    """
    if isinstance(data, BatchSource):
        yield from data.batches(batch_size, shuffle=shuffle, generator=generator, device=device, drop_last=drop_last)
        return
    for xb, yb in data:
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


# --------------------------------------------------------------------------- specs and splits


@dataclass(frozen=True)
class DatasetSpec:
    """Which dataset, where it lives, and how the validation split is drawn.

    ``val_size`` images are held out of the training set by a permutation
    seeded with ``split_seed``; 0 means no validation split. ``image_size``
    (image folders only) is the side of the square crops the model sees;
    None means 224.
    """

    name: str
    root: str | None = None
    val_size: int = 5000
    split_seed: int = 0
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ConfigError(f"DatasetSpec.name={self.name!r} is unknown; valid names: {', '.join(DATASET_NAMES)}")
        if self.root is None and self.name not in DEFAULT_ROOTS:
            raise ConfigError(f"DatasetSpec.root is required for {self.name!r}; pass the folder holding its files")
        if self.root is not None:
            if not isinstance(self.root, str | os.PathLike):
                raise ConfigError(f"DatasetSpec.root={self.root!r} is invalid; pass a folder path string")
            object.__setattr__(self, "root", os.fspath(self.root))  # keep the spec plain data
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise ConfigError(f"DatasetSpec.val_size={self.val_size!r} is invalid; use an integer >= 0")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise ConfigError(f"DatasetSpec.split_seed={self.split_seed!r} is invalid; use an integer >= 0")
        if self.image_size is not None:
            if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
                raise ConfigError(f"DatasetSpec.image_size={self.image_size!r} is invalid; use an integer >= 1")
            if self.name != "imagefolder":
                raise ConfigError(
                    f"DatasetSpec.image_size applies to image folders only; {self.name} images keep their own "
                    "size: remove image_size"
                )

    @property
    def crop_size(self) -> int:
        """The side of an image folder's crops: ``image_size``, or 224."""
        return self.image_size if self.image_size is not None else 224

    @property
    def resolved_root(self) -> str:
        """``root``, or the default folder for the dataset, with ``~`` expanded."""
        root = self.root if self.root is not None else DEFAULT_ROOTS[self.name]
        return str(Path(root).expanduser())


@dataclass
class DataSplits:
    """Train / validation / test splits plus the shape facts a model needs."""

    train: ArrayDataset | FolderDataset
    val: ArrayDataset | FolderDataset | None
    test: ArrayDataset | FolderDataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted ``(train_idx, val_idx)``: the first ``val_size`` of a seeded permutation of ``range(n)`` are val."""
    if val_size >= n:
        raise ConfigError(
            f"DatasetSpec.val_size={val_size} must be smaller than the training set ({n} images); "
            "hold out fewer images for validation"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, _ = torch.sort(perm[:val_size])
    train_idx, _ = torch.sort(perm[val_size:])
    return train_idx, val_idx


def load_dataset(spec: DatasetSpec) -> DataSplits:
    """Load ``spec``'s dataset and split it; decoded arrays are cached per process.

    Raises :class:`ClipQError` when the folder or files are missing and
    :class:`FormatError` when a file is malformed.
    """
    root = spec.resolved_root
    if spec.name == "imagefolder":
        return _load_imagefolder(spec, Path(root))
    train_x, train_y, test_x, test_y = _load_arrays(spec.name, root)
    mean, std = NORMALIZATION[spec.name]
    full = ArrayDataset(train_x, train_y, mean, std)
    test = ArrayDataset(test_x.clone(), test_y.clone(), mean, std)  # never hand out the cached tensors
    if spec.val_size == 0:
        if len(full) == 0:
            raise FormatError(f"{root}: the training set is empty")
        train, val = full.subset(torch.arange(len(full))), None
    else:
        train_idx, val_idx = split_indices(len(full), spec.val_size, spec.split_seed)
        train, val = full.subset(train_idx), full.subset(val_idx)
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=10,
        in_channels=int(train_x.shape[1]),
        image_size=int(train_x.shape[-1]),
        name=spec.name,
    )


def dataset_info(spec: DatasetSpec) -> dict[str, int]:
    """``num_classes``, ``in_channels`` and ``image_size`` of ``spec``'s dataset, checking its files.

    What a model needs to be built, without the cost of a full load where that
    is high: an image folder is only listed (its classes are its sub-folders);
    array datasets are decoded (cached per process, so a later load is free).
    Raises like :func:`load_dataset` on missing or malformed files.
    """
    if spec.name == "imagefolder":
        train_dir, _ = _imagefolder_dirs(Path(spec.resolved_root))
        classes = sum(1 for entry in os.scandir(train_dir) if entry.is_dir())
        if classes == 0:
            raise ClipQError(f"{train_dir} has no class sub-folders; put one sub-folder of images per class there")
        return {"num_classes": classes, "in_channels": 3, "image_size": spec.crop_size}
    splits = load_dataset(spec)
    return {"num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size}


def _imagefolder_dirs(root: Path) -> tuple[Path, Path]:
    """(train, val-or-test) folders of an image-folder dataset; one clear error when they are missing."""
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise ClipQError(
            f"imagefolder needs {root}/train/ and {root}/val/ (or test/), each with one sub-folder per class; "
            "arrange the images that way"
        )
    return train_dir, test_dir


def _load_imagefolder(spec: DatasetSpec, root: Path) -> DataSplits:
    """The splits of an image folder, each folder listed once; the validation split is held out of train/."""
    _import_torchvision()
    train_dir, test_dir = _imagefolder_dirs(root)
    size = spec.crop_size
    classes, files, targets = scan_image_folder(train_dir)
    full = FolderDataset(train_dir, train=True, files=files, targets=targets, classes=classes, image_size=size)
    if spec.val_size == 0:
        train: FolderDataset = full
        val: FolderDataset | None = None
    else:
        train_idx, val_idx = split_indices(len(full), spec.val_size, spec.split_seed)
        train = full.subset(train_idx)
        val = full.subset(val_idx, train=False)
    test = FolderDataset(test_dir, train=False, image_size=size)
    if test.classes != classes:
        raise FormatError(
            f"{test_dir} has classes {test.classes[:5]}... but {train_dir} has {classes[:5]}...; "
            "use the same class sub-folders in both"
        )
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        in_channels=3,
        image_size=size,
        name=spec.name,
    )
