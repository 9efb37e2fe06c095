"""Distillation towards the ensemble (opt-in, `merge(..., distill=epochs)`), beyond the paper.

Least squares fits every layer to its own target, one layer at a time; what the merged network
loses is then the sum of errors no single layer can correct. This pass trains the filled merged
network end to end, label-free, on the calibration inputs: its outputs are pulled towards what
the budget-2 merge would output (the ensemble: both models' outputs averaged, or each model's
output for its own head with heads="separate"). An epoch costs one forward and one backward pass
of the merged model over the calibration data, so it is off by default (the whole merge costs a
few forward passes).

- The network stays in eval mode: BatchNorm uses the running statistics the fill wrote (a fixed
  affine map), dropout is off; only parameters train, never buffers.
- Entries that are exactly zero stay zero (their gradients are masked): the structurally zero
  blocks of weights kept dense, so the merge stores what its budget counts.
- A fifth of the calibration samples (at least one chunk) is held out (`split_holdout`), from the
  whole merge: the statistics, the least squares and any BatchNorm repair read only the other
  chunks, so the held-out loss measures the filled weights on samples they were not fitted to
  (a layer least squares fits to its rows closely, say a Linear layer with few rows per entry,
  looked better on its own rows than any trained epoch). It is measured before training and
  after every epoch; the parameters of the best epoch are kept, and the filled weights are
  restored when no epoch improves on them: the pass never leaves the merge worse on data it did
  not train on.
- A merge that already is the ensemble (budget 2, nothing frozen) or a copy of a source (a
  held-out loss of rounding size) is left as it is: Adam's normalised steps would otherwise
  move it by the learning rate.

Adam with a cosine-decayed learning rate, chunks of CHUNK samples in a shuffled order (seeded).
Every rank of a torchrun merge runs it on all calibration batches, so they agree.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pleas_fx.core.errors import InternalError, PleasError
from pleas_fx.core.progress import progress_bar
from pleas_fx.passes.positions import batch_samples, map_samples

CHUNK = 32  # samples per training step
HOLDOUT = 5  # one chunk in HOLDOUT is held out
NEGLIGIBLE = 1e-10  # a held-out loss (relative to the targets' mean square) this small: nothing to distil


def chunks(batches: Iterable[tuple], size: int = CHUNK) -> list[tuple]:
    """The calibration batches cut into argument tuples of at most `size` samples, as even as
    possible (100 samples: 25 each): every tensor whose leading size is the batch's sample count
    is sliced, anything else is passed whole."""
    out = []
    for args in batches:
        n = batch_samples(args)
        parts = max(1, math.ceil(n / size))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            out.append(map_samples(args, lambda v: v[lo:hi]))
    return out


def split_holdout(batches: Iterable[tuple]) -> tuple[list[tuple], list[tuple]]:
    """The calibration batches as chunks (`chunks`): (the chunks the merge fits and distillation
    trains on, every HOLDOUT-th chunk held out); nothing is held out from fewer than two chunks."""
    parts = chunks(batches)
    if len(parts) < 2:
        return parts, []
    return [p for i, p in enumerate(parts) if i % HOLDOUT], parts[::HOLDOUT]


def _outputs(value, where: str) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output, in order."""
    leaves = [v for v in tree_leaves(value) if torch.is_tensor(v) and v.is_floating_point()]
    if not leaves:
        raise PleasError(f"distill: {where} returns no floating-point tensor to distil towards")
    return leaves


@torch.no_grad()
def ensemble_targets(gm_a: fx.GraphModule, gm_b: fx.GraphModule, args: tuple, separate: bool) -> list[torch.Tensor]:
    """What the budget-2 merge outputs on `args`: each output tensor of A and B averaged, or with
    separate heads A's outputs followed by B's."""
    out_a, out_b = _outputs(gm_a(*args), "model A"), _outputs(gm_b(*args), "model B")
    if separate:
        return [t.detach() for t in out_a + out_b]
    return [0.5 * (ta + tb) for ta, tb in zip(out_a, out_b)]


class _Loss:
    """Mean squared error per output tensor, each divided by its targets' mean square (outputs of
    different scales weigh alike), summed over the output tensors."""

    def __init__(self, targets: list[list[torch.Tensor]]):
        n = len(targets[0])
        self.scale = [max(float(sum((t[k].double() ** 2).sum() for t in targets)
                                / max(sum(t[k].numel() for t in targets), 1)), 1e-30) for k in range(n)]

    def __call__(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(targets) or any(o.shape != t.shape for o, t in zip(outputs, targets)):
            raise InternalError("distill", "output", f"merged outputs {[tuple(o.shape) for o in outputs]} do not "
                                f"match the ensemble's {[tuple(t.shape) for t in targets]}")
        return sum(((o - t) ** 2).mean() / s for o, t, s in zip(outputs, targets, self.scale))


def distill(merged: fx.GraphModule, gm_a: fx.GraphModule, gm_b: fx.GraphModule, fit: list[tuple],
            held_out: list[tuple], epochs: int, lr: float, *, separate: bool = False, exact: bool = False,
            seed: int = 0, progress: bool | None = None) -> dict:
    """Train `merged` in place towards the ensemble's outputs on the chunks `fit`, keeping the
    epoch best on `held_out` (`split_holdout`; see the module docstring). Returns the report:
    held-out losses before and after, epochs run, the epoch kept (0: the filled weights), steps
    and seconds."""
    start = time.perf_counter()
    report = {"epochs": epochs, "lr": lr, "chunk": CHUNK, "kept_epoch": 0, "steps": 0}
    if exact:
        return {**report, "skipped": "the merge is the ensemble", "seconds": 0.0}
    if not held_out or not fit:
        return {**report, "skipped": "fewer than two calibration chunks (nothing to hold out)", "seconds": 0.0}
    parts = list(fit) + list(held_out)
    train = range(len(fit))
    held = range(len(fit), len(parts))
    merged.eval()
    targets = [ensemble_targets(gm_a, gm_b, args, separate) for args in parts]
    loss_fn = _Loss([targets[i] for i in train])

    def chunk_loss(k: int) -> torch.Tensor:
        return loss_fn(_outputs(merged(*parts[k]), "merged"), targets[k])

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(chunk_loss(i)) for i in held) / len(held)

    before = held_loss()
    report["holdout_before"] = before
    if not math.isfinite(before) or before <= NEGLIGIBLE:
        return {**report, "holdout_after": before, "skipped": "the merge already reproduces the ensemble",
                "seconds": time.perf_counter() - start}
    params = [p for p in merged.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    masks = {id(p): nonzero for p in params if not bool((nonzero := p != 0).all())}
    best, best_loss = copy.deepcopy(merged.state_dict()), before
    steps = epochs * len(train)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(True)
        for epoch in progress_bar(range(1, epochs + 1), progress, desc="distil", unit="epoch"):
            for i in torch.randperm(len(train), generator=gen).tolist():
                loss = chunk_loss(train[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p in params:
                    if p.grad is not None and id(p) in masks:
                        p.grad.mul_(masks[id(p)])
                opt.step()
                sched.step()
                report["steps"] += 1
            now = held_loss()
            if now < best_loss:
                best, best_loss, report["kept_epoch"] = copy.deepcopy(merged.state_dict()), now, epoch
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    merged.load_state_dict(best)
    merged.eval()
    report.update(holdout_after=best_loss, seconds=time.perf_counter() - start)
    return report
