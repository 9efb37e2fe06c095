"""Compact emission (passes/compact.py, pleas_fx/core/layers.py): the merged model stores exactly
the parameters the budget counts, its measured multiply-accumulates follow, and it computes what
the dense emission computes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import nets
import pleas_fx
from pleas_fx.core.errors import InternalError
from pleas_fx.core.layers import BlockConv, BlockLinear, read_tensor, write_tensor
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import relative_error

BUDGETS = [1.0, 1.2, 1.5, 2.0]


def _stored(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def _run64(model: nn.Module, x: torch.Tensor):
    return nets.run(copy.deepcopy(model).double(), x.double())


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BlockLinear, BlockConv))]


# --------------------------------------------------------------------------- block layers
def _random_classes(rng, n):
    cls = rng.integers(0, 3, n)
    cls[rng.integers(0, n)] = 1
    return cls


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("sorted_order", [True, False])
def test_block_layer_equals_its_dense_layer(kind, sorted_order):
    """Written from a dense weight with structural zeros, a block layer computes the dense
    layer's output, reads back the same dense weight, and refuses a non-zero dropped block."""
    rng = np.random.default_rng(0)
    n_in, n_out = 7, 6
    in_cls, out_cls = np.sort(_random_classes(rng, n_in)), np.sort(_random_classes(rng, n_out))
    if not sorted_order:
        in_cls, out_cls = rng.permutation(in_cls), rng.permutation(out_cls)
    in_order, out_order = np.argsort(in_cls, kind="stable"), np.argsort(out_cls, kind="stable")
    sizes = lambda c: tuple(int((c == k).sum()) for k in range(3))
    kernel = {"linear": (), "conv1d": (3,), "conv2d": (3, 2)}[kind]
    weight = torch.randn(n_out, n_in, *kernel, dtype=torch.float64)
    zero = ((out_cls[:, None] == 0) & (in_cls[None, :] == 2)) | ((out_cls[:, None] == 2) & (in_cls[None, :] == 0))
    weight[torch.as_tensor(zero)] = 0
    bias = torch.randn(n_out, dtype=torch.float64)
    flags = dict(in_order=not sorted_order, out_order=not sorted_order)
    if kind == "linear":
        layer = BlockLinear(sizes(in_cls), sizes(out_cls), **flags).double()
        x = torch.randn(2, 5, n_in, dtype=torch.float64)
        dense = lambda w, b: F.linear(x, w, b)
    else:
        dims = len(kernel)
        layer = BlockConv(sizes(in_cls), sizes(out_cls), kernel, (1,) * dims, (1,) * dims, (1,) * dims, **flags).double()
        x = torch.randn(2, n_in, *(8,) * dims, dtype=torch.float64)
        conv = F.conv1d if dims == 1 else F.conv2d
        dense = lambda w, b: conv(x, w, b, 1, 1)
    if not sorted_order:
        layer.in_order.copy_(torch.as_tensor(in_order))
        layer.out_order.copy_(torch.as_tensor(np.argsort(out_order)))
    root = nn.Module()
    root.layer = layer
    write_tensor(root, "layer.weight", weight)
    write_tensor(root, "layer.bias", bias)
    assert torch.equal(read_tensor(root, "layer.weight"), weight)
    assert torch.equal(read_tensor(root, "layer.bias"), bias)
    assert relative_error(layer(x), dense(weight, bias)) < 1e-12
    assert _stored(layer) == int((~zero).sum()) * int(np.prod(kernel)) + n_out
    if zero.any():
        bad = weight.clone()
        bad[torch.as_tensor(zero)] = 1.0
        with pytest.raises(InternalError):
            write_tensor(root, "layer.weight", bad)


# --------------------------------------------------------------------------- random networks
@nets.hypothesis_settings(20)
@given(cfg=nets.net_configs(only_mergeable=True), seed=st.integers(0, 10_000),
       budget=st.sampled_from([1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0]))
def test_stored_is_structural_within_budget_and_equals_dense(cfg, seed, budget):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    one = _stored(a)
    # source-input least squares: both emissions are filled from the same statistics, so they
    # must compute the same function (merged-input solves read float32 activations of each)
    compact = pleas_fx.merge(a, b, x, budget, data, progress=False, least_squares="source")
    dense = pleas_fx.merge(a, b, x, budget, data, progress=False, emit="dense", least_squares="source")
    r = compact.meta["pleas_fx"]
    assert _stored(compact) == r["stored_parameters"] == r["parameters"] <= budget * one + 1e-9
    assert dense.meta["pleas_fx"]["parameters"] == r["parameters"]
    assert _stored(dense) >= _stored(compact)
    # the same function: in float64 (only the summation order differs), and in float32 to rounding
    assert relative_error(_run64(compact, x), _run64(dense, x)) < 1e-10
    assert relative_error(nets.run(compact, x), nets.run(dense, x)) < 1e-5
    if budget == 1.0:
        assert _stored(compact) == one and not _blocks(compact)
    if budget == 2.0:  # two models, less what both share on frozen axes only (the averaged output bias)
        gm = trace_model(a, "model")
        propagate_shapes(gm, (x,))
        spec = infer_groups(gm)
        frozen = spec.fixed()
        shared = sum(p.numel() for n, p in gm.named_parameters()
                     if all(s.group in frozen for lay in spec.param_layouts[n] for s in lay))
        assert _stored(compact) == 2 * one - shared


@nets.hypothesis_settings(15)
@given(cfg=nets.net_configs(only_mergeable=True), seed=st.integers(0, 10_000),
       budget=st.sampled_from([1.0, 1.2, 1.5, 2.0]))
def test_flops_metric_measured_macs_within_budget(cfg, seed, budget):
    """Under budget_metric="flops" the emitted model's multiply-accumulates, measured by torch's
    FlopCounterMode, are within the budget of one model's (measured the same way)."""
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    merged = pleas_fx.merge(a, b, x, budget, data, progress=False, budget_metric="flops")
    assert _macs(merged, x) <= budget * _macs(a, x) + 1e-9


def test_budget_two_with_separate_heads_stores_exactly_two_models():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 12),
                                 nn.ReLU(), nn.Linear(12, 5))
    a, b = nets.randomize_norms(make(), 1).eval(), nets.randomize_norms(make(), 2).eval()
    x = torch.randn(2, 3, 4, 4)
    data = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    one = _stored(a)
    merged = pleas_fx.merge(a, b, x, [1.0, 1.5, 2.0], data, progress=False, heads="separate")
    for m, budget in zip(merged, (1.0, 1.5, 2.0)):
        r = m.meta["pleas_fx"]
        head = r["extra_head_parameters"]
        # the budget counts one head; the second head reads only its own model's features
        assert _stored(m) == r["stored_parameters"] <= budget * one + head
    assert _stored(merged[0]) == one + 5 * 12 + 5
    assert _stored(merged[-1]) == 2 * one
    out_a, out_b = nets.run(merged[-1], x)
    assert relative_error(out_a, nets.run(a, x)) < 1e-5 and relative_error(out_b, nets.run(b, x)) < 1e-5


def test_functional_linear_and_conv_become_block_layers():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(6) * 0.1)
            self.w2 = nn.Parameter(torch.randn(7, 6, 3, 3) * 0.3)
            self.w3, self.b3 = nn.Parameter(torch.randn(5, 7) * 0.3), nn.Parameter(torch.randn(5) * 0.1)
            self.w4 = nn.Parameter(torch.randn(4, 5) * 0.3)

        def forward(self, x):
            x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
            x = F.relu(F.conv2d(x, self.w2, None, 1, 1)).mean((2, 3))
            return F.linear(F.relu(F.linear(x, self.w3, self.b3)), self.w4)

    torch.manual_seed(0)
    a, b = Functional().eval(), Functional().eval()
    x = torch.randn(2, 3, 6, 6)
    data = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    for budget in (1.5, 2.0):
        m = pleas_fx.merge(a, b, x, budget, data, progress=False)
        d = pleas_fx.merge(a, b, x, budget, data, progress=False, emit="dense")
        assert _blocks(m)
        assert _stored(m) == m.meta["pleas_fx"]["parameters"] <= budget * _stored(a)
        # merged-input least squares solves on each emission's own float32 activations
        assert relative_error(_run64(m, x), _run64(d, x)) < 1e-6
    assert relative_error(nets.run(m, x), nets.ensemble(a, b, x)) < 1e-5


def test_saved_and_loaded_compact_model(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    a, b = make(), make()
    x = torch.randn(4, 5)
    merged = pleas_fx.merge(a, b, x, 1.5, [torch.randn(16, 5)], progress=False)
    assert _blocks(merged)
    pleas_fx.io.save(merged, tmp_path / "m")
    loaded = pleas_fx.io.load(tmp_path / "m")
    assert _stored(loaded) == _stored(merged)
    assert torch.equal(nets.run(loaded, x), nets.run(merged, x))
    assert "BlockLinear" in (tmp_path / "m" / "graph.json").read_text()


# --------------------------------------------------------------------------- torchvision
TORCHVISION = {  # name -> (constructor keywords, input size)
    "resnet18": ({}, 16),
    "resnet50": ({}, 16),
    "mobilenet_v2": ({}, 16),
    "vit_b_16": ({"image_size": 32}, 32),
}


@pytest.mark.parametrize("name", [n if n != "vit_b_16" else pytest.param(n, marks=pytest.mark.slow) for n in TORCHVISION])
def test_torchvision_models_store_within_the_budget(name):
    """Random weights, small inputs, every large layer mapped (max_ls_dim=600) to keep CI fast:
    the stored parameters are the structural count, within the budget, at 1.2 and 1.5."""
    import torchvision

    kwargs, size = TORCHVISION[name]

    def make(seed):
        torch.manual_seed(seed)
        return nets.randomize_norms(torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs), seed).eval()

    a, b = make(0), make(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    data = [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)]
    one = _stored(a)
    for budget, m in zip((1.2, 1.5), pleas_fx.merge(a, b, x, [1.2, 1.5], data, progress=False, max_ls_dim=600)):
        r = m.meta["pleas_fx"]
        assert _stored(m) == r["stored_parameters"] == r["parameters"] <= budget * one
        # (a ViT whose residual stream is merged entirely has no layer with a zero block)
        assert _blocks(m) or name == "vit_b_16"
        assert torch.isfinite(nets.run(m, x)).all()


def test_attention_projections_become_block_layers():
    """A small torchvision ViT (lowered nn.MultiheadAttention: fused q/k/v projection, heads):
    at budgets 1.5 and 2 the projections are block layers (the fused q/k/v output through an
    index buffer), storing the structural count and computing the dense emission's output."""
    from torchvision.models.vision_transformer import VisionTransformer

    def make(seed):
        torch.manual_seed(seed)
        m = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=3)
        nn.init.normal_(m.heads.head.weight, std=0.2)
        return m.eval()

    a, b = make(0), make(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    data = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)]
    for budget in (1.5, 2.0):
        # (no mixup copies: on 16 samples the head would be re-solved from 2.5 rows per entry,
        # amplifying the float32 rounding by which the two emissions' activations differ)
        m = pleas_fx.merge(a, b, x, budget, data, progress=False, mixup=False)
        d = pleas_fx.merge(a, b, x, budget, data, progress=False, emit="dense", mixup=False)
        assert _stored(m) == m.meta["pleas_fx"]["parameters"] <= budget * _stored(a)
        # merged-input least squares solves on each emission's own float32 activations
        assert relative_error(_run64(m, x), _run64(d, x)) < 1e-6
    in_proj = [mod for name, mod in m.named_modules() if name.endswith("in_proj")]
    assert in_proj and all(isinstance(p, BlockLinear) and p.out_order is not None for p in in_proj)
