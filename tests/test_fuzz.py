"""Random networks through every check of the fuzzing campaign (the package tools/fuzz/).

Each net (MLPs, 1-D and 2-D CNNs, token transformers, nets with ops pleas_fx cannot know) is
drawn by hypothesis through the campaign's own generator, and run_net checks: the permuted copy
computes the same function (group soundness), self-merge is the identity, every budget gives
finite outputs, budget 2 is the ensemble where that is expected, the inputs are not modified,
and a second merge is identical. A net passes when its outcome is "ok" or "refused" (a
documented PleasError at the front door, e.g. an untraceable net); "internal" (an unexpected
exception) and "wrong" (a failed check) fail the test.

Two kinds of test:
  * test_fuzz_category: the full generator, ~25 nets over the categories.
  * test_fixed_bug_stays_fixed: the campaign seeds that reproduced each bug found so far.

Deterministic (derandomize=True, no database). PLEAS_TEST_EXPLORE=N draws N times as many nets
at random.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from fuzz.checks import failures, run_net  # noqa: E402
from fuzz.configs import CATEGORIES, HypothesisDraw, draw_config  # noqa: E402

EXPLORE = int(os.environ.get("PLEAS_TEST_EXPLORE", "0") or 0)
BUDGETS = (1.0, 1.5, 2.0)


def _settings(n: int) -> settings:
    phases = [Phase.explicit, Phase.generate, Phase.shrink]
    return settings(max_examples=n * EXPLORE if EXPLORE else n, derandomize=not EXPLORE, deadline=None,
                    database=None, phases=phases, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_passes(rec) -> None:
    assert rec["outcome"] in ("ok", "refused"), (
        f"{rec['outcome']}:\n" + "\n".join(failures(rec)) + "\nconfig: " + json.dumps(rec["config"]))


def _run(data, seed: int, category: str):
    torch.set_num_threads(1)
    cfg = draw_config(category, HypothesisDraw(data))
    rec = run_net(seed, category, BUDGETS, cfg=cfg)
    assert rec["outcome"] != "invalid", failures(rec)  # a generator bug
    return rec


@pytest.mark.parametrize("category", CATEGORIES)
@_settings(5)
@given(data=st.data(), seed=st.integers(0, 10_000))
def test_fuzz_category(category, data, seed):
    _assert_passes(_run(data, seed, category))


# fixed bugs: their campaign seeds must keep passing
FIXED_BUG_SEEDS = {
    "dead_unit_tie": [512],  # units dead on the calibration data: ties broken by weight signatures
    "traced_head_size": [8, 68, 568],  # reshape sizes computed from x.shape (C // heads, C) on widened models
    "shared_scalar": [11],  # PReLU with one slope: now one slope per channel in the merged model
    "tied_weights": [43],  # head tied to the embedding: declared, permuted and filled once, kept tied
    "spatial_matmul": [179, 634],  # x @ buffer over the width, then convs / pooling: spatial axes frozen
    "groupnorm_one_group": [301, 532, 707, 712, 932],  # GroupNorm(1, C): channels permute freely, no units
    "flatten_keeps_within": [352],
    # a one-channel conv before torch.where(x > 0, x, 0.1 x): the comparison had no spec, and the
    # size-1 axis of its frozen output made the channel look structural (budget 2 off, no warning)
    "size_one_channel_mask": [8129],
    # one hidden unit, then x @ buffer of shape (1, 1): the buffer's size-1 axes were declared
    # broadcasts, so the hidden unit looked structural (budget 2 off by 1e-2, no warning)
    "one_by_one_matrix": [9644],
    "tied_head_budget_two": [214, 493, 623],  # embedding = head: kept-apart features rescaled at the embedding  # GroupNorm(2, C)'s units x entries flattened into a head: entries stay paired
}


@pytest.mark.parametrize("bug", sorted(FIXED_BUG_SEEDS))
def test_fixed_bug_stays_fixed(bug):
    for seed in FIXED_BUG_SEEDS[bug]:
        _assert_passes(run_net(seed, None, BUDGETS))


def test_untraceable_net_is_refused():
    """The 'branch' op (data-dependent control flow) is refused with a TraceError, not an
    internal error."""
    cfg = {"kind": "mlp", "in": 3, "out": 2, "cross_norm": False, "category": "unknown", "float64": False,
           "blocks": [["linear", {"w": 4, "bias": True, "norm": "none", "act": "relu", "functional": False,
                                  "prelu_per_feature": True, "dropout": "none"}],
                      ["unknown", {"op": "branch", "axis": "feature", "seed": 0}]]}
    rec = run_net(0, "unknown", BUDGETS, cfg=cfg)
    assert rec["outcome"] == "refused", failures(rec)
    assert rec["errors"][0]["type"] == "TraceError"


# fixed bugs found by the campaign at budgets 1.3 / 1.7 / 2
FIXED_AT_PARTIAL_BUDGETS = {
    # one level holds a refined layer beside a kept-apart one whose input lies inside the
    # kept-apart prefix, which is not run: the refinement reads the inputs of refined layers only
    "refined_beside_skipped_prefix": [5221],
    # a one-channel gate viewed as (B, 1, 1, 1): the channel stays on axis 1, not the last
    # size-1 axis (widened, it was broadcast along the map's width)
    "singleton_gate_view": [5027, 5256],
    # one-channel maps: torch's convolution weight gradient corrupted the heap (the process
    # aborted); small maps take E[y~ x~^T] from their patches (merged_sums._target_cross)
    "one_channel_weight_gradient": [7062],
}


@pytest.mark.parametrize("bug", sorted(FIXED_AT_PARTIAL_BUDGETS))
def test_fixed_bug_at_partial_budgets_stays_fixed(bug):
    for seed in FIXED_AT_PARTIAL_BUDGETS[bug]:
        _assert_passes(run_net(seed, None, (1.3, 1.7, 2.0)))
