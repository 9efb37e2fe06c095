"""timm's CNNs at 64 px: their building blocks (BatchNormAct2d, Conv2dSame, SqueezeExcite,
mixed and split convolutions, channel slices) are first-class ops, so hardly anything is frozen,
the groups are sound, a self-merge is exact and budget 2 is the ensemble."""
from __future__ import annotations

import pytest
import torch

import nets
import pleas_fx
from pleas_fx.apps.checkpoints import build_model
from pleas_fx.inspection import describe_groups
from pleas_fx.passes.verify import relative_error

timm = pytest.importorskip("timm")


def _make(name: str, seed: int):
    torch.manual_seed(seed)
    return nets.randomize_norms(build_model(name, {"num_classes": 10}, "timm").eval(), seed)


@pytest.mark.parametrize("name", [
    "mobilenetv3_small_100",  # BatchNormAct2d, hard-swish, SE with hard-sigmoid gates
    "tf_efficientnet_b0",  # Conv2dSame (TF padding, kept whole and solved with its padding)
    "mixnet_s",  # mixed kernels: splits and concats of channel pieces
    "rexnet_100",  # a residual added to a slice of the channels
])
def test_timm_cnn_is_covered_sound_and_exact(name):
    a, b = _make(name, 0), _make(name, 1)
    x = torch.randn(2, 3, 64, 64)
    data = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = describe_groups(a, x, name=name, check=True)
    assert report.share_mergeable >= 0.9, report.frozen_by_reason
    assert report.check.passed, report.check
    _, _, permuted, _ = nets.permuted_copy(a, x, 1)
    merged = pleas_fx.merge(a, permuted, x, 1.0, data)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4
    merged = pleas_fx.merge(a, b, x, 2.0, data)
    assert merged.meta["pleas_fx"]["frozen_hidden"]["frozen_units"] == 0
    assert relative_error(nets.run(merged, x), nets.ensemble(a, b, x)) < 1e-4


class _UnknownGate(torch.nn.Module):
    """An activation module pleas_fx has no spec for (its ops are plain tensor ops)."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x):
        return x * torch.sigmoid(1.5 * x)


def test_norm_act_with_an_unknown_activation_module_is_traced_through():
    """A BatchNormAct2d whose activation pleas_fx does not know as a module is not kept whole
    (that would freeze its channels): it is traced as F.batch_norm and the activation's ops."""
    from timm.layers import BatchNormAct2d

    def make(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, act_layer=_UnknownGate),
                                torch.nn.Conv2d(8, 4, 1))
        return nets.randomize_norms(m.eval(), seed)

    a, b = make(0), make(1)
    x = torch.randn(2, 3, 8, 8)
    report = describe_groups(a, x, check=True)
    assert report.share_mergeable == 1.0, report.frozen_by_reason
    assert report.check.passed
    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    merged = pleas_fx.merge(a, b, x, 2.0, data)
    assert relative_error(nets.run(merged, x), nets.ensemble(a, b, x)) < 1e-4
