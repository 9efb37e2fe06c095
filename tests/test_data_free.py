"""Data-free mode (weight matching, statistics from generated inputs) and budget lists (one
statistics pass, one merged model per budget, each equal to its own separate merge)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.passes.verify import relative_error

CNN = {"kind": "cnn", "in_channels": 3, "size": 8, "head": "flatten", "classes": 4, "hidden": 6, "blocks": [
    ("conv", {"cout": 6, "k": 3, "stride": 1, "bn": True, "act": "relu"}),
    ("residual", {"mid": 5, "cout": 6, "bn": True, "functional_add": True}),
    ("dwsep", {"cout": 7, "bn": True}),
    ("se", {"r": 3, "gate": "conv", "broadcast": "index"}),
    ("concat", {"c1": 3, "c2": 2, "keep_input": True}),
    ("pool", {"kind": "avg"}),
]}


def _pair(cfg=CNN, seed=0):
    return nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()


def test_data_free_merge_uses_weight_matching_and_generated_inputs():
    a, b = _pair()
    x, _ = nets.example_and_data(CNN)
    merged = pleas_fx.merge(a, b, x, 1.0, progress=False)
    r = merged.meta["pleas_fx"]
    assert r["matching"] == "weight"
    assert r["statistics"]["batches"] > 0 and r["statistics"]["samples"] > 0
    assert r["statistics"]["least_squares_nodes"] > 0  # least squares ran on generated inputs
    assert r["parameters"] == r["parameters_one_model"]
    out = nets.run(merged, x)
    assert out.shape == nets.run(a, x).shape and torch.isfinite(out).all()
    # and it is a real merge: not simply one of the two models
    assert relative_error(out, nets.run(a, x)) > 1e-4 and relative_error(out, nets.run(b, x)) > 1e-4


def test_data_free_max_batches_and_seed():
    a, b = _pair()
    x, _ = nets.example_and_data(CNN)
    m1 = pleas_fx.merge(a, b, x, 1.3, max_batches=2, progress=False, seed=3)
    m2 = pleas_fx.merge(a, b, x, 1.3, max_batches=2, progress=False, seed=3)
    assert m1.meta["pleas_fx"]["statistics"]["batches"] == 2
    assert torch.equal(nets.run(m1, x), nets.run(m2, x))  # deterministic for a seed
    m3 = pleas_fx.merge(a, b, x, 1.3, max_batches=2, progress=False, seed=4)
    assert torch.isfinite(nets.run(m3, x)).all()


def test_data_free_budget_two_is_the_ensemble():
    a, b = _pair()
    x, _ = nets.example_and_data(CNN)
    merged = pleas_fx.merge(a, b, x, 2.0, progress=False, max_batches=2)
    assert relative_error(nets.run(merged, x), nets.ensemble(a, b, x)) < 1e-4


def test_data_free_self_merge_is_the_identity():
    a, _ = _pair()
    x, _ = nets.example_and_data(CNN)
    _, _, permuted, perms = nets.permuted_copy(a, x, 2)
    assert nets.nontrivial(perms)
    merged = pleas_fx.merge(a, permuted, x, 1.0, progress=False, max_batches=2)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4


def test_data_free_activation_matching_on_generated_inputs():
    a, _ = _pair()
    x, _ = nets.example_and_data(CNN)
    _, _, permuted, _ = nets.permuted_copy(a, x, 2)
    merged = pleas_fx.merge(a, permuted, x, 1.0, matching="activation", progress=False, max_batches=2)
    assert merged.meta["pleas_fx"]["matching"] == "activation"
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4


class TokenModel(nn.Module):
    """Integer inputs: data-free mode must generate token ids in the example's range."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc2(F.gelu(self.fc1(self.emb(ids))).mean(1))


def test_data_free_with_integer_inputs():
    torch.manual_seed(0)
    a = TokenModel().eval()
    b = TokenModel().eval()
    ids = torch.randint(0, 11, (4, 5))
    ids[0, 0], ids[0, 1] = 0, 10
    two = pleas_fx.merge(a, b, ids, 2.0, progress=False, max_batches=2)
    assert relative_error(nets.run(two, ids), nets.ensemble(a, b, ids)) < 1e-4
    one = pleas_fx.merge(a, b, ids, 1.0, progress=False, max_batches=2)
    assert torch.isfinite(nets.run(one, ids)).all()


def test_progress_bar_only_when_asked_or_on_a_terminal(capfd):
    """progress=True draws the bar on stderr; the default draws none when stderr is not a
    terminal (as under pytest); nothing ever reaches stdout (HiGHS's banner included)."""
    a, b = _pair()
    x, data = nets.example_and_data(CNN)
    merged = pleas_fx.merge(a, b, x, 1.5, data, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "pleas_fx statistics" in err
    assert torch.isfinite(nets.run(merged, x)).all()
    pleas_fx.merge(a, b, x, [1.2, 1.5], data)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --------------------------------------------------------------------------- budget lists
@nets.hypothesis_settings(10)
@given(cfg=nets.net_configs(), seed=st.integers(0, 1000),
       budgets=st.lists(st.floats(1.0, 2.0), min_size=2, max_size=4), data_free=st.booleans())
def test_budget_list_equals_separate_merges(cfg, seed, budgets, data_free):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    data = None if data_free else data
    kw = dict(progress=False, max_batches=2)
    merged = pleas_fx.merge(a, b, x, budgets, data, **kw)
    assert isinstance(merged, list) and len(merged) == len(budgets)
    for budget, m in zip(budgets, merged):
        alone = pleas_fx.merge(a, b, x, budget, data, **kw)
        assert isinstance(alone, fx.GraphModule)
        assert m.meta["pleas_fx"]["requested_budget"] == budget
        assert m.meta["pleas_fx"]["groups"] == alone.meta["pleas_fx"]["groups"]
        assert relative_error(nets.run(m, x), nets.run(alone, x)) < 1e-5


def test_budget_list_with_repeated_and_unsorted_budgets():
    a, b = _pair()
    x, data = nets.example_and_data(CNN)
    ms = pleas_fx.merge(a, b, x, [2.0, 1.0, 1.5, 1.0], data, progress=False)
    assert [m.meta["pleas_fx"]["requested_budget"] for m in ms] == [2.0, 1.0, 1.5, 1.0]
    params = [m.meta["pleas_fx"]["parameters"] for m in ms]
    assert params[1] == params[3] == ms[1].meta["pleas_fx"]["parameters_one_model"]
    assert params[1] <= params[2] <= params[0]
    assert torch.equal(nets.run(ms[1], x), nets.run(ms[3], x))
    assert relative_error(nets.run(ms[0], x), nets.ensemble(a, b, x)) < 1e-4
    # separate objects: changing one merged model leaves the others alone
    with torch.no_grad():
        next(ms[1].parameters()).add_(1.0)
    assert not torch.equal(nets.run(ms[1], x), nets.run(ms[3], x))


def test_a_script_merging_off_a_terminal_writes_nothing(tmp_path):
    """A merge with data from a list, run with stderr redirected to a file: nothing on stdout,
    no progress bar (nor anything else) on stderr."""
    import subprocess
    import sys

    script = (
        "import torch, torch.nn as nn, pleas_fx\n"
        "def make(seed):\n"
        "    torch.manual_seed(seed)\n"
        "    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()\n"
        "merged = pleas_fx.merge(make(0), make(1), torch.randn(4, 5), [1.0, 1.5],\n"
        "                        [torch.randn(8, 5) for _ in range(3)])\n"
        "assert len(merged) == 2\n"
    )
    err = tmp_path / "stderr.txt"
    with open(err, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=fh, timeout=300)
    assert proc.returncode == 0, err.read_text()
    assert proc.stdout == b""
    assert err.read_text() == ""
