"""Merge methods as choices over the same passes.

A method is (matching, weight solve, BatchNorm repair default):

| method          | matching                              | weights                       | repair |
|-----------------|---------------------------------------|-------------------------------|--------|
| pleas           | activation (weight without data)      | least squares (PLeaS)         | off    |
| average         | identity                              | mapped (average)              | on     |
| rebasin_weight  | weight (Git Re-Basin, data-free)      | mapped (average permuted)     | on     |
| permute         | activation (Git Re-Basin / "Permute") | mapped (average permuted)     | on     |
| zipit           | ZipIt! (within and across models)     | mapped (ZipIt! merge/unmerge) | on     |
| regmean         | identity                              | RegMean least squares         | on     |
| pleas_adam      | activation (weight without data)      | Adam on the PLeaS objective   | on     |

"mapped" is W = M_out blkdiag(W_A, W_B) U_in for every tensor (passes/fill.py). At a budget
above 1 every method keeps its worst-matched pairs apart (for ZipIt!: merges only the first
pairs of its greedy order), with widths from the same allocator as PLeaS. "repair" resets every
BatchNorm's running statistics on the calibration data after merging (REPAIR-style; Jordan et
al., ICLR 2023, reset variant).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.errors import PleasError
from pleas_fx.core.ir import GroupPlan, GroupSpec, Site
from pleas_fx.passes.matching import Matching, activation_matching, identity_matching, weight_matching, zipit_matching
from pleas_fx.passes.statistics import Statistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    matching: str  # "auto" (activation with data, weight without) | "activation" | "weight" | "identity" | "zipit"
    solve: str  # "least_squares" | "regmean" | "mapped" (passes/fill.py)
    repair: bool  # default of merge(repair=None)
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pleas", "auto", "least_squares", False, "PLeaS: permutations + least squares"),
    Method("average", "identity", "mapped", True, "plain weight averaging"),
    Method("rebasin_weight", "weight", "mapped", True, "Git Re-Basin weight matching, permuted weights averaged"),
    Method("permute", "activation", "mapped", True, "activation matching, permuted weights averaged"),
    Method("zipit", "zipit", "mapped", True, "ZipIt!: feature matching within and across models"),
    Method("regmean", "identity", "regmean", True, "RegMean: least squares without permutations"),
    Method("pleas_adam", "auto", "adam", True, "the official PLeaS code's recipe: the layer-wise objective "
                                              "minimised by 400 Adam steps from the permuted average"),
)}


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise PleasError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def resolve_matching(method: Method, matching: str | None, has_data: bool) -> str:
    """The matching a merge uses; `matching` (the user's override) is allowed for pleas only."""
    if method.matching == "auto":
        chosen = matching or ("activation" if has_data else "weight")
        if chosen not in ("activation", "weight"):
            raise PleasError(f"matching must be 'activation' or 'weight', got {chosen!r}")
        return chosen
    if matching is not None and matching != method.matching:
        raise PleasError(f"method={method.name!r} uses {method.matching} matching by definition; "
                         f"matching={matching!r} applies to method='pleas' only")
    return method.matching


def sites_to_measure(spec: GroupSpec, matching: str, has_data: bool) -> list[Site]:
    """The activation sites the statistics pass measures for this matching (none for weight
    matching, or identity matching without data)."""
    if matching in ("activation", "zipit") or (matching == "identity" and has_data):
        return [s for g in spec.mergeable() for s in g.sites]
    return []


def match(matching: str, spec: GroupSpec, stats: Statistics | None, gm_a: fx.GraphModule,
          gm_b: fx.GraphModule, seed: int = 0) -> Matching:
    if matching == "activation":
        return activation_matching(spec, stats, gm_a, gm_b)
    if matching == "weight":
        return weight_matching(spec, gm_a, gm_b, seed=seed)
    if matching == "identity":
        return identity_matching(spec, stats, gm_a, gm_b)
    if matching == "zipit":
        return zipit_matching(spec, stats)
    raise PleasError(f"unknown matching {matching!r}")


FROZEN_POLICIES = ("average", "model_a")


def plans_for(spec: GroupSpec, m: Matching, widths: dict[int, int], frozen: str = "model_a") -> dict[int, GroupPlan]:
    """Every mergeable group's plan at the given widths (2d - width merges each). `frozen`: what
    a hidden group frozen for a limitation gets: "average" (feature i of A with feature i of B,
    unaligned) or "model_a" (A's features; least squares downstream fits both models' targets).
    Structural frozen groups (inputs, outputs, ...) always average."""
    plans = {}
    if frozen == "model_a":
        for g in spec.groups.values():
            if g.frozen and g.parent is None and g.reasons and not any(r.structural for r in g.reasons):
                plans[g.id] = GroupPlan.identity(g.size, share_a=1.0)
    for g in spec.mergeable():
        merges = 2 * g.size - widths[g.id]
        if m.pairs is not None:
            plans[g.id] = GroupPlan.from_zip(g.size, m.pairs[g.id], merges)
        else:
            plans[g.id] = GroupPlan.from_matching(m.perm[g.id], m.pair_cost[g.id], merges)
            plans[g.id].within = m.within.get(g.id) or None
    return plans


@torch.no_grad()
def repair_batchnorm(model: nn.Module, batches: Iterable[tuple]) -> int:
    """Reset every BatchNorm's running statistics to exact averages over `batches` (argument
    tuples), one forward pass in train mode with cumulative averaging; weights are untouched.
    Returns the number of BatchNorm modules reset; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for args in batches:
            if int(args[0].shape[0]) < 2:
                continue  # train-mode BatchNorm needs two samples
            model(*args)
            seen += 1
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
    if seen == 0:
        raise PleasError("repair=True needs calibration batches of at least 2 samples")
    log.info("repair: reset %d BatchNorm(s) on %d batch(es)", len(norms), seen)
    return len(norms)
