"""The inspect tool: exact groups, frozen reasons and JSON of small networks, and the CLI."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

try:
    import pleas_fx  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pleas_fx.apps.inspect_command import main  # noqa: E402
from pleas_fx.inspection import GroupReport, describe_groups  # noqa: E402

torch.set_num_threads(1)


class Residual(nn.Module):
    """conv-bn-relu, then a residual conv-relu-conv branch added back, pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.conv2(torch.relu(self.conv1(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


class CatFlatten(nn.Module):
    """Two branches concatenated on channels, fused, flattened (C x 4 x 4) into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.fuse = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        h = torch.relu(self.fuse(h))
        return self.fc(torch.flatten(h, 1))


class Cumsum(nn.Module):
    """An op without a handler (cumsum over channels) between two convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.c3 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = torch.cumsum(torch.relu(self.c1(x)), dim=1)
        return self.c3(torch.relu(self.c2(h)))


class Branchy(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return -self.c(x)


def residual_net():
    torch.manual_seed(0)
    return Residual()


def cat_flatten_net():
    torch.manual_seed(0)
    return CatFlatten()


def cumsum_net():
    torch.manual_seed(0)
    return Cumsum()


def branchy_net():
    return Branchy()


def members(entry):
    return [(p.name, p.axis, p.role, p.segment) for p in entry.params]


def test_residual_groups():
    report = describe_groups(residual_net(), torch.randn(1, 3, 8, 8), name="residual")
    assert [(g.size, g.structure) for g in report.groups] == [(8, "plain"), (4, "plain")]
    trunk, branch = report.groups
    # the residual add ties the stem, its BatchNorm and the branch's last conv together
    assert members(trunk) == [
        ("stem.weight", 0, "out", "plain"), ("stem.bias", 0, "out", "plain"),
        ("bn.weight", 0, "out", "plain"), ("bn.bias", 0, "out", "plain"),
        ("bn.running_mean", 0, "out", "plain"), ("bn.running_var", 0, "out", "plain"),
        ("conv1.weight", 1, "in", "plain"), ("conv2.weight", 0, "out", "plain"),
        ("conv2.bias", 0, "out", "plain"), ("fc.weight", 1, "in", "plain"),
    ]
    assert [(s.node, s.axis) for s in trunk.sites] == [
        ("stem", 1), ("bn", 1), ("relu", 1), ("conv2", 1), ("add", 1), ("pool", 1), ("flatten", 1)]
    assert members(branch) == [
        ("conv1.weight", 0, "out", "plain"), ("conv1.bias", 0, "out", "plain"), ("conv2.weight", 1, "in", "plain")]
    assert [(s.node, s.axis) for s in branch.sites] == [("conv1", 1), ("relu_1", 1)]
    assert report.frozen == [] and report.frozen_by_reason == {}
    assert (report.n_groups, report.mergeable_units, report.frozen_hidden_units) == (2, 12, 0)
    assert report.share_mergeable == 1.0
    text = str(report)
    assert "group %d  size 8  plain" % trunk.id in text
    assert "conv1.weight[1] (in)" in text
    assert "summary: 2 mergeable groups, 12 of 12 hidden units mergeable (100.0%)" in text


def test_concat_and_flatten_structure():
    report = describe_groups(cat_flatten_net(), torch.randn(2, 3, 4, 4), name="catflat")
    assert [(g.size, g.structure) for g in report.groups] == [
        (4, "concat segment"), (6, "concat segment"), (5, "flatten block (inner=16)")]
    a, b, fuse = report.groups
    assert members(a) == [("a.weight", 0, "out", "plain"), ("a.bias", 0, "out", "plain"),
                          ("fuse.weight", 1, "in", "segment 1/2 [0:4]")]
    assert members(b) == [("b.weight", 0, "out", "plain"), ("b.bias", 0, "out", "plain"),
                          ("fuse.weight", 1, "in", "segment 2/2 [4:10]")]
    assert members(fuse) == [("fuse.weight", 0, "out", "plain"), ("fuse.bias", 0, "out", "plain"),
                             ("fc.weight", 1, "in", "inner=16")]
    # the concatenated activation is two segments: not a matching site of either branch
    assert [(s.node, s.axis) for s in a.sites] == [("a", 1), ("relu", 1)]
    assert [(s.node, s.axis) for s in fuse.sites] == [("fuse", 1), ("relu_2", 1)]
    assert (report.n_groups, report.mergeable_units, report.share_mergeable) == (3, 15, 1.0)
    assert "fc.weight[1] (in; inner=16)" in str(report)


def test_unknown_op_is_frozen_with_reason():
    report = describe_groups(cumsum_net(), torch.randn(1, 3, 4, 4), name="cumsum")
    assert [(g.size, g.structure, members(g)) for g in report.groups] == [
        (6, "plain", [("c2.weight", 0, "out", "plain"), ("c2.bias", 0, "out", "plain"),
                      ("c3.weight", 1, "in", "plain")])]
    reason = "no handler for function torch.cumsum"
    assert [(f.size, members(f), [(r.where, r.reason) for r in f.reasons]) for f in report.frozen] == [
        (6, [("c1.weight", 0, "out", "plain"), ("c1.bias", 0, "out", "plain")], [("cumsum", reason)]),
        (6, [("c2.weight", 1, "in", "plain")], [("cumsum", reason)]),
    ]
    assert report.frozen[0].nodes == ["c1[1]", "relu[1]"]
    assert report.frozen_by_reason == {reason: 12}
    assert (report.mergeable_units, report.frozen_hidden_units) == (6, 12)
    assert report.share_mergeable == pytest.approx(1 / 3)
    text = str(report)
    assert f"reason: {reason}  [at cumsum]" in text
    assert f"frozen 12 units: {reason}" in text


@pytest.mark.parametrize("factory,shape", [(residual_net, (1, 3, 8, 8)), (cumsum_net, (2, 3, 4, 4))])
def test_json_round_trip(factory, shape):
    report = describe_groups(factory(), torch.randn(*shape), name=factory.__name__, check=True)
    assert report.check is not None and report.check.passed
    text = report.to_json()
    again = GroupReport.from_json(text)
    assert again == report
    assert again.to_json() == text
    assert str(again) == str(report)


def test_describe_groups_leaves_model_untouched():
    model = residual_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    describe_groups(model, torch.randn(1, 3, 8, 8), check=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_json_and_check(capsys):
    code = main([f"{__name__}:cat_flatten_net", "--input-shape", "2,3,4,4", "--json", "-", "--check"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["model"] == f"{__name__}:cat_flatten_net"
    assert data["input_shapes"] == [[2, 3, 4, 4]]
    assert [(g["size"], g["structure"]) for g in data["groups"]] == [
        (4, "concat segment"), (6, "concat segment"), (5, "flatten block (inner=16)")]
    assert data["check"]["max_deviation"] < 1e-4 and data["check"]["passed"]
    assert GroupReport.from_dict(data).to_dict() == data


def test_cli_text_and_json_file(capsys, tmp_path):
    path = tmp_path / "report.json"
    code = main([f"{__name__}:cumsum_net", "--input-shape", "1,3,4,4", "--check", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "frozen 12 units: no handler for function torch.cumsum" in out
    assert "check: max relative deviation" in out and ": PASS" in out
    report = GroupReport.from_json(path.read_text())
    assert report.check.max_deviation < 1e-4
    assert out.strip() == str(report)


def test_cli_torchvision_model(capsys):
    code = main(["resnet18", "--input-shape", "1,3,32,32", "--num-classes", "10", "--check"])
    out = capsys.readouterr().out
    assert code == 0
    assert "summary: 12 mergeable groups, 2880 of 2880 hidden units mergeable (100.0%)" in out
    assert ": PASS" in out


def test_cli_untraceable_model_is_one_line_error(capsys):
    code = main([f"{__name__}:branchy_net", "--input-shape", "1,3,4,4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "cannot trace" in err and "could not be traced by torch.fx" in err


@pytest.mark.parametrize("argv,needle", [
    (["no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["no_such_pkg_xyz.mod:make"], "cannot import 'no_such_pkg_xyz.mod'"),
    (["resnet18", "--input-shape", "1,5,32,32"], "cannot trace"),
])
def test_cli_bad_input_is_one_line_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and needle in err


def test_check_detects_an_unsound_group():
    from pleas_fx.inspection import check_groups, trace_and_infer
    from pleas_fx.core.freeze import FreezeReason
    from pleas_fx.core.ir import Group, Segment

    x = torch.randn(1, 3, 8, 8)
    gm, spec = trace_and_infer(residual_net(), x)
    assert check_groups(gm, spec, x).passed
    # forget that conv1's output channels belong to the branch group: permuting that group
    # now reorders conv2's inputs only, which must show as a large deviation
    spec.groups[-1] = Group(-1, 4, frozen=True, reasons=[FreezeReason("other", "test")])
    spec.param_layouts["conv1.weight"][0] = (Segment(-1, 4),)
    result = check_groups(gm, spec, x)
    assert not result.passed and result.max_deviation > 1e-3
