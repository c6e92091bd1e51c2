"""Train an MLP equilibrium classifier on scikit-learn's digits, with checkpoints and DDP.

Single process::

    python examples/train_digits.py --model skipdeq --epochs 5 --checkpoint run.pt
    python examples/train_digits.py --model skipdeq --epochs 5 --checkpoint run.pt --resume

Two processes on CPU (gloo), each taking half of every global batch::

    torchrun --nproc_per_node=2 examples/train_digits.py --model deq --epochs 5

The model is ``encoder -> layer -> dropout -> decoder`` where the layer is a continuous DEQ
(``deq``), a Skip DEQ with a linear predictor (``skipdeq``), a Skip-Reg DEQ (``skipregdeq``) or
the neural ODE baseline (``node``), all on the same ``f(z, x) = tanh(W z + x)`` with
``||W||_2 <= 0.9``. Checkpoints (``--checkpoint``) are written atomically at the end of every
epoch and every ``--checkpoint-every`` batches; ``--resume`` continues from one bit for bit
(deterministic algorithms are on, one thread per process): the per-epoch shuffle is seeded by
``(seed, epoch)`` and the RNG states, optimizer and scheduler are restored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import contdeq
from contdeq.checkpoint import load_checkpoint, save_checkpoint, unwrap_model

MODELS = ("deq", "skipdeq", "skipregdeq", "node")
#: Training samples (the rest of the 1797 digits are the test set); split seed fixed.
N_TRAIN = 1500


class Cell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with ``||W||_2 <= 0.9`` (fixed during each solve)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.W = contdeq.spectral_norm_cap(nn.Linear(width, width, bias=False), cap=0.9)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.W(z) + x)


class Classifier(nn.Module):
    """``(B, 64)`` pixel vectors -> ``(B, 10)`` logits through one implicit/ODE layer."""

    def __init__(self, kind: str, width: int, dropout: float) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, width)
        options = {"atol": 1e-3, "rtol": 1e-3, "max_steps": 100}
        cell = Cell(width)
        if kind == "deq":
            self.layer: nn.Module = contdeq.DEQ(cell, **options)
        elif kind == "skipdeq":
            self.layer = contdeq.SkipDEQ(cell, nn.Linear(width, width), **options)
        elif kind == "skipregdeq":
            self.layer = contdeq.SkipRegDEQ(cell, **options)
        else:
            self.layer = contdeq.NeuralODE(cell, t_end=1.0, rtol=1e-3, atol=1e-3)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.dropout(self.layer(self.encoder(x))))


@dataclass(frozen=True)
class Data:
    """Standardised digits: ``x_*`` ``(N, 64)`` float32, ``y_*`` ``(N,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data() -> Data:
    """The digits, shuffled once with a fixed seed and split 1500 / 297."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32)
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    mean, std = x[:N_TRAIN].mean(0), x[:N_TRAIN].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return Data(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The global batches of ``epoch`` (a shuffle seeded by ``(seed, epoch)``; the last
    incomplete batch is dropped so every rank runs the same number of steps)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return list(perm[: n - n % batch_size].split(batch_size))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="deq")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout before the decoder (each rank draws its own masks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (written atomically)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N batches (0: only at epoch ends)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    p.add_argument("--log-batches", action="store_true", help="print a line per batch")
    args = p.parse_args(argv)
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint")
    if args.epochs < 1 or args.batch_size < 1 or args.width < 1 or args.checkpoint_every < 0:
        p.error("--epochs, --batch-size and --width must be >= 1, --checkpoint-every >= 0")
    return args


def setup_distributed() -> tuple[int, int]:
    """``(rank, world_size)``; joins a gloo process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), world
    return 0, 1


def configure_determinism(seed: int) -> None:
    """Seeds, deterministic algorithms and one intra-op thread: bit-for-bit reruns on CPU."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def evaluate(model: nn.Module, data: Data) -> float:
    """Test accuracy in eval mode (on the unwrapped model: no DDP collectives, so one rank
    may call it alone)."""
    model = unwrap_model(model)
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    model.train()
    return accuracy


def train(args: argparse.Namespace) -> dict[str, Tensor]:
    """Run the training loop; returns the final ``state_dict``."""
    rank, world = setup_distributed()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by {world} ranks")
    configure_determinism(args.seed)
    data = load_data()
    model: nn.Module = Classifier(args.model, args.width, args.dropout)
    if world > 1:
        # Every parameter gets a gradient each step (the predictor's through the skip term
        # in contdeq.aux_loss), so find_unused_parameters can stay off.
        model = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = N_TRAIN // args.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs * steps_per_epoch)
    start_epoch = start_batch = 0
    if args.resume:
        position = load_checkpoint(args.checkpoint, model, optimizer, scheduler)
        start_epoch, start_batch = position.epoch, position.batch
    per_rank = args.batch_size // world
    for epoch in range(start_epoch, args.epochs):
        begin = time.perf_counter()
        batches = epoch_batches(N_TRAIN, args.batch_size, args.seed, epoch)
        total = 0.0
        # A progress bar on a terminal only (disable=None), never with --quiet or on rank > 0.
        for i in tqdm(range(start_batch if epoch == start_epoch else 0, len(batches)),
                      desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                      disable=True if args.quiet or rank else None):
            idx = batches[i][rank * per_rank:(rank + 1) * per_rank]
            logits = model(data.x_train[idx])
            loss = nn.functional.cross_entropy(logits, data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            (loss + contdeq.aux_loss(model)).backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
            if args.log_batches and rank == 0:
                print(f"epoch {epoch} batch {i + 1}/{len(batches)} loss {loss.item():.4f}",
                    flush=True)
            if args.checkpoint and args.checkpoint_every and (i + 1) % args.checkpoint_every == 0:
                checkpoint(args.checkpoint, model, optimizer, scheduler, epoch, i + 1, rank)
        if args.checkpoint:
            checkpoint(args.checkpoint, model, optimizer, scheduler, epoch + 1, 0, rank)
        if rank == 0 and not args.quiet:
            stats = unwrap_model(model).layer.stats
            nfe = "-" if stats is None else stats.forward.nfe
            print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(batches):.4f}, "
                  f"test accuracy {evaluate(model, data):.3f}, last forward NFE {nfe}, "
                  f"{time.perf_counter() - begin:.1f} s", flush=True)
    state = unwrap_model(model).state_dict()
    if rank == 0:
        print(f"done: {args.model}, {args.epochs} epochs, test accuracy "
              f"{evaluate(model, data):.3f}", flush=True)
    if world > 1:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    return state


def checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, batch: int,
               rank: int) -> None:
    """Rank 0 saves (every rank holds the same parameters); the others wait for it."""
    if rank == 0:
        save_checkpoint(path, model, optimizer, scheduler, epoch=epoch, batch=batch)
    if dist.is_initialized():
        dist.barrier()


def main(argv: Sequence[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
