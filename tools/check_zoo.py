"""Check real architectures end to end: frozen share, soundness, self-merge, budget 2.

For each model (random weights, random BatchNorm statistics; nothing is downloaded) this runs
what a user's first merge relies on:
  frozen  share of hidden units frozen (describe_groups)
  check   every inferred group permuted at random leaves the output unchanged (--check)
  self    merge(A, permuted copy of A) at budget 1 against A (relative output error)
  ens@2   merge(A, B) at budget 2 against the ensemble (relative output error; "-" where a
          group is frozen: A's features are then kept there and budget 2 is not the ensemble)

    python tools/check_zoo.py                             # the default list, ~10 min on 2 cores
    python tools/check_zoo.py --models timm:dla34 torchvision:resnext50_32x4d --size 64
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn as nn

import pleas_fx
from pleas_fx.apps.checkpoints import build_model
from pleas_fx.inspection import describe_groups
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import permute_model, random_permutations, relative_error

DEFAULT = [
    "timm:efficientnet_b0", "timm:mobilenetv3_small_100", "timm:regnetx_002", "timm:tf_efficientnet_b0",
    "timm:mixnet_s", "timm:rexnet_100", "timm:resnet50d", "timm:dla34", "timm:resnext26ts",
    "torchvision:resnext50_32x4d", "torchvision:regnet_x_400mf", "torchvision:regnet_y_400mf",
    "torchvision:shufflenet_v2_x1_0",
]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters: the default state is nearly the
    identity, which would hide errors in folding and mapping."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                    m.running_var.copy_(0.3 + 1.7 * torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(n, generator=gen))
    return model


def check(spec_name: str, size: int) -> dict:
    source, name = spec_name.split(":", 1)
    t0 = time.perf_counter()

    def make(seed):
        torch.manual_seed(seed)
        return randomize_norms(build_model(name, {"num_classes": 10}, source).eval(), seed)

    a, b = make(0), make(1)
    x = torch.randn(2, 3, size, size)
    data = [torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = describe_groups(a, x, name=name, check=True)
    hidden = report.mergeable_units + report.frozen_hidden_units
    gm = trace_model(a, "model")
    propagate_shapes(gm, (x,))
    permuted = permute_model(gm, (spec := infer_groups(gm)), random_permutations(spec, 1))
    with torch.no_grad():
        ref = a(x)
        self_err = relative_error(pleas_fx.merge(a, permuted, x, 1.0, data, progress=False)(x), ref)
        merged = pleas_fx.merge(a, b, x, 2.0, data, progress=False)
        frozen = merged.meta["pleas_fx"]["frozen_hidden"]["frozen_units"]
        ens = relative_error(merged(x), 0.5 * (ref + b(x))) if frozen == 0 else None
    return {"model": spec_name, "frozen": report.frozen_hidden_units / hidden if hidden else 0.0,
            "check": bool(report.check.passed), "self": self_err, "ens2": ens, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT, help="source:name (timm or torchvision)")
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"{'model':40s} {'frozen':>7s} {'check':>6s} {'self':>9s} {'ens@2':>9s} {'s':>6s}")
    failed = 0
    for spec_name in args.models:
        try:
            r = check(spec_name, args.size)
        except Exception as exc:  # report and go on: one model's failure is a line, not the end
            print(f"{spec_name:40s} error: {type(exc).__name__}: {' '.join(str(exc).split())[:150]}", flush=True)
            failed += 1
            continue
        ens = "-" if r["ens2"] is None else f"{r['ens2']:.1e}"
        ok = r["check"] and r["self"] < 1e-4 and (r["ens2"] is None or r["ens2"] < 1e-4)
        failed += not ok
        print(f"{r['model']:40s} {100 * r['frozen']:6.1f}% {str(r['check']):>6s} {r['self']:9.1e} {ens:>9s} "
              f"{r['seconds']:6.1f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
