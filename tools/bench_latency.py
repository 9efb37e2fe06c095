"""Benchmark: what a merged model costs to serve. For each case, in one process and one run: the
CPU latency of one source model, of the ensemble (both models, outputs averaged), and of the
merged model at budgets 1.0, 1.2, 1.5 and 2.0: compact (the default emission: block layers
store only the structural blocks) with the budget counting parameters (the default) or
multiply-accumulates (budget_metric="flops"), and dense (merge(emit="dense"): the source's layer
types at the merged widths, zero blocks stored); with each model's stored parameters and
multiply-accumulates (torch's FlopCounterMode) relative to one source model.

Cases (random weights and calibration images: neither latency nor size depends on training):
- digits: the ResNet-20-style digit CNN of tools/bench_merge.py (three stages of three basic
  blocks, widths 32/64/128) on 1x28x28 inputs;
- resnet18, resnet50, mobilenet_v2: torchvision models at --size px (default 112);
- vit_b_16: torchvision's ViT-B/16 at 64 px (16 tokens + class token).

Latency: median over --repeats forward passes of a batch of --batch images after 3 warm-up
passes, under torch.inference_mode, with --threads intra-op threads (default 1); the models of a
case take turns, one pass each per round, so a shared machine's changing load affects all alike.

    nice -n 10 python tools/bench_latency.py --cases digits resnet18
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

BUDGETS = [1.0, 1.2, 1.5, 2.0]


def make_pair(case: str, size: int):
    """(model A, model B, one input of shape (1, C, H, W)) with random weights."""
    import torch
    import torch.nn as nn

    if case == "digits":
        from bench_merge import digit_resnet20  # tools/ is on sys.path when a tool runs

        return digit_resnet20(0), digit_resnet20(1), (1, 1, 28, 28)
    import torchvision

    kwargs = {"image_size": 64} if case == "vit_b_16" else {}

    def make(seed):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(case, weights=None, num_classes=100, **kwargs).eval()
        for m in model.modules():  # non-trivial BatchNorm state, as after training
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        return model

    return make(0), make(1), (1, 3, 64 if case == "vit_b_16" else size, 64 if case == "vit_b_16" else size)


def latencies(fns: list, x, repeats: int) -> list[float]:
    """Median seconds of each fn(x), after 3 warm-up calls each; the models take turns, one call
    each per round, so that a change of load on a shared machine affects all of them alike."""
    import torch

    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            for _ in range(3):
                fn(x)
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                fn(x)
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def macs(model, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def run_case(case: str, args) -> list[dict]:
    import torch

    import pleas_fx

    a, b, shape = make_pair(case, args.size)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, *shape[1:], generator=gen) for _ in range(2)]
    x = torch.randn(args.batch, *shape[1:], generator=gen)
    example = x[:2]
    t = time.perf_counter()
    merged = {}
    for variant in args.variants:
        emit, metric = variant.split("-")
        merged[f"{emit}, {metric} budget"] = pleas_fx.merge(a, b, example, BUDGETS, data, progress=False,
                                                            max_ls_dim=args.max_ls_dim, emit=emit, budget_metric=metric)
    merge_s = time.perf_counter() - t
    one_p = sum(p.numel() for p in a.parameters())
    one_m = macs(a, example)
    rows, fns = [], []

    def row(name, budget, model_fn, stored, mac):
        rows.append({"case": case, "model": name, "budget": budget, "stored": stored / one_p, "macs": mac / one_m})
        fns.append(model_fn)

    row("one model", 1.0, a, one_p, one_m)
    row("ensemble", 2.0, lambda v: 0.5 * (a(v) + b(v)), 2 * one_p, 2 * one_m)
    for emit, models in merged.items():
        for budget, m in zip(BUDGETS, models):
            row(f"merged ({emit})", budget, m, sum(p.numel() for p in m.parameters()), macs(m, example))
    for r, seconds in zip(rows, latencies(fns, x, args.repeats)):
        r["ms"], r["one_model_parameters"], r["merge_s"] = 1000 * seconds, one_p, round(merge_s, 1)
    return rows


def table(rows: list[dict], threads: int, batch: int) -> str:
    out = [f"CPU latency, batch {batch}, {threads} thread(s); stored parameters and MACs relative to one model",
           "", "| case | model | budget | stored / one | MACs / one | latency ms | latency / one |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(q["ms"] for q in rows if q["case"] == r["case"] and q["model"] == "one model")
        out.append(f"| {r['case']} | {r['model']} | {r['budget']:g} | {r['stored']:.3f} | {r['macs']:.3f} | "
                   f"{r['ms']:.2f} | {r['ms'] / base:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["digits", "resnet18"],
                   choices=["digits", "resnet18", "resnet50", "mobilenet_v2", "vit_b_16"])
    p.add_argument("--size", type=int, default=112, help="image size of the torchvision CNNs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-ls-dim", type=int, default=2000,
                   help="layers with a larger stacked input are mapped, not solved (the latency does not change)")
    p.add_argument("--variants", nargs="+", default=["compact-params", "compact-flops", "dense-params"],
                   choices=["compact-params", "compact-flops", "dense-params", "dense-flops"],
                   help="emission and budget metric of the merged models")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        rows += run_case(case, args)
        print(table([r for r in rows if r["case"] == case], args.threads, args.batch), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
