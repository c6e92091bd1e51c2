"""Readers for MNIST (IDX files) and CIFAR-10 (python pickle batches) with numpy only.

torchvision is needed only to *download* the files (:func:`download`); reading them needs
numpy and the standard library, so the loaders work offline on files you already have. Both
the original file names and torchvision's folder layout are recognised:

* MNIST: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte`` (optionally ``.gz``), in ``data_dir`` or ``data_dir/MNIST/raw``.
* CIFAR-10: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` in
  ``data_dir/cifar-10-batches-py`` (or directly in ``data_dir``).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "download", "find_dataset", "load_cifar10", "load_mnist", "read_idx",
           "write_idx"]

#: Supported data sets: name -> (image shape ``(C, H, W)``, number of classes).
DATASETS = {"mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}

#: IDX type codes (third byte of the magic number) and the big-endian numpy dtypes they mean.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` is decompressed).

    The header is two zero bytes, a type code, the number of dimensions ``n`` and ``n``
    big-endian ``uint32`` sizes; the data follow in C order.

    Returns:
        An array of shape ``(d_1, ..., d_n)`` in the file's dtype (native byte order).

    Raises:
        ValueError: the file is not IDX, or its size does not match the header.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes), file has "
            f"{len(raw) - header} bytes of data"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (``uint8``, ``int8``, ``int16``, ``int32``, ``float32`` or ``float64``,
    any shape) as an IDX file; returns the path."""
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path = Path(path)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes())
    return path


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz", folder / "MNIST" / "raw" / name,
                      folder / "MNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist(data_dir: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images ``(N, 1, 28, 28)`` ``uint8`` and labels ``(N,)`` ``int64``.

    Raises:
        FileNotFoundError: the IDX files are not in ``data_dir`` (or ``data_dir/MNIST/raw``).
        ValueError: malformed files, or image and label counts differ.
    """
    folder = Path(data_dir)
    paths = [_find(folder, name) for name in _MNIST_FILES[train]]
    if paths[0] is None or paths[1] is None:
        raise FileNotFoundError(
            f"MNIST files {_MNIST_FILES[train]} not found in {folder} or {folder / 'MNIST/raw'}"
            " (pass --download to fetch them with torchvision)"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST images {images.shape} and labels {labels.shape} do not match")
    return images[:, None].astype(np.uint8), labels.astype(np.int64)


def load_cifar10(data_dir: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images ``(N, 3, 32, 32)`` ``uint8`` and labels ``(N,)`` ``int64``.

    Each batch file is a pickled dict with ``b"data"`` (``(n, 3072)`` ``uint8``, the red,
    green and blue planes of each 32x32 image) and ``b"labels"`` (``n`` ints).

    Raises:
        FileNotFoundError: a batch file is missing.
        ValueError: a batch has the wrong layout.
    """
    folder = Path(data_dir)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    images, labels = [], []
    for name in _CIFAR_FILES[train]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 batch {path} not found (pass --download to fetch it with torchvision)"
            )
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[b"labels"]) != len(data):
            raise ValueError(f"{path}: expected data (n, 3072) and n labels, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def find_dataset(data_dir: str | Path, dataset: str) -> bool:
    """Whether the training and test files of ``dataset`` are in ``data_dir``."""
    folder = Path(data_dir)
    if dataset == "mnist":
        names = (*_MNIST_FILES[True], *_MNIST_FILES[False])
        return all(_find(folder, name) is not None for name in names)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    return all((folder / name).is_file() for name in (*_CIFAR_FILES[True], *_CIFAR_FILES[False]))


def download(dataset: str, data_dir: str | Path) -> None:
    """Download ``dataset`` into ``data_dir`` with torchvision (needs network access)."""
    try:
        from torchvision import datasets
    except ImportError as exc:  # torchvision is optional: only this function needs it
        raise ImportError(
            "--download needs torchvision, from the index your torch came from: pip install "
            "torchvision --index-url https://download.pytorch.org/whl/cpu for a CPU torch (from "
            "PyPI it would replace a CPU torch with the CUDA build)") from exc
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[dataset]
    for train in (True, False):
        cls(str(data_dir), train=train, download=True)
