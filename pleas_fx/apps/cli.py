"""The ``pleas-fx`` command.

    pleas-fx merge MODEL --a CKPT_A --b CKPT_B --data DATA --budget 1.5 [--budget 1.2 ...] --out DIR
    pleas-fx inspect ...   (pleas_fx/apps/inspect_command.py)
    pleas-fx demo ...      (pleas_fx/apps/demo.py)

``merge`` builds MODEL twice (a torchvision or timm model name, or ``package.module:factory``
called with ``--model-kwargs``), loads the two checkpoints into it, collects the statistics
once over DATA (an image folder, a tensor file, or ``generated`` for the data-free mode) and
writes one saved model per budget (loadable with ``pleas_fx.load``) and report.json into DIR;
with ``--eval DATA_WITH_LABELS`` also accuracy.png, accuracy against budget for the merged
models, both source models and their ensemble. Everything is written into a temporary folder
next to DIR and renamed at the end, so a failed run leaves nothing behind in DIR.

Bad input ends the command with exit status 1 (2 for malformed arguments) and one line on
stderr. Progress bars (tqdm) go to stderr, only when it is a terminal and without --quiet;
messages go through the logging module ("pleas_fx" logger); the final summary is printed.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from pleas_fx.apps.evaluation import EvaluationError, budget_dir, evaluate, plot_accuracy
from pleas_fx.apps.output import error, say
from pleas_fx.core.errors import one_line

log = logging.getLogger("pleas_fx")

PROG = "pleas-fx"


class UsageError(Exception):
    """Malformed command-line arguments (exit status 2)."""


class CliError(Exception):
    """Bad input found while running (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Merge two same-architecture networks with PLeaS (pleas_fx).")
    sub = parser.add_subparsers(dest="command", metavar="{merge,inspect,demo}")
    sub.add_parser("inspect", help="show the permutation groups of a model (pleas-fx inspect --help)", add_help=False)
    sub.add_parser("demo", help="train two digit classifiers and merge them (pleas-fx demo --help)", add_help=False)
    m = sub.add_parser(
        "merge", help="merge two checkpoints at one or more budgets",
        description="Merge two checkpoints of MODEL at one or more budgets; one statistics pass serves all budgets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m.add_argument("model", metavar="MODEL",
                   help="torchvision or timm model name, or package.module:factory (called with --model-kwargs)")
    m.add_argument("--a", required=True, metavar="CKPT_A", help="model A's state dict (.pt/.pth via torch.save, or .safetensors)")
    m.add_argument("--b", required=True, metavar="CKPT_B", help="model B's state dict")
    m.add_argument("--data", required=True, metavar="DATA",
                   help="calibration data: image folder (ImageFolder layout or flat), .pt/.npy/.npz tensor file, "
                        "or 'generated' (data-free)")
    m.add_argument("--budget", required=True, type=float, action="append", metavar="B",
                   help="merged size relative to one model, in [1, 2]; repeat for a sweep")
    m.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must not exist or be empty)")
    m.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for the model, as JSON")
    m.add_argument("--image-size", type=int, default=224, help="images are resized and centre-cropped to this size")
    m.add_argument("--channels", type=int, default=3, help="image channels (1: greyscale)")
    m.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean per channel (default: ImageNet)")
    m.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std per channel (default: ImageNet)")
    m.add_argument("--batch-size", type=int, default=32, help="batch size for images and tensor files")
    m.add_argument("--batches", type=int, default=None, metavar="N", help="use at most N batches of DATA (all by default; 8 generated)")
    m.add_argument("--matching", choices=("activation", "weight"), default=None,
                   help="feature matching (default: activation with data, weight when generated)")
    m.add_argument("--eval", default=None, metavar="DATA_WITH_LABELS",
                   help="labelled data (ImageFolder layout or a tensor file with labels) for accuracy.png")
    m.add_argument("--eval-batches", type=int, default=None, metavar="N", help="evaluate on at most N batches")
    m.add_argument("--emit", choices=("compact", "dense"), default="compact",
                   help="compact (default): block layers store only the structural blocks, so the saved model "
                        "stores the budget's parameters; dense: the source's layer types, zero blocks stored")
    m.add_argument("--distill", type=int, default=0, metavar="EPOCHS",
                   help="epochs of distillation towards the ensemble on the calibration data after the merge "
                        "(0, the default: off; each costs about three forward passes over DATA)")
    m.add_argument("--no-mixup", action="store_true",
                   help="data-limited layers (fewer than 2 calibration rows per merged input entry, e.g. a Linear "
                        "layer on flattened features) read the leading samples only, no mixup copies")
    m.add_argument("--device", default="cpu", help="torch device for the merge")
    m.add_argument("--seed", type=int, default=0, help="seed for data order and generated data")
    m.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    m.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    m.add_argument("--verbose", "-v", action="store_true", help="debug messages")
    m.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# subcommands run by their own module's main(argv, prog=...)
SUBCOMMANDS = {"inspect": "pleas_fx.apps.inspect_command", "demo": "pleas_fx.apps.demo"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pleas-fx`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        try:
            sub_main = importlib.import_module(SUBCOMMANDS[argv[0]]).main
        except ImportError as exc:
            error(f"{PROG}: error: {argv[0]!r} is not available: {one_line(exc)}")
            return 1
        code = getattr(sub_main, "__code__", None)
        takes_prog = code is not None and "prog" in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        status = sub_main(argv[1:], prog=f"{PROG} {argv[0]}") if takes_prog else sub_main(argv[1:])
        return int(status or 0)
    try:
        args = _parser().parse_args(argv)
        if args.command != "merge":
            raise UsageError(f"choose a command: merge, inspect or demo (see {PROG} --help)")
    except UsageError as exc:
        error(f"{PROG}: error: {exc}")
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        return _merge_command(args, argv)
    except UsageError as exc:
        error(f"{PROG} merge: error: {exc}")
        return 2
    except KeyboardInterrupt:
        error(f"{PROG}: interrupted; nothing was written to {args.out}")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from pleas_fx.core.errors import PleasError

        known = isinstance(exc, (CliError, EvaluationError, PleasError, OSError, ValueError))
        prefix = "" if known else f"internal error ({type(exc).__name__}, rerun with --debug for the traceback): "
        error(f"{PROG} merge: error: {prefix}{one_line(exc)}")
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


# ------------------------------------------------------------------------------ merge
def _validate(args) -> tuple[list[float], dict, Path]:
    budgets = list(args.budget)
    for b in budgets:
        if not math.isfinite(b) or not 1.0 <= b <= 2.0:
            raise UsageError(f"budget {b:g} is outside [1, 2] (1: the size of one model, 2: both models whole)")
    names = [budget_dir(b) for b in budgets]
    if len(set(names)) != len(names):
        raise UsageError(f"budget {next(b for b, n in zip(budgets, names) if names.count(n) > 1):g} is given twice")
    for opt in ("image_size", "channels", "batch_size", "batches", "eval_batches"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise UsageError(f"--{opt.replace('_', '-')} must be at least 1, got {value}")
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CliError(f"--out {out} exists and is not empty (use --force to replace it)")
    for label, path in (("--a", args.a), ("--b", args.b)):
        if not Path(path).is_file():
            raise CliError(f"checkpoint {label} not found: {path}")
    if args.data != "generated" and not Path(args.data).exists():
        raise CliError(f"--data not found: {args.data}")
    if args.eval is not None and not Path(args.eval).exists():
        raise CliError(f"--eval data not found: {args.eval}")
    return budgets, kwargs, out


def _progress_enabled(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _init_distributed(device) -> None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group, so that the
    statistics pass is sharded across the processes (gloo on the CPU, NCCL on GPUs)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("statistics sharded across %d processes (this is rank %d)", dist.get_world_size(), dist.get_rank())


def distributed_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _merge_command(args, argv: list[str]) -> int:
    t_start = time.perf_counter()
    budgets, model_kwargs, out = _validate(args)

    import torch

    import pleas_fx
    from pleas_fx.apps.checkpoints import build_model, load_checkpoint
    from pleas_fx.apps.datasets import open_data
    import pleas_fx.io
    from pleas_fx.io import make_temp_dir, publish_dir

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available")
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    _init_distributed(device)

    t = time.perf_counter()
    model_a = build_model(args.model, model_kwargs)
    model_b = copy.deepcopy(model_a)
    load_checkpoint(model_a, args.a, label="checkpoint --a", model_name=args.model)
    load_checkpoint(model_b, args.b, label="checkpoint --b", model_name=args.model)
    model_a.to(device).eval()
    model_b.to(device).eval()
    timings["load_models"] = time.perf_counter() - t

    t = time.perf_counter()
    data_opts = dict(image_size=args.image_size, channels=args.channels, mean=args.mean, std=args.std)
    if args.data == "generated":
        if args.mean is not None or args.std is not None:
            log.info("--mean/--std do not apply to generated data")
        source = None
        example = torch.zeros(2, args.channels, args.image_size, args.image_size)
        calibration = None
        data_desc = f"generated ({args.batches or 8} batches of 32 inputs shaped {tuple(example.shape[1:])})"
    else:
        source = open_data(args.data, **data_opts).shuffled(args.seed)
        calibration = source.batches(args.batch_size, args.batches)
        example = source.inputs_at(source.order[:2])
        data_desc = f"{source.description}, {len(calibration)} batches of up to {args.batch_size}"
    example = example.to(device)
    eval_source = open_data(args.eval, **data_opts) if args.eval is not None else None
    if eval_source is not None and not eval_source.has_labels:
        raise CliError(f"--eval {args.eval} has no labels (use the ImageFolder layout, or a tensor file with labels)")
    with torch.no_grad():
        try:
            out_a = model_a(example)
        except Exception as exc:
            raise CliError(f"model {args.model} fails on the data's inputs of shape {tuple(example.shape)}: "
                           f"{one_line(exc)}") from exc
    if eval_source is not None and not (torch.is_tensor(out_a) and out_a.dim() == 2):
        raise CliError(f"--eval needs a model that returns one (batch, classes) logits tensor; {args.model} returns "
                       f"{tuple(out_a.shape) if torch.is_tensor(out_a) else type(out_a).__name__}")
    timings["load_data"] = time.perf_counter() - t
    log.info("merging %s at budget%s %s with data: %s", args.model, "s" if len(budgets) > 1 else "",
             ", ".join(f"{b:g}" for b in budgets), data_desc)

    t = time.perf_counter()
    import pleas_fx.api  # noqa: F401  (the compiler's passes: imported outside the merge timing)

    timings["import"] = time.perf_counter() - t
    t = time.perf_counter()
    merged = pleas_fx.merge(
        model_a, model_b, example, list(budgets), data=calibration,
        matching=args.matching, max_batches=args.batches, progress=_progress_enabled(args), seed=args.seed,
        emit=args.emit, distill=args.distill, mixup=not args.no_mixup,
    )
    timings["merge"] = time.perf_counter() - t
    if distributed_rank() > 0:  # under torchrun every rank merges; rank 0 writes
        return 0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        t = time.perf_counter()
        for b, m in zip(budgets, merged):
            pleas_fx.io.save(m, tmp / budget_dir(b))
        timings["save"] = time.perf_counter() - t

        evaluation = None
        if eval_source is not None:
            t = time.perf_counter()
            evaluation = evaluate(model_a, model_b, budgets, merged, eval_source, args, device,
                                  progress=_progress_enabled(args))
            plot_accuracy(tmp / "accuracy.png", args.model, budgets, merged, evaluation)
            evaluation["plot"] = "accuracy.png"
            timings["evaluate"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start

        report = {
            "pleas_fx_version": getattr(pleas_fx, "__version__", None),
            "torch_version": torch.__version__,
            "command": [PROG, *argv],
            "model": args.model,
            "model_kwargs": model_kwargs,
            "checkpoints": {"a": str(args.a), "b": str(args.b)},
            "data": data_desc,
            "device": str(device),
            "budgets": budgets,
            "models": [
                {"budget": b, "path": budget_dir(b), **m.meta.get("pleas_fx", {})} for b, m in zip(budgets, merged)
            ],
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "evaluation": evaluation,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _summary(args, out, budgets, merged, timings, evaluation)
    return 0


def _distilled(report: dict) -> str:
    """One budget's distillation, in a few words (passes/distill.py's report)."""
    if "skipped" in report:
        return f"skipped ({report['skipped']})"
    change = f"{report['holdout_before']:.3g} -> {report['holdout_after']:.3g}"
    if report["kept_epoch"]:
        return f"{change} (epoch {report['kept_epoch']} of {report['epochs']})"
    return f"{change} (no epoch improved on it: the merged weights kept)"


def _summary(args, out: Path, budgets, merged, timings, evaluation) -> None:
    acc = {p["budget"]: p["accuracy"] for p in evaluation["accuracy"]["merged"]} if evaluation else {}
    lines = [f"merged {args.model} at {len(budgets)} budget{'s' if len(budgets) > 1 else ''} in "
             f"{timings['merge']:.1f} s (one statistics pass) -> {out}"]
    header = (f"  {'budget':>6}  {'achieved':>8}  {'parameters':>10}  {'stored':>10}" + (f"  {'accuracy':>8}" if acc else "")
              + "  folder")
    lines.append(header)
    for b, m in zip(budgets, merged):
        r = m.meta.get("pleas_fx", {})
        row = (f"  {b:>6g}  {r.get('achieved_budget', float('nan')):>8.3f}  {r.get('parameters', 0):>10}"
               f"  {r.get('stored_parameters', 0):>10}")
        if acc:
            row += f"  {acc[b]:>7.1f}%"
        lines.append(row + f"  {out / budget_dir(b)}")
    if evaluation:
        a = evaluation["accuracy"]
        lines.append(f"  model A {a['model_a']:.1f}%, model B {a['model_b']:.1f}%, ensemble {a['ensemble']:.1f}% "
                     f"on {evaluation['samples']} samples; plot: {out / 'accuracy.png'}")
    frozen = merged[0].meta.get("pleas_fx", {}).get("frozen_hidden", {}) if merged else {}
    if frozen.get("frozen_units"):
        reasons = ", ".join(sorted(frozen["by_reason"], key=lambda r: -frozen["by_reason"][r])[:2])
        lines.append(f"  frozen: {frozen['frozen_units']} of {frozen['hidden_units']} hidden units "
                     f"({100 * frozen['frozen_share']:.1f}%) could not be aligned ({reasons}); "
                     f"see `{PROG} inspect {args.model}`")
    distilled = [(b, m.meta.get("pleas_fx", {}).get("distill")) for b, m in zip(budgets, merged)]
    if any(d for _, d in distilled):
        lines.append("  distilled, held-out loss per budget: " + "; ".join(
            f"{b:g}: {_distilled(d)}" for b, d in distilled if d))
    lines.append(f"  report: {out / 'report.json'}")
    say(*lines)


if __name__ == "__main__":
    raise SystemExit(main())
