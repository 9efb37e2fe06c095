"""merge() fails early with a clear, specific error for input it cannot merge."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import nets
import pleas_fx
from pleas_fx.errors import (
    ArchitectureMismatchError, BudgetError, DataError, PleasError, TraceError, WeightError,
)


def mlp(widths=(4, 8, 6, 2), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


X = torch.randn(2, 4)
DATA = [torch.randn(5, 4) for _ in range(2)]


def merge(a, b, x=X, budget=1.0, data=DATA, **kw):
    return pleas_fx.merge(a, b, x, budget, data, progress=False, **kw)


def test_error_hierarchy():
    for err in (TraceError, ArchitectureMismatchError, BudgetError, DataError, WeightError):
        assert issubclass(err, PleasError)
    for err in (BudgetError, DataError, WeightError):
        assert issubclass(err, ValueError)
    assert pleas_fx.PleasError is PleasError and pleas_fx.BudgetError is BudgetError


# --------------------------------------------------------------------------- architecture
def test_resnet18_vs_resnet34_names_the_first_differing_node():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ArchitectureMismatchError) as info:
        pleas_fx.merge(torchvision.models.resnet18(), torchvision.models.resnet34(), x, 1.0, progress=False)
    msg = str(info.value)
    # resnet34's layer1 has a third block where resnet18 moves on to layer2
    assert "layer2_0_conv1" in msg and "layer1.2.conv1" in msg, msg


def test_mlps_differing_in_one_width_name_the_layer_and_both_widths():
    with pytest.raises(ArchitectureMismatchError) as info:
        merge(mlp((4, 8, 6, 2)), mlp((4, 8, 7, 2)))
    msg = str(info.value)
    assert "'_2'" in msg  # the fx node of Sequential index 2, the first that differs
    assert "out_features=6" in msg and "out_features=7" in msg, msg


def test_extra_layer_is_a_mismatch():
    b = nn.Sequential(*mlp(), nn.ReLU())
    with pytest.raises(ArchitectureMismatchError, match="ReLU"):
        merge(mlp(), b)


def test_missing_bias_is_a_mismatch():
    b = mlp()
    b[0] = nn.Linear(4, 8, bias=False)
    with pytest.raises(ArchitectureMismatchError, match="bias"):
        merge(mlp(), b)


class Scaled(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.fc(x) * self.scale


def test_parameter_shape_mismatch_names_the_parameter():
    with pytest.raises(ArchitectureMismatchError, match="scale"):
        merge(Scaled(3), Scaled(1))


# --------------------------------------------------------------------------- tracing
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_raises_trace_error_mentioning_torch_fx():
    with pytest.raises(TraceError) as info:
        merge(DataDependent(), DataDependent())
    msg = str(info.value)
    assert "torch.fx" in msg and "model_a" in msg and "DataDependent" in msg, msg
    assert "control flow" in msg


def test_not_a_module_raises_trace_error():
    with pytest.raises(TraceError, match="model_b is a str"):
        merge(mlp(), "model")


def test_example_input_the_model_cannot_run_raises_trace_error(capfd):
    """The error names the node that failed and the cause; nothing is printed (torch's ShapeProp
    wrote a traceback to stderr)."""
    with pytest.raises(TraceError, match=r"example_input failed at node \w+: RuntimeError: mat1 and mat2"):
        merge(mlp(), mlp(seed=1), x=torch.randn(2, 5), data=None)
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------- budget
@pytest.mark.parametrize("budget", [0.5, 0.999, 2.5, 2.0001, -1, 0, math.nan, math.inf, "1", None, True,
                                    [1.0, 3.0], [], [1.0, "2"], np.float64("nan")])
def test_bad_budget_raises_budget_error(budget):
    with pytest.raises(BudgetError) as info:
        merge(mlp(), mlp(seed=1), budget=budget)
    if not isinstance(budget, list) or budget:
        assert "[1, 2]" in str(info.value)


@pytest.mark.parametrize("budget", [1, 2, 1.0, 2.0, np.float64(1.5), (1.0, 2)])
def test_good_budget_forms_are_accepted(budget):
    out = merge(mlp(), mlp(seed=1), budget=budget)
    assert isinstance(out, list) == isinstance(budget, tuple)


def test_budget_is_checked_before_any_work():
    """A bad budget fails even with data that would also be bad: nothing runs first."""
    with pytest.raises(BudgetError):
        merge(mlp(), mlp(seed=1), budget=3.0, data=[torch.randn(5, 9)])


# --------------------------------------------------------------------------- data
def test_batch_of_the_wrong_shape_raises_data_error_naming_both_shapes():
    with pytest.raises(DataError) as info:
        merge(mlp(), mlp(seed=1), data=[torch.randn(5, 4), torch.randn(3, 7)])
    msg = str(info.value)
    assert "(3, 7)" in msg and "(2, 4)" in msg and "batch 1" in msg, msg


def test_batch_of_the_wrong_rank_raises_data_error():
    with pytest.raises(DataError, match=r"\(5, 4, 1\)"):
        merge(mlp(), mlp(seed=1), data=[torch.randn(5, 4, 1)])


def test_labelled_batches_are_accepted():
    data = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(2)]
    merged = merge(mlp(), mlp(seed=1), data=data)
    assert merged.meta["pleas_fx"]["statistics"]["samples"] == 10


@pytest.mark.parametrize("data, needle", [
    ([], "no batches"),
    ([torch.tensor([[0.0, 1.0, math.nan, 2.0]])], "non-finite"),
    ([torch.ones(3, 4, dtype=torch.int64)], "dtype"),
    (["not a tensor"], "batch"),
])
def test_bad_data_raises_data_error(data, needle):
    with pytest.raises(DataError, match=needle):
        merge(mlp(), mlp(seed=1), data=data)


@pytest.mark.parametrize("example", [[1.0, 2.0], None, np.zeros((2, 4), dtype=np.float32), "x", ()])
def test_example_input_not_a_tensor_raises_data_error(example):
    with pytest.raises(DataError, match="example_input"):
        merge(mlp(), mlp(seed=1), x=example)


# --------------------------------------------------------------------------- weights
@pytest.mark.parametrize("which", ["model_a", "model_b"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_raise_weight_error_naming_the_parameter(which, value):
    a, b = mlp(), mlp(seed=1)
    with torch.no_grad():
        (a if which == "model_a" else b)[2].weight[1, 3] = value
    with pytest.raises(WeightError) as info:
        merge(a, b)
    msg = str(info.value)
    assert which in msg and "2.weight" in msg, msg


def test_non_finite_batchnorm_statistics_raise_weight_error():
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()

    a, b = net(0), net(1)
    b[1].running_var[2] = math.inf
    with pytest.raises(WeightError, match="1.running_var"):
        merge(a, b)


# --------------------------------------------------------------------------- options
def test_unknown_matching_is_rejected():
    with pytest.raises(PleasError, match="matching"):
        merge(mlp(), mlp(seed=1), matching="magic")


def test_errors_leave_the_models_untouched():
    a, b = mlp(), mlp(seed=1)
    a.train()
    before = nets.snapshot(a)
    with pytest.raises(DataError):
        merge(a, b, data=[torch.randn(3, 7)])
    nets.assert_same_snapshot(before, nets.snapshot(a))


# --------------------------------------------------------------------------- tensors pleas_fx cannot merge
def test_model_on_the_meta_device_is_refused_naming_the_tensor():
    with torch.device("meta"):
        a = mlp()
    with pytest.raises(WeightError, match=r"model_a's tensor '0.weight' is on the meta device.*to_empty"):
        merge(a, mlp(seed=1))


def test_sparse_parameter_is_refused():
    a = mlp()
    a[0].weight = nn.Parameter(a[0].weight.detach().to_sparse())
    with pytest.raises(WeightError, match=r"model_a's tensor '0.weight' is a sparse tensor.*to_dense"):
        merge(a, mlp(seed=1))


def test_quantized_buffer_is_refused():
    b = mlp(seed=1)
    b.register_buffer("scale", torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8))
    with pytest.raises(WeightError, match=r"model_b's tensor 'scale' is quantized \(torch.qint8\)"):
        merge(mlp(), b)


def test_complex_parameter_is_refused():
    a = mlp()
    a.register_parameter("phase", nn.Parameter(torch.ones(2, dtype=torch.complex64)))
    with pytest.raises(WeightError, match=r"'phase' is complex"):
        merge(a, mlp(seed=1))


def test_meta_example_input_is_refused():
    with pytest.raises(DataError, match="example_input 0 is a meta tensor"):
        merge(mlp(), mlp(seed=1), x=torch.randn(2, 4, device="meta"))


# --------------------------------------------------------------------------- our failures are ours
class Scale(nn.Module):
    """A per-channel scale that keeps its channel count in an attribute its forward reads."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.w.view(1, self.c)


def test_an_op_spec_that_forgets_to_resize_raises_an_internal_error_naming_the_pass_and_node():
    """A spec registered without `resize` for a module whose forward reads a width attribute:
    the widened graph cannot run. That is pleas_fx's failure (InternalError naming the pass and
    the node), never a TraceError about the user's model."""
    from pleas_fx.passes.ops.registry import _MODULE_SPECS

    def infer(ctx, node):
        x = ctx.layouts(node.args[0])
        ctx.param(f"{node.target}.w", [x[1]])
        return list(x)

    pleas_fx.register_op(Scale, spec=pleas_fx.OpSpec(infer=infer))
    try:
        def make(seed):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, 6), Scale(6), nn.ReLU(), nn.Linear(6, 2)).eval()

        with pytest.raises(pleas_fx.InternalError, match=r"widen pass at node _1 .*This is a bug in pleas_fx") as info:
            merge(make(0), make(1), budget=2.0)
        assert not isinstance(info.value, TraceError)
        assert info.value.pass_name == "widen" and info.value.where.startswith("node _1")
    finally:
        _MODULE_SPECS.pop(Scale, None)


class ReadsAValue(nn.Module):
    """A graph that reads a value in Python (`.item()`): fake tensors cannot run it."""

    def forward(self, x):
        return x * x.abs().max().item()


class WrongWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).view(-1, 4)  # 3 outputs viewed as 4: cannot run on 2 samples


@pytest.mark.parametrize("fake", [True, False])
def test_the_graph_check_records_the_example_shapes_and_falls_back_to_real_values(fake):
    """check_graph on fake tensors records the same shapes as on real values; an op that reads a
    value in Python makes it fall back to the real example input (no error), and a graph that
    cannot run raises the InternalError naming the node either way."""
    from pleas_fx.passes.verify import check_graph

    x = torch.randn(5, 4)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), ReadsAValue()))
    check_graph(gm, (x,), fake=fake)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["_0"] == (5, 6) and shapes["input_1"] == (5, 4)
    assert all(isinstance(n.meta["tensor_meta"].shape, torch.Size) for n in gm.graph.nodes if "tensor_meta" in n.meta)
    bad = torch.fx.symbolic_trace(WrongWidth())
    with pytest.raises(pleas_fx.InternalError, match=r"widen pass at node view") as info:
        check_graph(bad, (torch.randn(2, 4),), fake=fake)
    assert info.value.where.startswith("node view")


def test_a_handler_whose_layouts_do_not_fit_the_output_is_frozen_not_trusted():
    from pleas_fx.passes.ops.registry import _MODULE_SPECS

    class Twice(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], 1)

    @pleas_fx.register_handler(Twice)
    def wrong(ctx, node):  # claims the output is the input: wrong size
        return list(ctx.layouts(node.args[0]))

    try:
        def make(seed):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, 3), Twice(), nn.Linear(6, 2)).eval()

        merged = merge(make(0), make(1), budget=1.5)
        frozen = merged.meta["pleas_fx"]["frozen"]
        assert any(f["kind"] == "handler mismatch" and "sizes [2, 6], layouts of sizes [2, 3]" in f["reason"]
                   for f in frozen), frozen
        assert torch.isfinite(merged(X)).all()
    finally:
        _MODULE_SPECS.pop(Twice, None)


def test_a_subclass_overriding_forward_does_not_inherit_its_parents_spec():
    """Traced through by pleas_fx's tracer (its forward is analysed op by op); kept whole by the
    user's own tracer, it is frozen with the reason, not treated as a plain Conv2d."""
    import torch.fx as fx

    class SignedConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * torch.sign(x.mean())

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, SignedConv) or super().is_leaf_module(m, qualname)

    def make(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 4, 1), SignedConv(4, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 9, 2))
        return fx.GraphModule(net, LeafTracer().trace(net.eval()))

    x = torch.randn(2, 3, 3, 3)
    merged = pleas_fx.merge(make(0), make(1), x, 1.5, [torch.randn(4, 3, 3, 3)])
    reasons = [f["reason"] for f in merged.meta["pleas_fx"]["frozen"]]
    assert any("no handler for module SignedConv (it overrides the forward of Conv2d" in r for r in reasons), reasons


class NormThenMix(nn.Module):
    """Reductions with their arguments by position: x.norm(2, 1) and x.std(1, True)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h / h.norm(2, 1)[:, None] + h.std(1, True)[:, None])


def test_reductions_bind_positional_arguments_by_each_ops_signature():
    from pleas_fx.inspection import check_groups, trace_and_infer

    x = torch.randn(3, 4)
    gm, spec = trace_and_infer(NormThenMix().eval(), x)
    assert ("norm", "reduction") in {(r.where, r.kind) for r in spec.frozen_reasons}  # dim 1 (features) reduced
    assert len(spec.node_layouts["norm"]) == 1 and len(spec.node_layouts["std"]) == 1  # keepdim False both
    assert not any(r.kind == "handler mismatch" for r in spec.frozen_reasons)
    assert check_groups(gm, spec, x).passed


def test_mapped_weights_and_left_out_sites_are_logged_and_reported(caplog):
    import logging

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2)).eval()

    with caplog.at_level(logging.INFO, logger="pleas_fx"):
        merged = merge(make(0), make(1), budget=1.2, max_ls_dim=500)
    notes = merged.meta["pleas_fx"]["notes"]
    assert notes == ["_2 (2.weight): 601 stacked inputs exceed max_ls_dim=500; mapped, not solved",
                     "merged-input least squares: the data-limited levels (_0) read 8 more samples (fewer than 2 "
                     "rows per merged input entry in the leading 10)"], notes
    assert any("1 weight(s) mapped, not solved: _2 (2.weight)" in r.getMessage() for r in caplog.records)
    assert merged.meta["pleas_fx"]["dropped_sites"] == []
