"""The tutorials run on their tiny settings, and the real-data readers read MNIST and CIFAR-10
files written here in the original formats (no network, no torchvision)."""

from __future__ import annotations

import gzip
import pickle
import runpy
import struct
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TUTORIALS = sorted(EXAMPLES.glob("tutorial_*.py"))
#: Figures each tutorial saves under ``$CONTDEQ_TUTORIAL_OUT``.
FIGURES = {
    "tutorial_1_steady_state.py": "steady_state/residual_vs_time.png",
    "tutorial_2_digits.py": "digits/deq_vs_node.png",
    "tutorial_3_skip_deq.py": "skip_deq/nfe_vs_epoch.png",
    "tutorial_4_solvers.py": "solvers/solvers_and_backward.png",
    "tutorial_5_real_data.py": "real_data/training.png",
    "tutorial_6_multiscale.py": "multiscale/comparison.png",
    "tutorial_7_jiio.py": "jiio/applications.png",
    "tutorial_8_robustness.py": "robustness/attacks.png",
}

sys.path.insert(0, str(EXAMPLES))
import real_data  # noqa: E402


def run_tutorial(path: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *args: str,
                 quiet: bool = True) -> dict[str, object]:
    """Run one tutorial as ``__main__`` on its quick setting; returns its globals."""
    monkeypatch.setenv("CONTDEQ_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("CONTDEQ_TUTORIAL_OUT", str(out))
    monkeypatch.setenv("CONTDEQ_TUTORIAL_QUIET", "1" if quiet else "0")
    monkeypatch.delenv("CONTDEQ_DATA_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    try:
        return runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")


def test_every_tutorial_is_listed() -> None:
    assert sorted(p.name for p in TUTORIALS) == sorted(FIGURES)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_and_saves_its_figure(path: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_tutorial(path, tmp_path, monkeypatch)
    figure = tmp_path / FIGURES[path.name]
    assert figure.is_file() and figure.stat().st_size > 1000


def test_progress_lines_can_be_silenced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES / "tutorial_1_steady_state.py"
    run_tutorial(path, tmp_path, monkeypatch, quiet=False)
    assert "NFE" in capsys.readouterr().out
    run_tutorial(path, tmp_path, monkeypatch, quiet=True)
    assert capsys.readouterr().out == ""


# -- files in the original formats, written independently of real_data.write_idx ----------


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a ``uint8`` array: magic ``00 00 08 ndim``, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 6, compress: bool = False
                ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def write_cifar10(folder: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    """Six pickled batches as in ``cifar-10-python.tar.gz``: ``b"data"`` ``(n, 3072)``."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with (folder / name).open("wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                         b"filenames": [b"x.png"] * per_batch}, fh)
        batches[name] = data
    return batches


@pytest.mark.parametrize("layout", ["flat", "gzip", "torchvision"])
def test_load_mnist(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = write_mnist(folder, compress=layout == "gzip")
    assert real_data.find_dataset(tmp_path, "mnist")
    images, labels = real_data.load_mnist(tmp_path, train=True)
    assert images.shape == (12, 1, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (12,) and labels.dtype == np.int64
    np.testing.assert_array_equal(images[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])
    test_images, _ = real_data.load_mnist(tmp_path, train=False)
    np.testing.assert_array_equal(test_images[:, 0], arrays["t10k-images-idx3-ubyte"])


def test_load_cifar10(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    assert real_data.find_dataset(tmp_path, "cifar10")
    images, labels = real_data.load_cifar10(tmp_path, train=True)
    assert images.shape == (15, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (15,) and labels.dtype == np.int64
    # channel planes: the first 1024 bytes of a row are the red plane of that image
    np.testing.assert_array_equal(images[0, 0].ravel(), batches["data_batch_1"][0, :1024])
    np.testing.assert_array_equal(images[3, 2].ravel(), batches["data_batch_2"][0, 2048:])
    test_images, _ = real_data.load_cifar10(tmp_path, train=False)
    assert test_images.shape == (3, 3, 32, 32)


def test_read_idx_round_trip_and_errors(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    np.testing.assert_array_equal(real_data.read_idx(real_data.write_idx(tmp_path / "a", array)),
                                  array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        real_data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((2, 2), np.uint8))[:-1])
    with pytest.raises(ValueError, match="header says"):
        real_data.read_idx(tmp_path / "short")


def test_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    assert not real_data.find_dataset(tmp_path, "mnist")
    assert not real_data.find_dataset(tmp_path, "cifar10")
    with pytest.raises(FileNotFoundError, match="--download"):
        real_data.load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="--download"):
        real_data.load_cifar10(tmp_path)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_real_data_tutorial_on_a_data_dir(dataset: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    if dataset == "mnist":
        write_mnist(data)
    else:
        write_cifar10(data / "cifar-10-batches-py")
    out = tmp_path / "out"
    result = run_tutorial(EXAMPLES / "tutorial_5_real_data.py", out, monkeypatch,
                          "--dataset", dataset, "--data-dir", str(data))
    assert result["dataset"] == dataset
    assert (out / FIGURES["tutorial_5_real_data.py"]).is_file()
