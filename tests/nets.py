"""Random networks for property tests, and small helpers shared by the test modules.

Architectures are drawn by hypothesis as plain configurations (lists of block descriptions,
readable in a failure report) and built with `build(config, seed)`; two calls with different
seeds give two independently initialised networks of the same architecture. Everything is
torch.nn modules and torch functions with static Python control flow, so torch.fx traces it.

CNN blocks: conv (+ folded BatchNorm), pre-activation BN-ReLU-conv, residual add (identity or
projection shortcut), channel concat (DenseNet style and two-branch), squeeze-excitation (1x1
conv or Linear gate, broadcast multiply), depthwise-separable conv, max/avg/adaptive pooling
(module and functional), a token block (flatten(2).transpose -> Linear over channels ->
reshape back with constant sizes). Heads: global pool, flatten of a CxHxW map into Linear,
view(n, -1), mean over spatial axes.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tools.check_zoo import randomize_norms  # noqa: F401  (one home: random BatchNorm states for tests and tools)

ACTIVATIONS = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "leaky": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish,
}
FUNCTIONAL_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}


def hypothesis_settings(max_examples: int, **kw) -> settings:
    """Small, deadline-free, database-free settings. Deterministic by default (CI must not
    flake); PLEAS_TEST_EXPLORE=N multiplies the examples and draws them at random."""
    explore = int(os.environ.get("PLEAS_TEST_EXPLORE", "0") or 0)
    return settings(
        max_examples=max_examples * explore if explore else max_examples,
        deadline=None,
        database=None,
        derandomize=not explore,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
        **kw,
    )


# --------------------------------------------------------------------------- helpers
def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything merge() must leave untouched: tensors (values, dtype, device, requires_grad),
    every submodule's training flag, and the module tree."""
    tensors = {n: (t.detach().clone(), t.dtype, t.device, t.requires_grad) for n, t in model.state_dict(keep_vars=True).items()}
    flags = {n: m.training for n, m in model.named_modules()}
    return {"tensors": tensors, "training": flags, "modules": [n for n, _ in model.named_modules()]}


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["training"] == after["training"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (t0, dtype0, dev0, rg0) in before["tensors"].items():
        t1, dtype1, dev1, rg1 = after["tensors"][name]
        assert (dtype0, dev0, rg0) == (dtype1, dev1, rg1), name
        assert t0.shape == t1.shape, name
        # bit-identical, NaN-safe
        assert torch.equal(t0.view(-1).view(torch.uint8) if t0.is_floating_point() else t0,
                           t1.view(-1).view(torch.uint8) if t1.is_floating_point() else t1), name


def batches(shape: tuple[int, ...], n: int, seed: int, batch_size: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *shape, generator=gen) for _ in range(n)]


def permuted_copy(model: nn.Module, example: torch.Tensor, seed: int):
    """(traced A, its spec, a traced copy with every group randomly permuted)."""
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model
    from pleas_fx.passes.verify import permute_model, random_permutations

    gm = trace_model(model, "model")
    propagate_shapes(gm, (example,))
    spec = infer_groups(gm)
    perms = random_permutations(spec, seed)
    return gm, spec, permute_model(gm, spec, perms), perms


def nontrivial(perms: dict[int, np.ndarray]) -> bool:
    return any((p != np.arange(len(p))).any() for p in perms.values())


# --------------------------------------------------------------------------- MLPs
class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg["in"]
        for h in cfg["hidden"]:
            layers.append(nn.Linear(width, h["width"], bias=h["bias"]))
            if h["bn"]:
                layers.append(nn.BatchNorm1d(h["width"]))
            layers.append(ACTIVATIONS[h["act"]]())
            width = h["width"]
        layers.append(nn.Linear(width, cfg["out"]))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@st.composite
def mlp_configs(draw, max_depth: int = 3, max_width: int = 10, min_width: int = 1) -> dict:
    hidden = draw(st.lists(st.fixed_dictionaries({
        "width": st.integers(min_width, max_width),
        "act": st.sampled_from(sorted(ACTIVATIONS)),
        "bn": st.booleans(),
        "bias": st.booleans(),
    }), min_size=1, max_size=max_depth))
    return {"kind": "mlp", "in": draw(st.integers(2, 8)), "out": draw(st.integers(1, 5)), "hidden": hidden}


# --------------------------------------------------------------------------- CNN blocks
def _conv_bn(cin, cout, k=3, stride=1, bn=True, groups=1):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return layers


class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, bn, act):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, k, stride, bn), ACTIVATIONS[act]())

    def forward(self, x):
        return self.body(x)


class PreAct(nn.Module):
    """Standalone BatchNorm before the conv (BN-ReLU-conv), not foldable into a preceding conv."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, k, 1, k // 2)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class Residual(nn.Module):
    def __init__(self, cin, mid, cout, bn, functional_add):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, mid, 3, 1, bn), nn.ReLU(), *_conv_bn(mid, cout, 3, 1, bn))
        self.proj = None if cin == cout else nn.Sequential(*_conv_bn(cin, cout, 1, 1, bn))
        self.functional_add = functional_add

    def forward(self, x):
        short = x if self.proj is None else self.proj(x)
        y = torch.add(self.body(x), short) if self.functional_add else self.body(x) + short
        return F.relu(y)


class Concat(nn.Module):
    def __init__(self, cin, c1, c2, keep_input):
        super().__init__()
        self.keep_input = keep_input
        self.a = nn.Sequential(*_conv_bn(cin, c1, 3), nn.ReLU())
        self.b = None if keep_input else nn.Sequential(*_conv_bn(cin, c2, 1), nn.ReLU())

    def forward(self, x):
        if self.keep_input:  # DenseNet style: the input itself is a segment of the output
            return torch.cat([x, self.a(x)], 1)
        return torch.cat([self.a(x), self.b(x)], dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r, gate, broadcast):
        super().__init__()
        self.c, self.gate, self.broadcast = c, gate, broadcast
        if gate == "conv":
            self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, r), nn.Linear(r, c)

    def forward(self, x):
        if self.gate == "conv":
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
            return x * s
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        if self.broadcast == "reshape":
            s = s.reshape(-1, self.c, 1, 1)  # a shape constant the widening pass must rewrite
        elif self.broadcast == "view":
            s = s.view(s.size(0), self.c, 1, 1)
        else:
            s = s[:, :, None, None]
        return x * s


class DepthwiseSeparable(nn.Module):
    def __init__(self, c, cout, bn):
        super().__init__()
        self.dw = nn.Sequential(*_conv_bn(c, c, 3, 1, bn, groups=c), nn.ReLU6())
        self.pw = nn.Conv2d(c, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class Pool(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "adaptive_avg": nn.AdaptiveAvgPool2d(2),
                     "adaptive_max": nn.AdaptiveMaxPool2d(2)}.get(kind)

    def forward(self, x):
        if self.kind == "f_max":
            return F.max_pool2d(x, 2)
        if self.kind == "f_avg":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return self.pool(x)


class Tokens(nn.Module):
    """Linear over channels of an NCHW map through a token view, then back to NCHW."""

    def __init__(self, c, cout, h, w):
        super().__init__()
        self.lin = nn.Linear(c, cout)
        self.cout, self.h, self.w = cout, h, w

    def forward(self, x):
        t = self.lin(x.flatten(2).transpose(1, 2))
        return F.gelu(t.transpose(1, 2).reshape(-1, self.cout, self.h, self.w)).contiguous()


class Head(nn.Module):
    def __init__(self, kind, c, h, w, classes, hidden):
        super().__init__()
        self.kind = kind
        if kind == "flatten":
            self.flat = nn.Flatten()
            self.fc = nn.Sequential(nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        else:
            self.fc = nn.Linear(c, classes) if kind != "view" else nn.Linear(c * h * w, classes)

    def forward(self, x):
        if self.kind == "flatten":
            return self.fc(self.flat(x))
        if self.kind == "view":
            return self.fc(x.view(x.size(0), -1))
        if self.kind == "mean":
            return self.fc(x.mean(dim=(2, 3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class CNN(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        c, h = cfg["in_channels"], cfg["size"]
        self.blocks = nn.ModuleList()
        for kind, kw in cfg["blocks"]:
            if kind == "conv":
                block = ConvBlock(c, kw["cout"], kw["k"], kw["stride"], kw["bn"], kw["act"])
                c, h = kw["cout"], (h + kw["stride"] - 1) // kw["stride"]
            elif kind == "preact":
                block, c = PreAct(c, kw["cout"], kw["k"]), kw["cout"]
            elif kind == "residual":
                block, c = Residual(c, kw["mid"], kw["cout"], kw["bn"], kw["functional_add"]), kw["cout"]
            elif kind == "concat":
                block = Concat(c, kw["c1"], kw["c2"], kw["keep_input"])
                c = c + kw["c1"] if kw["keep_input"] else kw["c1"] + kw["c2"]
            elif kind == "se":
                block = SqueezeExcite(c, kw["r"], kw["gate"], kw["broadcast"])
            elif kind == "dwsep":
                block, c = DepthwiseSeparable(c, kw["cout"], kw["bn"]), kw["cout"]
            elif kind == "pool":
                block, h = Pool(kw["kind"]), (2 if kw["kind"].startswith("adaptive") else h // 2)
            elif kind == "tokens":
                block, c = Tokens(c, kw["cout"], h, h), kw["cout"]
            else:
                raise ValueError(kind)
            self.blocks.append(block)
        self.head = Head(cfg["head"], c, h, h, cfg["classes"], cfg["hidden"])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@st.composite
def cnn_configs(draw, max_blocks: int = 4, max_channels: int = 6, size: int = 8, min_channels: int = 1,
                kinds: tuple[str, ...] = ("conv", "preact", "residual", "concat", "se", "dwsep", "pool", "tokens"),
                only_mergeable: bool = False) -> dict:
    """Widths of 1 are allowed by default: a size-1 channel group can be frozen (e.g. a view
    that drops it). only_mergeable=True (with min_channels=2) draws only networks in which
    pleas_fx freezes no group: it also avoids a concat whose output (still made of the concat's
    segments) meets a single group in an SE gate or identity residual, which pleas_fx freezes
    (fail-closed, reported; see test_known_bug_concat_then_* in test_invariants.py)."""
    ch = st.integers(min_channels, max_channels)
    h = size
    c = draw(st.integers(1, 3))
    cfg: dict = {"kind": "cnn", "in_channels": c, "size": size, "blocks": []}
    n = draw(st.integers(1, max_blocks))
    segmented = False  # the channel axis is still a concat of several groups
    for i in range(n):
        options = [k for k in kinds if not (k == "pool" and h < 4) and not (k == "conv" and h < 2)
                   and not (only_mergeable and segmented and k in ("se", "residual"))]
        # The stem is a conv: the network input is a frozen group, and a per-channel op with
        # parameters applied to it directly (BN, depthwise conv, residual add, SE gate) would
        # average A's and B's versions even at budget 2 (see test_invariants.py).
        kind = "conv" if i == 0 else draw(st.sampled_from(options))
        if kind == "conv":
            kw = {"cout": draw(ch), "k": draw(st.sampled_from([1, 3])), "stride": draw(st.sampled_from([1, 2])),
                  "bn": draw(st.booleans()), "act": draw(st.sampled_from(sorted(ACTIVATIONS)))}
            c, h = kw["cout"], (h + kw["stride"] - 1) // kw["stride"]
        elif kind == "preact":
            kw = {"cout": draw(ch), "k": draw(st.sampled_from([1, 3]))}
            c = kw["cout"]
        elif kind == "residual":
            kw = {"mid": draw(ch), "cout": draw(st.sampled_from([c, c, draw(ch)])), "bn": draw(st.booleans()),
                  "functional_add": draw(st.booleans())}
            c = kw["cout"]
        elif kind == "concat":
            kw = {"c1": draw(ch), "c2": draw(ch), "keep_input": draw(st.booleans())}
            c = c + kw["c1"] if kw["keep_input"] else kw["c1"] + kw["c2"]
        elif kind == "se":
            kw = {"r": draw(st.integers(min_channels, 4)), "gate": draw(st.sampled_from(["conv", "linear"])),
                  "broadcast": draw(st.sampled_from(["reshape", "view", "index"]))}
        elif kind == "dwsep":
            kw = {"cout": draw(ch), "bn": draw(st.booleans())}
            c = kw["cout"]
        elif kind == "pool":
            kw = {"kind": draw(st.sampled_from(["max", "avg", "adaptive_avg", "adaptive_max", "f_max", "f_avg"]))}
            h = 2 if kw["kind"].startswith("adaptive") else h // 2
        elif kind == "tokens":
            kw = {"cout": draw(ch)}
            c = kw["cout"]
        cfg["blocks"].append((kind, kw))
        if kind == "concat":
            segmented = True
        elif kind in ("conv", "preact", "dwsep", "tokens"):
            segmented = False
    cfg["head"] = draw(st.sampled_from(["gap", "flatten", "view", "mean"]))
    cfg["classes"] = draw(st.integers(1, 4))
    cfg["hidden"] = draw(st.integers(min_channels, 6))
    return cfg


def net_configs(min_width: int = 1, only_mergeable: bool = False):
    """MLPs and CNNs; only_mergeable=True gives networks whose every hidden group is mergeable."""
    if only_mergeable:
        min_width = max(min_width, 2)
    return st.one_of(mlp_configs(min_width=min_width),
                     cnn_configs(min_channels=min_width, only_mergeable=only_mergeable))


def build(cfg: dict, seed: int, train: bool = False) -> nn.Module:
    """A network of architecture `cfg` initialised from `seed`, with random BatchNorm state."""
    torch.manual_seed(seed)
    model = MLP(cfg) if cfg["kind"] == "mlp" else CNN(cfg)
    randomize_norms(model, seed)
    return model.train(train)


def input_shape(cfg: dict) -> tuple[int, ...]:
    return (cfg["in"],) if cfg["kind"] == "mlp" else (cfg["in_channels"], cfg["size"], cfg["size"])


def example_and_data(cfg: dict, seed: int = 0, n_batches: int = 2, batch_size: int = 4):
    shape = input_shape(cfg)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *shape, generator=gen)
    data = [torch.randn(batch_size, *shape, generator=gen) for _ in range(n_batches)]
    return x, data


def ensemble(a: nn.Module, b: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return 0.5 * (a(x) + b(x))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def assert_self_merge_and_budget_two(a: nn.Module, b: nn.Module, x: torch.Tensor, data: list, seed: int) -> None:
    """The DESIGN invariants on a pair: merging A with a randomly permuted copy of itself at
    budget 1 recovers A (< 1e-4), and budget 2 of A and B is their ensemble (< 1e-4) with
    nothing frozen."""
    import pleas_fx
    from pleas_fx.passes.verify import relative_error

    gm, _, permuted, _ = permuted_copy(a, x, seed + 2)
    one = pleas_fx.merge(gm, permuted, x, 1.0, data, progress=False)
    assert relative_error(run(one, x), run(a, x)) < 1e-4
    two = pleas_fx.merge(a, b, x, 2.0, data, progress=False)
    assert two.meta["pleas_fx"]["frozen"] == []
    assert relative_error(run(two, x), ensemble(a, b, x)) < 1e-4


def digit_resnet_pair(width: int, n_batches: int, batch_size: int):
    """Two differently initialised DigitResNets (pleas_fx.apps.demo) with random BatchNorm states,
    and random 28x28 one-channel batches."""
    from pleas_fx.apps.demo import DigitResNet
    torch.manual_seed(0)
    a, b = DigitResNet(width=width).eval(), DigitResNet(width=width).eval()
    randomize_norms(a, 1)
    randomize_norms(b, 2)
    gen = torch.Generator().manual_seed(0)
    return a, b, [torch.randn(batch_size, 1, 28, 28, generator=gen) for _ in range(n_batches)]


def trained_digit_pair():
    """Two small digit ResNets (width 8, 14x14 real MNIST digits) from different seeds, A trained
    one epoch on digits 0-4 and B on 5-9 (joint 10-way head): ([a, b], 4 calibration batches of
    100 training images as 1-tuples, (test images, test labels))."""
    from pleas_fx.apps.demo import DigitResNet, load_digits_split, train_model

    d = load_digits_split()
    x, y = d["x_train"][:, :, ::2, ::2].contiguous(), d["y_train"]
    models = []
    for seed, classes in ((0, y < 5), (1, y >= 5)):
        torch.manual_seed(seed)
        models.append(train_model(DigitResNet(width=8), x[classes], y[classes], epochs=1, seed=seed))
    xt, yt = d["x_test"][:, :, ::2, ::2].contiguous(), d["y_test"]
    gen = torch.Generator().manual_seed(0)
    calib = [(x[i],) for i in torch.randperm(len(x), generator=gen)[:400].split(100)]
    return models, calib, (xt, yt)


def traced_spec(model: nn.Module, x: torch.Tensor):
    """(traced graph, inferred GroupSpec) of a model on example input x."""
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model

    gm = trace_model(model, "model")
    propagate_shapes(gm, (x,))
    return gm, infer_groups(gm)


def quiet_merge(a: nn.Module, b: nn.Module, x, budget, data, **kw):
    """pleas_fx.merge without a progress bar."""
    import pleas_fx

    return pleas_fx.merge(a, b, x, budget, data, progress=False, **kw)

