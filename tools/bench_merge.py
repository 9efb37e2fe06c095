"""Benchmark: how long a merge takes against the floor no merge can beat (one forward pass of
both source models over the same calibration data), and its peak memory.

Cases (random weights: the time does not depend on training):
- digits: a ResNet-20-style pair (three stages of three basic blocks, widths 32/64/128) on
  1,024 real MNIST digits (28x28), batches of 128;
- resnet18, resnet50: torchvision models at 224x224 on random images (resnet50: 512 images).

For each case, in a fresh process (so the peak RSS is its own): the forward floor, one merge at
budget 1.0 (seconds, ratio to the floor -- the lower of the floors timed before and after the
merges --, peak RSS), and a sweep of budgets 1.0, 1.33, 1.67 and 2.0
from one merge() call (seconds, ratio to the single merge). Ratios are given in wall time and in
process CPU time (steadier when other work shares the cores; the load average is printed). With
--procs 2 the merge also runs sharded across 2 processes (torchrun, gloo): its seconds are rank 0's.

    nice -n 10 python tools/bench_merge.py                          # digits and resnet18
    nice -n 10 python tools/bench_merge.py --cases resnet50 --procs 1 --no-sweep
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = {  # name -> (images, batch size, image size)
    "digits": (1024, 128, 28),
    "resnet18": (128, 32, 224),
    "resnet50": (512, 32, 224),
}
SWEEP = [1.0, 1.33, 1.67, 2.0]


def digit_resnet20(seed: int):
    """The ResNet-20-style digit classifier of the benchmarks (3 stages of 3 basic blocks,
    widths 32/64/128, 1-channel 28x28 inputs), random weights from `seed`."""
    import torch
    import torch.nn as nn

    from pleas_fx.apps import demo

    torch.manual_seed(seed)
    layers, cin = [nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()], 32
    for i, width in enumerate((32, 64, 128)):
        for j in range(3):
            layers.append(demo.BasicBlock(cin, width, stride=2 if i and not j else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


def make_pair(case: str):
    """The two models of a case and its calibration batches."""
    import torch

    if case == "digits":
        from pleas_fx.apps import demo

        make = digit_resnet20
        x = demo.load_digits_split()["x_train"][:CASES[case][0]]
        data = [x[i:i + CASES[case][1]] for i in range(0, len(x), CASES[case][1])]
    else:
        import torchvision

        def make(seed):
            torch.manual_seed(seed)
            return torchvision.models.get_model(case, weights=None, num_classes=100).eval()

        images, batch, size = CASES[case]
        gen = torch.Generator().manual_seed(2)
        data = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(images // batch)]
    return make(0), make(1), data


def run_case(case: str, sweep: bool) -> dict:
    import torch

    import pleas_fx
    from pleas_fx.passes.distributed import world

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 2)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    a, b, data = make_pair(case)

    def forward_floor() -> tuple[float, float]:
        with torch.no_grad():
            a(data[0][:2]), b(data[0][:2])  # warm-up
            start, cpu = time.perf_counter(), time.process_time()
            for x in data:
                a(x), b(x)
            return time.perf_counter() - start, time.process_time() - cpu

    floor, floor_cpu = forward_floor()
    start, cpu = time.perf_counter(), time.process_time()
    merged = pleas_fx.merge(a, b, data[0][:2], 1.0, data)
    one, one_cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {"case": case, "images": sum(len(x) for x in data), "floor_s": floor, "merge_s": one,
           "merge_cpu_s": one_cpu, "timings": merged.meta["pleas_fx"]["timings"], "procs": world()[1]}
    del merged
    if sweep:
        start, cpu = time.perf_counter(), time.process_time()
        pleas_fx.merge(a, b, data[0][:2], SWEEP, data)
        out["sweep_s"], out["sweep_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    again = forward_floor()  # before and after the merges: the lower (a busy machine only slows)
    out["floor_s"], out["floor_cpu_s"] = min(floor, again[0]), min(floor_cpu, again[1])
    out["load"] = os.getloadavg()[0]
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def _subprocess(case: str, procs: int, sweep: bool) -> dict | None:
    one = [__file__, "--one", case] + (["--sweep"] if sweep else [])
    cmd = [sys.executable, *one] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29533", *one]
    env = {**os.environ, "BENCH_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"{case} ({procs} process(es)) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["digits", "resnet18"], choices=sorted(CASES))
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2], help="process counts to run each case with")
    p.add_argument("--no-sweep", action="store_true", help="skip the 4-budget sweep (one merge per case)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        result = run_case(args.one, args.sweep)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return 0
    rows = [r for case in args.cases for procs in args.procs
            if (r := _subprocess(case, procs, sweep=procs == 1 and not args.no_sweep)) is not None]
    print("| case | processes | images | forward floor (s) | merge at 1.0 (s) | merge / floor | merge / floor (CPU) | "
          "statistics (s) | solves (s) | 4-budget sweep (s) | sweep / merge | sweep / merge (CPU) | peak RSS (GiB) | "
          "load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:  # CPU ratios: process CPU seconds (rank 0's), steadier than wall time on a shared machine
        t = r["timings"]
        sweep = (f"{r['sweep_s']:.1f} | {r['sweep_s'] / r['merge_s']:.2f}x | "
                 f"{r['sweep_cpu_s'] / r['merge_cpu_s']:.2f}x") if "sweep_s" in r else "- | - | -"
        print(f"| {r['case']} | {r['procs']} | {r['images']} | {r['floor_s']:.2f} | {r['merge_s']:.1f} | "
              f"{r['merge_s'] / r['floor_s']:.1f}x | {r['merge_cpu_s'] / r['floor_cpu_s']:.1f}x | "
              f"{t.get('statistics', 0):.1f} | {t.get('fill', 0):.1f} | {sweep} | {r['peak_rss_gib']:.2f} | "
              f"{r['load']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
