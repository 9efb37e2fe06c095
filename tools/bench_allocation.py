"""Benchmark: HiGHS width allocation against uniform allocation at equal budget.

1. Accuracy per budget on a real-data merge: the demo pair of pleas_fx.demo (two small ResNets
   trained on real MNIST digits 0-4 and 5-9, joint 10-way head), merged from one statistics pass
   at every budget with allocation="uniform" and allocation="highs" (cost proxy, and optionally
   the paper's leave-one-out proxy evaluated on held-out training digits, never the test set).
2. HiGHS solve time for torchvision resnet50's groups (random init, random pair costs: only the
   group structure and footprint matter for timing).

    python tools/bench_allocation.py                      # both parts
    python tools/bench_allocation.py --cache /tmp/pair.pt --loo
    python tools/bench_allocation.py --skip-accuracy      # resnet50 timing only
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trained_pair(epochs: int, width: int, cache: str | None):
    from pleas_fx.apps import demo

    if cache and os.path.exists(cache):
        state = torch.load(cache)
        if state.get("epochs") == epochs and state.get("width") == width:
            a, b = demo.DigitResNet(width), demo.DigitResNet(width)
            a.load_state_dict(state["a"])
            b.load_state_dict(state["b"])
            return a.eval(), b.eval(), demo.load_digits_split()
    a, b, data = demo.train_default_pair(epochs=epochs, width=width)
    if cache:
        torch.save({"a": a.state_dict(), "b": b.state_dict(), "epochs": epochs, "width": width}, cache)
    return a, b, data


def accuracy_table(args) -> str:
    import pleas_fx
    from pleas_fx.apps import demo

    model_a, model_b, data = trained_pair(args.epochs, args.width, args.cache)
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    calib = demo.calibration_batches(x_train, batch_size=100)
    # held-out digits for the leave-one-out proxy: training images, not the test set
    gen = torch.Generator().manual_seed(7)
    held = torch.randperm(x_train.shape[0], generator=gen)[: args.loo_images]
    x_val, y_val = x_train[held], y_train[held]

    columns = [("uniform", dict(allocation="uniform")), ("HiGHS (cost proxy)", dict(allocation="highs"))]
    if args.loo:
        columns.append(("HiGHS (loo proxy)", dict(allocation="highs", proxy="loo",
                                                   evaluate=lambda m: demo.accuracy(m, x_val, y_val))))
    results = {}
    for label, kw in columns:
        t0 = time.perf_counter()
        merged = pleas_fx.merge(model_a, model_b, x_train[:8], list(args.budgets), data=calib,
                                max_batches=args.max_batches, progress=False, **kw)
        secs = time.perf_counter() - t0
        results[label] = [(m.meta["pleas_fx"]["allocation"], demo.accuracy(m, x_test, y_test)) for m in merged]
        print(f"{label}: {secs:.1f} s for {len(args.budgets)} budgets", file=sys.stderr, flush=True)

    lines = [
        f"Test accuracy (%, 10 classes, {x_test.shape[0]} test digits) of the merged demo pair; "
        f"model A {demo.accuracy(model_a, x_test, y_test):.1f}, model B {demo.accuracy(model_b, x_test, y_test):.1f}, "
        f"ensemble {demo.ensemble_accuracy(model_a, model_b, x_test, y_test):.1f}. "
        "Cells: accuracy (achieved parameter budget).",
        "",
        "| budget | " + " | ".join(label for label, _ in columns) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for i, b in enumerate(args.budgets):
        cells = [f"{results[label][i][1]:.1f} ({results[label][i][0]['achieved_budget']:.3f})" for label, _ in columns]
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    widths = ["", "Widths chosen (group: width / size):", ""]
    for label, _ in columns:
        for i, b in enumerate(args.budgets):
            rep = results[label][i][0]
            widths.append(f"- {label} @ {b:g}: " + ", ".join(
                f"{g}: {w}/{rep['sizes'][g]}" for g, w in rep["widths"].items()))
    return "\n".join(lines + widths)


def resnet50_timing(args) -> str:
    import torchvision

    from pleas_fx.passes.allocate import allocate_widths, cost_losses
    from pleas_fx.passes.footprint import Footprint
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model

    torch.manual_seed(0)
    gm = trace_model(torchvision.models.resnet50(weights=None), "resnet50")
    x = torch.randn(1, 3, 224, 224)
    propagate_shapes(gm, (x,))
    spec = infer_groups(gm)
    names = [n for n, _ in gm.named_parameters()]
    rng = np.random.default_rng(0)
    losses = cost_losses(spec, {g.id: rng.gamma(2.0, 1.0, g.size) * (1 + 0.05 * i)
                                for i, g in enumerate(spec.mergeable())})
    lines = [
        f"HiGHS allocation for resnet50 ({len(spec.mergeable())} mergeable groups, random pair costs, "
        f"grid 1/8, time limit {args.time_limit:g} s, 1 thread):",
        "",
        "| metric | budget | MIP status | MIP columns / rows | MIP (s) | greedy units | total (s) | achieved |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for metric in ("params", "flops"):
        fp = Footprint(spec, names) if metric == "params" else Footprint.flops(gm, spec, names)
        for b in args.timing_budgets:
            t0 = time.perf_counter()
            widths, info = allocate_widths(spec, fp, losses, b, time_limit=args.time_limit)
            total = time.perf_counter() - t0
            lines.append(f"| {metric} | {b:g} | {info['mip_status']} | {info['mip_columns']} / {info['mip_rows']} | "
                         f"{info['mip_seconds']:.2f} | {info['greedy_steps']} | {total:.2f} | "
                         f"{fp.count(widths) / fp.base:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.5, 2.0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=20)
    p.add_argument("--cache", help="save / reuse the trained pair here")
    p.add_argument("--loo", action="store_true", help="also the leave-one-out proxy")
    p.add_argument("--loo-images", type=int, default=1000)
    p.add_argument("--timing-budgets", type=float, nargs="+", default=[1.1, 1.2, 1.5, 1.9])
    p.add_argument("--time-limit", type=float, default=10.0)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_accuracy:
        print(accuracy_table(args), flush=True)
        print()
    if not args.skip_timing:
        print(resnet50_timing(args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
