"""Scoring merged models for ``pleas-fx merge --eval``: accuracy of both sources, their
ensemble and every merged model over the same labelled batches, and the accuracy-against-budget
plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class EvaluationError(Exception):
    """The labelled data does not fit the model (e.g. labels beyond its outputs)."""


def budget_dir(b: float) -> str:
    """The folder (and report key) of the merged model at budget ``b``."""
    return f"budget_{b:g}"


def evaluate(model_a, model_b, budgets, merged, source, args, device, *, progress: bool) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    batches = source.batches(args.batch_size, args.eval_batches, labels=True)
    correct = {"model_a": 0, "model_b": 0, "ensemble": 0, **{budget_dir(b): 0 for b in budgets}}
    total = 0
    with torch.no_grad():
        for x, y in tqdm(batches, desc="pleas_fx evaluate", unit="batch", disable=not progress):
            x, y = x.to(device), y.to(device)
            la, lb = model_a(x), model_b(x)
            if int(y.max()) >= la.shape[1] or int(y.min()) < 0:
                raise EvaluationError(f"--eval labels range over {int(y.min())}..{int(y.max())} but the model has "
                               f"{la.shape[1]} outputs")
            correct["model_a"] += int((la.argmax(1) == y).sum())
            correct["model_b"] += int((lb.argmax(1) == y).sum())
            correct["ensemble"] += int(((la + lb).argmax(1) == y).sum())
            for b, m in zip(budgets, merged):
                correct[budget_dir(b)] += int((m(x).argmax(1) == y).sum())
            total += int(y.numel())
    acc = {k: 100.0 * v / max(total, 1) for k, v in correct.items()}
    return {
        "data": source.description,
        "samples": total,
        "accuracy": {
            "model_a": acc["model_a"], "model_b": acc["model_b"], "ensemble": acc["ensemble"],
            "merged": [{"budget": b, "achieved_budget": m.meta.get("pleas_fx", {}).get("achieved_budget", b),
                        "accuracy": acc[budget_dir(b)]} for b, m in zip(budgets, merged)],
        },
    }


def plot_accuracy(path: Path, model_name: str, budgets, merged, evaluation: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    acc = evaluation["accuracy"]
    points = sorted((p["achieved_budget"], p["accuracy"], p["budget"]) for p in acc["merged"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="C3", lw=2, label="PLeaS merged")
        for x, y, b in points:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.axhline(acc["ensemble"], color="C2", ls="-", lw=1.5, label=f"ensemble, 2x ({acc['ensemble']:.1f})")
        ax.axhline(acc["model_a"], color="C0", ls="--", lw=1.5, label=f"model A, 1x ({acc['model_a']:.1f})")
        ax.axhline(acc["model_b"], color="C1", ls=":", lw=1.8, label=f"model B, 1x ({acc['model_b']:.1f})")
        ax.set_xlim(0.95, 2.05)
        lo = min([acc["model_a"], acc["model_b"], acc["ensemble"]] + [p[1] for p in points])
        hi = max([acc["model_a"], acc["model_b"], acc["ensemble"]] + [p[1] for p in points])
        ax.set_ylim(max(0.0, lo - 5), min(100.0, hi + 5) if hi + 5 > lo else lo + 10)
        ax.set_xlabel("parameters relative to one model (budget)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{model_name}: accuracy against budget ({evaluation['samples']} samples)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
