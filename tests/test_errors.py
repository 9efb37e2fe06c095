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


def test_example_input_the_model_cannot_run_raises_trace_error():
    with pytest.raises(TraceError, match="example_input"):
        merge(mlp(), mlp(seed=1), x=torch.randn(2, 5), data=None)


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
