"""Frozen share of hidden units per model: how much of each model pleas_fx can merge.

For every torchvision classifier (torchvision.models.list_models) and a list of timm models,
build the model with random weights (nothing is downloaded), infer its permutation groups on a
64x64 input (224x224 where the model needs it) and print the share of hidden units frozen and
the reason that froze most. --json writes the records.

    python tools/frozen_shares.py                         # both sources, ~10 min on 2 cores
    python tools/frozen_shares.py --source timm --json shares.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

from pleas_fx.apps.checkpoints import build_model
from pleas_fx.inspection import describe_groups

TIMM_MODELS = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002", "dla34",
    "densenet121", "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_lite0", "efficientnetv2_rw_t",
    "mobilenetv2_100", "mobilenetv3_small_100", "tf_mobilenetv3_small_100", "mnasnet_100", "mixnet_s",
    "rexnet_100", "ghostnet_100", "hrnet_w18_small", "cspresnet50", "cspdarknet53", "dpn68", "res2net50_14w_8s",
    "selecsls42b", "tresnet_m", "nfnet_l0", "convnext_atto", "convnextv2_atto", "repvgg_a0", "vgg11_bn",
    "inception_v3", "xception41", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
    "maxvit_tiny_tf_224", "levit_128s", "poolformer_s12", "mobilevit_xxs",
]


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def measure(name: str, source: str) -> dict:
    t0 = time.perf_counter()
    record = {"model": name, "source": source}
    for size in (64, 224):
        try:
            kwargs = {"num_classes": 10}
            model = build_model(name, kwargs, source).eval()
            report = describe_groups(model, torch.randn(1, 3, size, size), name=name)
        except Exception as exc:  # a model that needs another input size, or cannot be traced
            record.update(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        hidden = report.mergeable_units + report.frozen_hidden_units
        top = max(report.frozen_by_reason.items(), key=lambda kv: kv[1], default=("", 0))
        record = {"model": name, "source": source, "input": size, "hidden_units": hidden,
                  "frozen_units": report.frozen_hidden_units,
                  "frozen_share": report.frozen_hidden_units / hidden if hidden else 0.0, "top_reason": top[0],
                  "seconds": round(time.perf_counter() - t0, 2)}
        break
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=["torchvision", "timm", "both"], default="both")
    p.add_argument("--models", nargs="*", help="only these models")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    jobs = []
    if args.source in ("torchvision", "both"):
        jobs += [(n, "torchvision") for n in torchvision_models()]
    if args.source in ("timm", "both"):
        jobs += [(n, "timm") for n in TIMM_MODELS]
    if args.models:
        jobs = [(n, s) for n, s in jobs if n in args.models]
    records = []
    for name, source in jobs:
        r = measure(name, source)
        records.append(r)
        if "error" in r and "frozen_share" not in r:
            print(f"{source:11s} {name:32s} error: {r['error']}", flush=True)
        else:
            print(f"{source:11s} {name:32s} {100 * r['frozen_share']:5.1f}% of {r['hidden_units']:6d} frozen "
                  f"({r['input']}px)  {r['top_reason']}", flush=True)
    for source in ("torchvision", "timm"):
        ok = [r for r in records if r["source"] == source and "frozen_share" in r]
        if ok:
            units = sum(r["hidden_units"] for r in ok)
            frozen = sum(r["frozen_units"] for r in ok)
            print(f"{source}: {len(ok)} models, {100 * frozen / max(units, 1):.1f}% of all hidden units frozen, "
                  f"median model {100 * sorted(r['frozen_share'] for r in ok)[len(ok) // 2]:.1f}%, "
                  f"{sum(r['frozen_share'] <= 0.10 for r in ok)} models with <= 10% frozen", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
