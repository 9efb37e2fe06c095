"""Benchmark: wall time and peak memory of pleas_fx.merge on torchvision models.

Each case runs in a fresh subprocess (so peak RSS is its own) and is compared with the floor
no merge can beat: one forward pass of both source models over the same calibration data.

    python tools/bench_merge.py                       # resnet18 and resnet50, defaults below
    python tools/bench_merge.py --models resnet18 --image-size 64 --batches 4 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_case(model: str, image_size: int, batches: int, batch_size: int, budgets: list[float]) -> dict:
    import torch
    import torchvision

    import pleas_fx

    torch.manual_seed(0)
    model_a = torchvision.models.get_model(model, weights=None, num_classes=100).eval()
    torch.manual_seed(1)
    model_b = torchvision.models.get_model(model, weights=None, num_classes=100).eval()
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(batch_size, 3, image_size, image_size, generator=gen) for _ in range(batches)]

    with torch.no_grad():
        model_a(data[0][:2]), model_b(data[0][:2])  # warm-up
        start = time.perf_counter()
        for x in data:
            model_a(x), model_b(x)
        forward = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    merged = pleas_fx.merge(model_a, model_b, data[0][:2], budgets if len(budgets) > 1 else budgets[0],
                            data=data, progress=False)
    wall = time.perf_counter() - start
    merged = merged if isinstance(merged, list) else [merged]
    report = merged[0].meta["pleas_fx"]
    return {
        "model": model, "image_size": image_size, "images": batches * batch_size, "budgets": budgets,
        "merge_s": wall, "forward_both_s": forward, "ratio": wall / forward,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_merge_gib": rss_before,
        "timings_first_budget": report["timings"],
        "achieved": [m.meta["pleas_fx"]["achieved_budget"] for m in merged],
        "ls_nodes": report["statistics"]["least_squares_nodes"], "notes": report["notes"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.2])
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.image_size, args.batches, args.batch_size, args.budgets)))
        return 0
    rows = []
    for model in args.models:
        cmd = [sys.executable, __file__, "--one", model, "--image-size", str(args.image_size),
               "--batches", str(args.batches), "--batch-size", str(args.batch_size),
               "--budgets", *map(str, args.budgets)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{model}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nCPU merge benchmark ({rows[0]['images']} calibration images at {args.image_size}x{args.image_size}, "
          f"budgets {args.budgets})\n")
    print("| model | merge (s) | forward of both models (s) | merge / forward | peak RSS (GiB) | "
          "statistics (s) | fill (s) | least-squares nodes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings_first_budget"]
        print(f"| {r['model']} | {r['merge_s']:.1f} | {r['forward_both_s']:.2f} | {r['ratio']:.0f}x | "
              f"{r['peak_rss_gib']:.2f} | {t.get('statistics', 0):.1f} | {t.get('fill', 0):.1f} | {r['ls_nodes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
