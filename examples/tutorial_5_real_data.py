"""
Real data: MNIST / CIFAR-10 files (built here on a digits stand-in)
===================================================================

A small convolutional continuous DEQ on MNIST or CIFAR-10, read from the original files with
plain numpy (``examples/real_data.py``): no torchvision needed unless you ask it to download.
The documentation build has no network and no data directory, so the run shown on this page
trains on scikit-learn's digits written in MNIST's file format (1,797 images of 8x8 pixels
upscaled to 28x28), not on MNIST; its accuracies are those of the digits.

Run it on your copy of the data::

    python examples/tutorial_5_real_data.py --dataset mnist --data-dir ~/data
    python examples/tutorial_5_real_data.py --dataset cifar10 --data-dir ~/data --download

``--data-dir`` may hold the original files or torchvision's layout (``MNIST/raw``,
``cifar-10-batches-py``). When no data directory is given, as in the documentation build
(which has no network), the tutorial writes scikit-learn's digits, upscaled to 28x28, as
MNIST IDX files into the output folder and reads them back through the same loader.
"""

# %%
# Settings
# --------
# Command-line flags (defaults from the environment, so the documentation build and the tests
# can set them): ``--quick`` (``CONTDEQ_TUTORIAL_QUICK=1``), ``--out-dir``
# (``CONTDEQ_TUTORIAL_OUT``), ``--quiet`` (``CONTDEQ_TUTORIAL_QUIET=1``) and
# ``--data-dir`` (``CONTDEQ_DATA_DIR``).

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from real_data import DATASETS, download, find_dataset, load_cifar10, load_mnist, write_idx
from torch import Tensor, nn

import contdeq

parser = argparse.ArgumentParser(description="A convolutional continuous DEQ on real images.")
parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
parser.add_argument("--data-dir", type=Path, default=os.environ.get("CONTDEQ_DATA_DIR"),
                    help="folder with the data set's files (default: digits as a stand-in)")
parser.add_argument("--download", action="store_true",
                    help="download the data set into --data-dir first (needs torchvision)")
parser.add_argument("--epochs", type=int, default=None)
parser.add_argument("--train-size", type=int, default=None, help="use the first N images")
parser.add_argument("--out-dir", type=Path,
                    default=Path(os.environ.get("CONTDEQ_TUTORIAL_OUT", "outputs/tutorials")))
parser.add_argument("--quick", action="store_true",
                    default=os.environ.get("CONTDEQ_TUTORIAL_QUICK") == "1")
parser.add_argument("--quiet", action="store_true",
                    default=os.environ.get("CONTDEQ_TUTORIAL_QUIET") == "1")
args, _ = parser.parse_known_args()

OUT_DIR = args.out_dir / "real_data"
OUT_DIR.mkdir(parents=True, exist_ok=True)
EPOCHS = args.epochs or (1 if args.quick else 5)
TRAIN_SIZE = args.train_size or (64 if args.quick else 2048)
TEST_SIZE = 64 if args.quick else 1000
CHANNELS = 4 if args.quick else 8
BATCH_SIZE = 64
torch.manual_seed(0)


def log(message: str) -> None:
    """Print a progress line unless ``--quiet``."""
    if not args.quiet:
        print(message, flush=True)


# %%
# Getting the files
# -----------------
# With ``--download`` torchvision fetches the files; afterwards (and without torchvision) the
# numpy readers do the rest. Without a data directory we make an MNIST-format stand-in.


def digits_as_mnist(folder: Path) -> None:
    """Write scikit-learn's digits, upscaled to 28x28 ``uint8``, as MNIST IDX files."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))  # (N, 24, 24)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2))) * (255.0 / 16.0)  # (N, 28, 28)
    images, labels = images.astype(np.uint8), digits.target.astype(np.uint8)
    split = int(0.8 * len(images))
    for prefix, sl in (("train", slice(0, split)), ("t10k", slice(split, None))):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images[sl])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels[sl])


dataset = args.dataset
if args.data_dir is not None and args.download:
    download(dataset, args.data_dir)
if args.data_dir is not None:
    data_dir = args.data_dir
    if not find_dataset(data_dir, dataset):
        raise SystemExit(f"no {dataset} files in {data_dir}; pass --download to fetch them")
else:
    dataset = "mnist"
    data_dir = OUT_DIR / "digits-as-mnist"
    data_dir.mkdir(exist_ok=True)
    digits_as_mnist(data_dir)
    log(f"no --data-dir: wrote digits in MNIST format to {data_dir}")
source = f"{dataset} files" if args.data_dir is not None else "digits in MNIST format (stand-in)"
loader = load_mnist if dataset == "mnist" else load_cifar10
train_images, train_labels = loader(data_dir, train=True)
test_images, test_labels = loader(data_dir, train=False)
log(f"{dataset}: train {train_images.shape}, test {test_images.shape} (uint8)")


def to_tensors(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[Tensor, Tensor]:
    """First ``n`` images as ``(n, C, H, W)`` float32 in ``[0, 1]``, labels ``(n,)``."""
    x = torch.from_numpy(images[:n].astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels[:n])


x_train, y_train = to_tensors(train_images, train_labels, TRAIN_SIZE)
x_test, y_test = to_tensors(test_images, test_labels, TEST_SIZE)

# %%
# A convolutional DEQ
# -------------------
# A stride-2 convolution and a 2x2 average pool embed the image into ``(B, C, H/4, W/4)``;
# the cell is ``f(z, x) = tanh(conv(z) + x)``. A 3x3 convolution's operator norm is at most
# 3 times the spectral norm of its ``(out, in * 9)`` weight matrix, so capping that at
# ``0.9 / 3`` keeps ``f`` a contraction. A linear head classifies the flattened equilibrium.


class ConvCell(nn.Module):
    """``f(z, x) = tanh(conv(z) + x)``: ``z``, ``x`` ``(B, C, H, W)`` -> ``(B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv = contdeq.spectral_norm_cap(conv, cap=0.9 / 3)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


(in_channels, height, width), n_classes = DATASETS[dataset]
model = nn.Sequential(
    nn.Conv2d(in_channels, CHANNELS, 3, stride=2, padding=1),
    nn.AvgPool2d(2),
    contdeq.DEQ(ConvCell(CHANNELS), atol=1e-3, rtol=1e-3),
    nn.Flatten(),
    nn.Linear(CHANNELS * (height // 4) * (width // 4), n_classes),
)
deq = model[2]
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

# %%
# Training
# --------
# One progress line per epoch and every few batches.

history: dict[str, list[float]] = {"accuracy": [], "nfe": [], "loss": []}
n_batches = (len(x_train) + BATCH_SIZE - 1) // BATCH_SIZE
for epoch in range(EPOCHS):
    model.train()
    start = time.perf_counter()
    for i, idx in enumerate(torch.randperm(len(x_train)).split(BATCH_SIZE)):
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["loss"].append(float(loss.detach()))
        history["nfe"].append(deq.stats.forward.nfe)
        if (i + 1) % 8 == 0 or i + 1 == n_batches:
            log(f"epoch {epoch + 1}/{EPOCHS} batch {i + 1}/{n_batches}  "
                f"loss {history['loss'][-1]:.3f}  NFE {deq.stats.forward.nfe}  "
                f"{time.perf_counter() - start:.1f} s")
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(dim=1) == y_test).float().mean())
    history["accuracy"].append(acc)
    log(f"epoch {epoch + 1}/{EPOCHS}: test accuracy {acc:.3f}")

# %%
# Loss, NFE and accuracy
# ----------------------

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
axes[0].plot(history["loss"], ".-")  # markers: a quick build has only a few batches
axes[0].set_xlabel("batch")
axes[0].set_ylabel("training loss")
axes[1].plot(history["nfe"], ".-")
axes[1].set_xlabel("batch")
axes[1].set_ylabel("forward NFE")
axes[2].plot(range(1, EPOCHS + 1), history["accuracy"], "o-")
axes[2].set_xlabel("epoch")
axes[2].set_ylabel("test accuracy")
fig.suptitle(f"convolutional DEQ on {source} ({len(x_train)} training images, {EPOCHS} "
             f"epoch{'s' if EPOCHS > 1 else ''})")
fig.tight_layout()
fig.savefig(OUT_DIR / "training.png", dpi=100)
log(f"saved {OUT_DIR / 'training.png'}")
