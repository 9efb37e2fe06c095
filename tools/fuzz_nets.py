"""Fuzz pleas_fx.merge with random networks, and report what breaks.

Every net is an fx-traceable nn.Module with static Python control flow, drawn from a seed
(same seed, same architecture; the weights of model A and model B come from two more seeds).
Categories:

  mlp          Linear stacks: activations (module and functional, PReLU), BatchNorm1d /
               LayerNorm / F.layer_norm, residual blocks (identity or projection), SwiGLU (chunk
               or split on the feature axis), dropout (module and functional).
  cnn1d, cnn2d conv (+BatchNorm, dilation, PReLU), pre-activation BN-ReLU-conv, residual add (identity or
               projection shortcut, `+`, torch.add, Tensor.add), channel concat of branches
               (DenseNet style too, negative cat dims) or stacked and summed, chunk / split /
               slicing of channels (then cat, add or GLU),
               squeeze-excitation gates (pooled -> 1x1 conv or Linear -> sigmoid -> multiply),
               an SE-gated concat added to a residual, depthwise (with channel multiplier) and
               grouped convs, max / avg / adaptive pooling and upsampling (module and functional),
               InstanceNorm, GroupNorm, F.batch_norm / F.layer_norm / F.group_norm with registered
               parameters, channels-last Linear, and flatten / view / reshape / pooled heads (one
               returns a tuple holding a dict).
  transformer  token models: embedding, linear-token, linear-patch (reshape/permute patchify
               with sizes read from x.shape) or conv-patch stems; cls token and position
               embedding; pre-norm, post-norm or norm-free blocks; attention as fused qkv
               (`reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)`), separate q/k/v,
               F.scaled_dot_product_attention or explicit softmax(q @ k^T * scale) @ v,
               nn.MultiheadAttention (batch first or not); an optional key-padding mask input;
               MLP blocks; cls / mean / token heads, the token head sometimes tied to the embedding.
  unknown      one of the above with one or two ops pleas_fx cannot know inserted: a function
               wrapped with torch.fx.wrap, a custom leaf module (traced with a custom tracer),
               rarer torch ops (cumsum, roll, flip, sort, topk, einsum, cummax, index_select
               with a fixed permutation, F.normalize, ...), or, rarely, data-dependent control
               flow (untraceable: pleas_fx must refuse it with a TraceError).

For each net (inputs shaped and typed for the net; calibration data = 2 batches of 8):

  a. self-merge: merge(model, permuted copy, 1.0, data), where the copy permutes every inferred
     group (passes.verify.random_permutations + permute_model). The permuted copy must compute
     the model's function (< 1e-5 relative: else a group-soundness bug) and the merged model
     too (< 1e-4).
  b. merge(model_a, model_b, budgets, data): outputs finite at every budget; at budget 2 the
     merged output is the mean of the two models' outputs (< 1e-4) where no hidden group is
     frozen and every normalisation acts per channel ("not checked" otherwise); stored
     parameters relative to one model; model_a and model_b unchanged; a second identical
     merge gives identical outputs.

Outputs are checked on the example input (batch 4) and on a batch of another size (5); about 8%
of the MLPs and CNNs are float64. The frozen share of hidden units is read from the groups the
library infers (groups not fixed by the structure: network input/output, batch, spatial...);
merged.meta["pleas_fx"]["frozen"] is kept in the --json records.
Outcomes: ok; refused (a documented PleasError about the user's model, raised at the front
door: tracing, budget or data checks); internal (any other exception, or a PleasError raised
by the compiler after tracing succeeded); wrong (a check failed).

    python tools/fuzz_nets.py --n 1000                       # the campaign
    python tools/fuzz_nets.py --seed 17 --n 1 --verbose       # one net again
    python tools/fuzz_nets.py --n 200 --only transformer --json out.json

Failures are tagged with the known bugs they look like (KNOWN_BUGS, known_bug_tags), and
avoid_known_bugs rewrites a config clear of them (tests/test_fuzz.py uses it to keep looking
for new bugs in categories a known bug already breaks).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != ROOT:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# --- library internals
import pleas_fx  # noqa: E402
from pleas_fx.errors import InternalError, PleasError, TraceError  # noqa: E402
from pleas_fx.passes.infer_groups import infer_groups  # noqa: E402
from pleas_fx.passes.trace import propagate_shapes, trace_model  # noqa: E402
from pleas_fx.passes.verify import permute_model, random_permutations, relative_error  # noqa: E402
# ---

torch.set_num_threads(1)

CATEGORIES = ("mlp", "cnn1d", "cnn2d", "transformer", "unknown")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "leaky", "hardswish", "relu6", "elu")
MODULE_ACT = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky": lambda: nn.LeakyReLU(0.1), "hardswish": nn.Hardswish, "relu6": nn.ReLU6, "elu": nn.ELU,
}
FUNCTIONAL_ACT = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "leaky": lambda x: F.leaky_relu(x, 0.1), "hardswish": F.hardswish, "relu6": F.relu6, "elu": F.elu,
}
SELF_TOL, SOUND_TOL, ENSEMBLE_TOL = 1e-4, 1e-5, 1e-4


# =========================================================================== random choices
class RngDraw:
    """Choices from a numpy generator (the campaign)."""

    def __init__(self, seed: int, category: str):
        self.rng = np.random.default_rng([seed, CATEGORIES.index(category)])

    def int(self, lo: int, hi: int) -> int:  # inclusive
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, options, weights=None):
        options = list(options)
        if weights is None:
            return options[int(self.rng.integers(len(options)))]
        w = np.asarray(weights, dtype=float)
        return options[int(self.rng.choice(len(options), p=w / w.sum()))]

    def bool(self, p: float = 0.5) -> bool:
        return bool(self.rng.random() < p)


class HypothesisDraw:
    """The same choices drawn by hypothesis (`st.data()`), so failures shrink. Weights only
    exclude options of weight 0; the first option is the simplest (hypothesis shrinks to it)."""

    def __init__(self, data):
        from hypothesis import strategies as st
        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, options, weights=None):
        options = list(options)
        if weights is not None:
            options = [o for o, w in zip(options, weights) if w > 0]
        return self.data.draw(self.st.sampled_from(options))

    def bool(self, p: float = 0.5) -> bool:
        if p <= 0 or p >= 1:
            return p >= 1
        return self.data.draw(self.st.booleans())


# =========================================================================== shared modules
class Act(nn.Module):
    """An activation as a module, or applied functionally in forward; "prelu" is nn.PReLU with
    one slope per feature (`width`) or a shared one."""

    def __init__(self, name: str, functional: bool, width: int = 1):
        super().__init__()
        self.name, self.functional = name, functional and name != "prelu"
        if name == "prelu":
            self.mod = nn.PReLU(width)
            with torch.no_grad():
                self.mod.weight.uniform_(-0.5, 0.5)
        else:
            self.mod = None if self.functional else MODULE_ACT[name]()

    def forward(self, x):
        return FUNCTIONAL_ACT[self.name](x) if self.functional else self.mod(x)


def fuzz_mix(x, dim: int):
    """An op pleas_fx has no handler for (wrapped: a leaf call in the graph) that mixes the
    order of axis `dim`."""
    return x.flip(dim) * 0.5 + x


def fuzz_gate(x):
    """A wrapped op that happens to be elementwise (pleas_fx cannot know)."""
    return x * torch.sigmoid(x)


torch.fx.wrap("fuzz_mix")
torch.fx.wrap("fuzz_gate")


class FuzzLeaf(nn.Module):
    """A custom leaf module (see FuzzTracer): scales axis `dim` and mixes it with a shifted copy."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(0.5 + torch.rand(n))

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.scale.view(shape) + 0.1 * x.roll(1, self.dim)


class FuzzTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, FuzzLeaf) or super().is_leaf_module(m, qualname)


class Unknown(nn.Module):
    """A shape-preserving op acting on axis `dim` that pleas_fx may not know."""

    def __init__(self, op: str, dim: int, n: int, seed: int):
        super().__init__()
        self.op, self.dim, self.n = op, dim, n
        if op == "leaf":
            self.leaf = FuzzLeaf(n, dim)
        elif op == "einsum":
            self.mix = nn.Parameter(torch.randn(n, n) / math.sqrt(n))
        elif op == "index_select":
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("perm", torch.randperm(n, generator=g))
        elif op == "matmul_buffer":
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("mat", torch.randn(n, n, generator=g) / math.sqrt(n))

    def forward(self, x):
        op, d = self.op, self.dim
        if op == "wrapped_mix":
            return fuzz_mix(x, d)
        if op == "wrapped_gate":
            return fuzz_gate(x)
        if op == "leaf":
            return self.leaf(x)
        if op == "cumsum":
            return torch.cumsum(x, d) * 0.3
        if op == "cumsum_method":
            return x.cumsum(dim=d) * 0.3
        if op == "roll":
            return torch.roll(x, 1, d)
        if op == "flip":
            return x.flip(d)
        if op == "torch_flip":
            return torch.flip(x, [d])
        if op == "sort":
            return torch.sort(x, d)[0]
        if op == "sort_values":
            return x.sort(dim=d, descending=True).values
        if op == "topk":
            return x.topk(self.n, d)[0]
        if op == "cummax":
            return torch.cummax(x, d)[0]
        if op == "logcumsumexp":
            return torch.logcumsumexp(x, d)
        if op == "normalize":
            return F.normalize(x, dim=d)
        if op == "softmax":
            return F.softmax(x, dim=d)
        if op == "nan_to_num":
            return torch.nan_to_num(x)
        if op == "where":
            return torch.where(x > 0, x, x * 0.1)
        if op == "diff":
            return torch.diff(x, dim=d, prepend=x.narrow(d, 0, 1))
        if op == "narrow_cat":
            return torch.cat([x.narrow(d, 1, self.n - 1), x.narrow(d, 0, 1)], d)
        if op == "index_select":
            return x.index_select(d, self.perm)
        if op == "einsum":  # d is the feature axis: 1 (channels first) or -1 (features last)
            return torch.einsum("bc...,dc->bd...", x, self.mix) if d == 1 else torch.einsum("...c,dc->...d", x, self.mix)
        if op == "matmul_buffer":  # last axis only
            return x @ self.mat
        if op == "standardize":
            return (x - x.mean(d, keepdim=True)) / (x.std(d, keepdim=True) + 1e-3)
        if op == "max_sub":
            return x - x.amax(d, keepdim=True)
        if op == "branch":  # data-dependent control flow: torch.fx cannot trace it
            if x.sum() > 0:
                return x * 2
            return x
        raise ValueError(op)


# op -> (weight, needs: "any" | "last" (acts on the last axis) | "feature" (needs the feature axis))
UNKNOWN_OPS = {
    "wrapped_mix": (3, "any"), "wrapped_gate": (2, "any"), "leaf": (3, "any"), "cumsum": (2, "any"),
    "cumsum_method": (1, "any"), "roll": (2, "any"), "flip": (1, "any"), "torch_flip": (1, "any"),
    "sort": (2, "any"), "sort_values": (1, "any"), "topk": (2, "any"), "cummax": (1, "any"),
    "logcumsumexp": (1, "any"), "normalize": (2, "any"), "softmax": (1, "any"), "nan_to_num": (1, "any"),
    "where": (1, "any"), "diff": (1, "any"), "narrow_cat": (1, "any"), "index_select": (2, "any"),
    "einsum": (2, "feature"), "matmul_buffer": (2, "last"), "standardize": (1, "any"), "max_sub": (1, "any"),
    "branch": (0.4, "any"),
}


def draw_unknown(d) -> dict:
    ops = list(UNKNOWN_OPS)
    op = d.choice(ops, [UNKNOWN_OPS[o][0] for o in ops])
    need = UNKNOWN_OPS[op][1]
    axis = "feature" if need == "feature" else "last" if need == "last" else d.choice(["feature", "other"])
    return {"op": op, "axis": axis}


def unknown_dim(axis: str, layout: str, rank: int) -> int:
    """The tensor axis for an unknown op: layout "cf" (channels first: N, C, ...), "fl"
    (features last: N, ..., C) or "vec" (N, C)."""
    if axis == "last":
        return rank - 1
    if layout == "vec":
        return 1
    if layout == "cf":
        return 1 if axis == "feature" else rank - 1
    return rank - 1 if axis == "feature" else 1


def unknown_ok(kw: dict, layout: str, rank: int, sizes: list[int]) -> bool:
    dim = unknown_dim(kw["axis"], layout, rank)
    if kw["op"] in ("narrow_cat", "standardize") and sizes[dim] < 2:
        return False
    if kw["op"] == "einsum" and kw["axis"] != "feature":
        return False
    return True


# =========================================================================== MLPs
class MLPNorm(nn.Module):
    def __init__(self, kind: str, w: int):
        super().__init__()
        self.kind = kind
        if kind == "bn":
            self.norm = nn.BatchNorm1d(w)
        elif kind == "ln":
            self.norm = nn.LayerNorm(w)
        elif kind == "f_ln":
            self.weight = nn.Parameter(0.5 + torch.rand(w))
            self.bias = nn.Parameter(0.3 * torch.randn(w))
            self.w = w

    def forward(self, x):
        if self.kind == "none":
            return x
        if self.kind == "f_ln":
            return F.layer_norm(x, (self.w,), self.weight, self.bias)
        return self.norm(x)


class MLPLinear(nn.Module):
    def __init__(self, cin, kw):
        super().__init__()
        self.fc = nn.Linear(cin, kw["w"], bias=kw["bias"])
        self.norm = MLPNorm(kw["norm"], kw["w"])
        self.act = Act(kw["act"], kw["functional"], kw["w"] if kw.get("prelu_per_feature") else 1)
        self.dropout = kw["dropout"]
        self.drop = nn.Dropout(0.2) if kw["dropout"] == "module" else None

    def forward(self, x):
        x = self.act(self.norm(self.fc(x)))
        if self.dropout == "module":
            x = self.drop(x)
        elif self.dropout == "functional":
            x = F.dropout(x, 0.2, self.training)
        return x


class MLPResidual(nn.Module):
    def __init__(self, cin, kw):
        super().__init__()
        self.pre = MLPNorm(kw["norm"], cin)
        self.fc1, self.fc2 = nn.Linear(cin, kw["hidden"]), nn.Linear(kw["hidden"], kw["w"])
        self.act = Act(kw["act"], kw["functional"])
        self.proj = None if kw["w"] == cin else nn.Linear(cin, kw["w"], bias=False)
        self.add = kw["add"]

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(self.pre(x))))
        short = x if self.proj is None else self.proj(x)
        return torch.add(short, y) if self.add == "torch" else short + y


class SwiGLU(nn.Module):
    def __init__(self, cin, kw):
        super().__init__()
        self.fc1 = nn.Linear(cin, 2 * kw["hidden"])
        self.fc2 = nn.Linear(kw["hidden"], cin)
        self.style = kw["style"]

    def forward(self, x):
        h = self.fc1(x)
        if self.style == "chunk":
            a, b = h.chunk(2, dim=-1)
        else:
            a, b = torch.split(h, h.shape[-1] // 2, dim=-1)
        return x + self.fc2(F.silu(a) * b)


def draw_mlp(d, unknown: bool = False) -> dict:
    cfg = {"kind": "mlp", "in": d.int(2, 8), "out": d.int(1, 5), "blocks": [], "cross_norm": False}
    w = cfg["in"]
    for i in range(d.int(1, 4)):
        kind = "linear" if i == 0 else d.choice(["linear", "residual", "swiglu"], [3, 2, 1])
        if kind == "linear":
            kw = {"w": d.int(1, 10), "bias": d.bool(0.8), "norm": d.choice(["none", "bn", "ln", "f_ln"], [3, 2, 1, 1]),
                  "act": d.choice(ACTIVATIONS + ("prelu",)), "functional": d.bool(0.3), "prelu_per_feature": d.bool(),
                  "dropout": d.choice(["none", "module", "functional"], [3, 1, 1])}
            w = kw["w"]
        elif kind == "residual":
            kw = {"hidden": d.int(1, 10), "w": d.choice([w, w, w, d.int(1, 10)]), "norm": d.choice(["none", "bn", "ln"]),
                  "act": d.choice(ACTIVATIONS), "functional": d.bool(0.3), "add": d.choice(["op", "torch"])}
            w = kw["w"]
        else:
            kw = {"hidden": d.int(1, 8), "style": d.choice(["chunk", "split"])}
        if kw.get("norm") in ("ln", "f_ln"):
            cfg["cross_norm"] = True
        cfg["blocks"].append([kind, kw])
    if unknown:
        _insert_unknowns(d, cfg, lambda i: ("vec", 2, [0, _mlp_width_after(cfg, i)]))
    return cfg


def _mlp_width_after(cfg, i):
    w = cfg["in"]
    for kind, kw in cfg["blocks"][: i + 1]:
        if kind in ("linear", "residual"):
            w = kw["w"]
    return w


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList()
        w = cfg["in"]
        for kind, kw in cfg["blocks"]:
            if kind == "linear":
                self.blocks.append(MLPLinear(w, kw))
                w = kw["w"]
            elif kind == "residual":
                self.blocks.append(MLPResidual(w, kw))
                w = kw["w"]
            elif kind == "swiglu":
                self.blocks.append(SwiGLU(w, kw))
            elif kind == "unknown":
                self.blocks.append(Unknown(kw["op"], unknown_dim(kw["axis"], "vec", 2), w, kw["seed"]))
        self.head = nn.Linear(w, cfg["out"])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _insert_unknowns(d, cfg, where):
    """Insert 1-2 unknown-op blocks after random blocks; where(i) -> (layout, rank, sizes) of
    the tensor after block i."""
    for _ in range(d.int(1, 2)):
        i = d.int(0, len(cfg["blocks"]) - 1)
        layout, rank, sizes = where(i)
        kw = draw_unknown(d)
        if not unknown_ok(kw, layout, rank, sizes):
            kw = {"op": "wrapped_mix", "axis": "feature"}
        kw["seed"] = d.int(0, 1000)
        cfg["blocks"].insert(i + 1, ["unknown", kw])


# =========================================================================== CNNs
def _nd(dim, name):
    return getattr(nn, f"{name}{dim}d")


def _fn(dim, name):
    return getattr(F, f"{name}{dim}d")


def conv_len(L, k, stride):
    return (L + 2 * (k // 2) - k) // stride + 1


class ConvAct(nn.Module):
    def __init__(self, dim, cin, kw):
        super().__init__()
        dil = kw.get("dilation", 1)
        self.conv = _nd(dim, "Conv")(cin, kw["cout"], kw["k"], kw["stride"], dil * (kw["k"] // 2), dilation=dil,
                                     bias=kw["bias"] or not kw["bn"])
        self.bn = _nd(dim, "BatchNorm")(kw["cout"], affine=kw.get("bn_affine", True)) if kw["bn"] else None
        self.act = Act(kw["act"], kw["functional"], kw["cout"] if kw.get("prelu_per_feature") else 1)

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class PreAct(nn.Module):
    def __init__(self, dim, cin, kw):
        super().__init__()
        self.bn = _nd(dim, "BatchNorm")(cin)
        self.conv = _nd(dim, "Conv")(cin, kw["cout"], kw["k"], 1, kw["k"] // 2)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class Residual(nn.Module):
    def __init__(self, dim, cin, kw):
        super().__init__()
        conv, bn = _nd(dim, "Conv"), _nd(dim, "BatchNorm")
        s, mid, cout = kw["stride"], kw["mid"], kw["cout"]
        layers = [conv(cin, mid, 3, s, 1, bias=not kw["bn"])] + ([bn(mid)] if kw["bn"] else []) + [nn.ReLU()]
        layers += [conv(mid, cout, 3, 1, 1, bias=not kw["bn"])] + ([bn(cout)] if kw["bn"] else [])
        self.body = nn.Sequential(*layers)
        self.proj = None
        if cin != cout or s != 1 or kw["force_proj"]:
            self.proj = nn.Sequential(conv(cin, cout, 1, s, bias=not kw["bn"]), *([bn(cout)] if kw["bn"] else []))
        self.add = kw["add"]

    def forward(self, x):
        short = x if self.proj is None else self.proj(x)
        y = self.body(x)
        if self.add == "torch":
            y = torch.add(y, short)
        elif self.add == "method":
            y = y.add(short)
        else:
            y = y + short
        return F.relu(y)


class Concat(nn.Module):
    def __init__(self, dim, cin, kw):
        super().__init__()
        conv = _nd(dim, "Conv")
        self.branches = nn.ModuleList(
            nn.Sequential(conv(cin, w, k, 1, k // 2), nn.ReLU()) for w, k in zip(kw["widths"], kw["ks"]))
        self.keep_input, self.cat_dim = kw["keep_input"], (1 if kw["positive_dim"] else -(dim + 1))
        self.fn = torch.concat if kw["concat_fn"] else torch.cat
        self.stack_sum = kw.get("stack_sum", False)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.stack_sum:  # SK-Net style: stack the branches, sum them
            return torch.stack(outs, dim=1).sum(1)
        if self.keep_input:
            outs = [x] + outs
        return self.fn(outs, dim=self.cat_dim)


class SplitBlock(nn.Module):
    """Process part of the channels: chunk / split / slicing, then cat, add or GLU."""

    def __init__(self, dim, cin, kw):
        super().__init__()
        conv = _nd(dim, "Conv")
        self.mode, self.combine, self.s, self.c = kw["mode"], kw["combine"], kw["s"], cin
        s, rest = kw["s"], cin - kw["s"]
        if self.combine == "cat":
            self.fa = conv(s, kw["cout"], 3, 1, 1)
        elif self.combine == "cat_both":
            self.fa, self.fb = conv(s, kw["cout"], 3, 1, 1), conv(rest, kw["cout_b"], 1)
        elif self.combine == "add":
            self.fb = conv(rest, rest, 3, 1, 1)

    def forward(self, x):
        if self.mode == "chunk":
            a, b = x.chunk(2, dim=1)
        elif self.mode == "split":
            a, b = torch.split(x, [self.s, self.c - self.s], dim=1)
        elif self.mode == "split_method":
            a, b = x.split([self.s, self.c - self.s], 1)
        else:
            a, b = x[:, : self.s], x[:, self.s:]
        if self.combine == "cat":
            return torch.cat([F.relu(self.fa(a)), b], 1)
        if self.combine == "cat_both":
            return torch.cat([F.relu(self.fa(a)), self.fb(b)], 1)
        if self.combine == "add":
            return a + self.fb(b)
        return a * torch.sigmoid(b)  # glu


class SqueezeExcite(nn.Module):
    def __init__(self, dim, c, kw):
        super().__init__()
        self.dim, self.c, self.gate, self.pool, self.broadcast = dim, c, kw["gate"], kw["pool"], kw["broadcast"]
        self.hard = kw["hard"]
        if kw["gate"] == "conv":
            conv = _nd(dim, "Conv")
            self.fc1, self.fc2 = conv(c, kw["r"], 1), conv(kw["r"], c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, kw["r"]), nn.Linear(kw["r"], c)

    def _sig(self, s):
        return F.hardsigmoid(s) if self.hard else torch.sigmoid(s)

    def forward(self, x):
        spatial = tuple(range(2, 2 + self.dim))
        if self.gate == "conv":
            p = _fn(self.dim, "adaptive_avg_pool")(x, 1) if self.pool == "adaptive" else x.mean(spatial, keepdim=True)
            return x * self._sig(self.fc2(F.relu(self.fc1(p))))
        p = x.mean(spatial) if self.pool != "adaptive" else _fn(self.dim, "adaptive_avg_pool")(x, 1).flatten(1)
        s = self._sig(self.fc2(F.relu(self.fc1(p))))
        ones = (1,) * self.dim
        if self.broadcast == "reshape":
            s = s.reshape(-1, self.c, *ones)
        elif self.broadcast == "view":
            s = s.view(s.size(0), self.c, *ones)
        elif self.broadcast == "unsqueeze":
            for _ in range(self.dim):
                s = s.unsqueeze(-1)
        else:
            s = s[(slice(None), slice(None)) + (None,) * self.dim]
        return x * s


class SEConcatResidual(nn.Module):
    """x + SE(cat(b1(x), b2(x))): an SE-gated concat added to a residual (Inception-ResNet style)."""

    def __init__(self, dim, c, kw):
        super().__init__()
        conv = _nd(dim, "Conv")
        c1 = kw["c1"]
        self.b1, self.b2 = conv(c, c1, 3, 1, 1), conv(c, c - c1, 1)
        self.se = SqueezeExcite(dim, c, {"gate": kw["gate"], "pool": "adaptive", "broadcast": "index", "r": kw["r"],
                                          "hard": False})

    def forward(self, x):
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x))], 1)
        return x + self.se(y)


class Depthwise(nn.Module):
    def __init__(self, dim, c, kw):
        super().__init__()
        conv, bn = _nd(dim, "Conv"), _nd(dim, "BatchNorm")
        m = kw["mult"]
        self.dw = conv(c, c * m, kw["k"], kw["stride"], kw["k"] // 2, groups=c, bias=not kw["bn"])
        self.bn = bn(c * m) if kw["bn"] else None
        self.pw = conv(c * m, kw["pw"], 1) if kw["pw"] else None

    def forward(self, x):
        x = self.dw(x)
        if self.bn is not None:
            x = self.bn(x)
        x = F.relu6(x)
        return self.pw(x) if self.pw is not None else x


class Grouped(nn.Module):
    def __init__(self, dim, c, kw):
        super().__init__()
        self.conv = _nd(dim, "Conv")(c, kw["cout"], 3, 1, 1, groups=kw["groups"])

    def forward(self, x):
        return F.relu(self.conv(x))


class Pool(nn.Module):
    def __init__(self, dim, kind):
        super().__init__()
        self.dim, self.kind = dim, kind
        mods = {"max": (_nd(dim, "MaxPool"), 2), "avg": (_nd(dim, "AvgPool"), 2),
                "adaptive_avg": (_nd(dim, "AdaptiveAvgPool"), 2), "adaptive_max": (_nd(dim, "AdaptiveMaxPool"), 2)}
        self.pool = mods[kind][0](mods[kind][1]) if kind in mods else None
        if kind == "upsample":
            self.pool = nn.Upsample(scale_factor=2)

    def forward(self, x):
        if self.pool is not None:
            return self.pool(x)
        if self.kind == "f_max":
            return _fn(self.dim, "max_pool")(x, 2)
        if self.kind == "f_avg":
            return _fn(self.dim, "avg_pool")(x, kernel_size=2, stride=2)
        if self.kind == "f_interpolate":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.kind == "f_adaptive_avg":
            return _fn(self.dim, "adaptive_avg_pool")(x, 2)
        return _fn(self.dim, "adaptive_max_pool")(x, 2)


class Norm(nn.Module):
    def __init__(self, dim, c, kw):
        super().__init__()
        self.dim, self.kind, self.c, self.g = dim, kw["kind"], c, kw.get("groups", 1)
        k = self.kind
        if k == "instance":
            self.norm = _nd(dim, "InstanceNorm")(c, affine=kw["affine"])
        elif k == "group":
            self.norm = nn.GroupNorm(self.g, c)
        elif k == "layer_cl":
            self.norm = nn.LayerNorm(c)
        elif k in ("f_batch", "f_layer_cl", "f_group"):
            self.weight = nn.Parameter(0.5 + torch.rand(c))
            self.bias = nn.Parameter(0.3 * torch.randn(c))
            if k == "f_batch":
                self.register_buffer("running_mean", 0.3 * torch.randn(c))
                self.register_buffer("running_var", 0.3 + torch.rand(c))

    def _cl(self, x):
        return x.permute(0, 2, 3, 1) if self.dim == 2 else x.transpose(1, 2)

    def _cf(self, x):
        return x.permute(0, 3, 1, 2) if self.dim == 2 else x.transpose(1, 2)

    def forward(self, x):
        k = self.kind
        if k in ("instance", "group"):
            return self.norm(x)
        if k == "layer_cl":
            return self._cf(self.norm(self._cl(x)))
        if k == "f_batch":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)
        if k == "f_layer_cl":
            return self._cf(F.layer_norm(self._cl(x), (self.c,), self.weight, self.bias))
        if k == "f_group":
            return F.group_norm(x, self.g, self.weight, self.bias)
        if k == "f_layer_spatial":  # over the last spatial axis: per channel
            return F.layer_norm(x, x.shape[-1:])
        raise ValueError(k)


class ChannelsLastLinear(nn.Module):
    def __init__(self, dim, c, kw):
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(c, kw["cout"])

    def forward(self, x):
        if self.dim == 2:
            return F.gelu(self.fc(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return F.gelu(self.fc(x.transpose(1, 2))).transpose(1, 2)


class CNNHead(nn.Module):
    def __init__(self, dim, c, L, kw):
        super().__init__()
        self.dim, self.kind = dim, kw["kind"]
        flat = c * L ** dim
        if self.kind == "flatten":
            self.flat = nn.Flatten()
            self.fc = nn.Sequential(nn.Linear(flat, kw["hidden"]), nn.ReLU(), nn.Linear(kw["hidden"], kw["classes"]))
        elif self.kind in ("view", "reshape_shape", "flatten_mul", "torch_flatten"):
            self.fc = nn.Linear(flat, kw["classes"])
        else:
            self.fc = nn.Linear(c, kw["classes"])
        if self.kind == "tuple":  # two outputs: logits and a second head on the pooled features
            self.aux = nn.Linear(c, kw["hidden"])

    def forward(self, x):
        spatial = tuple(range(2, 2 + self.dim))
        k = self.kind
        if k == "gap":
            return self.fc(_fn(self.dim, "adaptive_avg_pool")(x, 1).flatten(1))
        if k == "tuple":
            p = x.mean(spatial)
            return self.fc(p), {"aux": self.aux(p)}
        if k == "torch_flatten":
            return self.fc(torch.flatten(x, 1))
        if k == "flatten":
            return self.fc(self.flat(x))
        if k == "view":
            return self.fc(x.contiguous().view(x.size(0), -1))
        if k == "reshape_shape":
            return self.fc(x.reshape(x.shape[0], -1))
        if k == "flatten_mul":
            if self.dim == 2:
                B, C, H, W = x.shape
                return self.fc(x.reshape(B, C * H * W))
            B, C, L = x.shape
            return self.fc(x.reshape(B, C * L))
        if k == "mean":
            return self.fc(x.mean(spatial))
        return self.fc(x.amax(spatial))  # amax


CNN_KINDS = ("conv", "preact", "residual", "concat", "split", "se", "se_cat_res", "dw", "grouped", "pool", "norm",
             "cl_linear")
CNN_WEIGHTS = (4, 1, 3, 2, 2, 2, 1, 2, 1, 2, 2, 1)


def cnn_shape(kind, kw, c, L):
    if kind == "conv":
        return kw["cout"], conv_len(L, kw["k"], kw["stride"])
    if kind in ("preact", "grouped", "cl_linear"):
        return kw["cout"], L
    if kind == "residual":
        return kw["cout"], conv_len(L, 3, kw["stride"])
    if kind == "concat":
        if kw.get("stack_sum"):
            return kw["widths"][0], L
        return sum(kw["widths"]) + (c if kw["keep_input"] else 0), L
    if kind == "split":
        s, rest = kw["s"], c - kw["s"]
        return {"cat": kw.get("cout", 0) + rest, "cat_both": kw.get("cout", 0) + kw.get("cout_b", 0),
                "add": s, "glu": s}[kw["combine"]], L
    if kind == "dw":
        return (kw["pw"] or c * kw["mult"]), conv_len(L, kw["k"], kw["stride"])
    if kind == "pool":
        if kw["kind"] in ("upsample", "f_interpolate"):
            return c, 2 * L
        return c, (2 if "adaptive" in kw["kind"] else L // 2)
    return c, L  # se, se_cat_res, norm, unknown


def draw_cnn_block(d, kind, c, L, ch):
    if kind == "conv":
        return {"cout": ch(), "k": d.choice([1, 3, 5] if L >= 3 else [1]), "stride": d.choice([1, 2]) if L >= 4 else 1,
                "bn": d.bool(), "bias": d.bool(), "act": d.choice(ACTIVATIONS + ("prelu",)), "functional": d.bool(0.3),
                "dilation": d.choice([1, 1, 2]), "bn_affine": d.bool(0.85), "prelu_per_feature": d.bool()}
    if kind == "preact":
        return {"cout": ch(), "k": d.choice([1, 3])}
    if kind == "residual":
        return {"mid": ch(), "cout": d.choice([c, c, ch()]), "stride": d.choice([1, 1, 2]) if L >= 4 else 1,
                "bn": d.bool(), "add": d.choice(["op", "torch", "method"]), "force_proj": d.bool(0.2)}
    if kind == "concat":
        n = d.int(2, 3)
        kw = {"widths": [ch() for _ in range(n)], "ks": [d.choice([1, 3]) for _ in range(n)],
              "keep_input": d.bool(0.3), "positive_dim": d.bool(0.7), "concat_fn": d.bool(0.2), "stack_sum": d.bool(0.2)}
        if kw["stack_sum"]:
            kw["widths"], kw["keep_input"] = [kw["widths"][0]] * n, False
        return kw
    if kind == "split":
        mode = d.choice(["chunk", "split", "split_method", "slice"])
        s = (c + 1) // 2 if mode == "chunk" else d.int(1, c - 1)
        combines = ["cat", "cat_both"] + (["add", "glu"] if 2 * s == c else [])
        kw = {"mode": mode, "s": s, "combine": d.choice(combines)}
        if kw["combine"] in ("cat", "cat_both"):
            kw["cout"] = ch()
        if kw["combine"] == "cat_both":
            kw["cout_b"] = ch()
        return kw
    if kind == "se":
        gate = d.choice(["conv", "linear"])
        return {"r": d.int(1, 4), "gate": gate, "pool": d.choice(["adaptive", "mean"]),
                "broadcast": d.choice(["reshape", "view", "unsqueeze", "index"]), "hard": d.bool(0.3)}
    if kind == "se_cat_res":
        return {"c1": d.int(1, c - 1), "r": d.int(1, 3), "gate": d.choice(["conv", "linear"])}
    if kind == "dw":
        return {"mult": d.choice([1, 1, 2]), "k": d.choice([3, 5]) if L >= 3 else 1,
                "stride": d.choice([1, 2]) if L >= 4 else 1, "bn": d.bool(), "pw": d.choice([0, ch()])}
    if kind == "grouped":
        divisors = [g for g in (2, 3, 4) if c % g == 0]
        g = d.choice(divisors)
        return {"groups": g, "cout": g * d.int(1, 3)}
    if kind == "pool":
        kinds = ["adaptive_avg", "adaptive_max", "f_adaptive_avg", "f_adaptive_max"]
        if L >= 4:
            kinds += ["max", "avg", "f_max", "f_avg"]
        if L <= 6:
            kinds += ["upsample", "f_interpolate"]
        return {"kind": d.choice(kinds)}
    if kind == "norm":
        nk = d.choice(["instance", "group", "layer_cl", "f_batch", "f_layer_cl", "f_group", "f_layer_spatial"])
        kw = {"kind": nk}
        if nk == "instance":
            kw["affine"] = d.bool()
        if nk in ("group", "f_group"):
            kw["groups"] = d.choice([g for g in (1, 2, 3, c) if c % g == 0])
        return kw
    if kind == "cl_linear":
        return {"cout": ch()}
    raise ValueError(kind)


def cross_norm_block(kind, kw, c) -> bool:
    """A normalisation across channels (LayerNorm / GroupNorm over a widened axis)."""
    if kind != "norm":
        return False
    return kw["kind"] in ("layer_cl", "f_layer_cl") or (kw["kind"] in ("group", "f_group") and kw["groups"] != c)


def draw_cnn(d, dim: int, unknown: bool = False) -> dict:
    maxc = 8
    ch = lambda: d.int(1, maxc)
    c = d.int(1, 3)
    L = d.choice([6, 8, 9] if dim == 2 else [8, 12, 16])
    cfg = {"kind": "cnn", "dim": dim, "in_channels": c, "size": L, "blocks": [], "cross_norm": False}
    for i in range(d.int(1, 5)):
        ok = {"conv": True, "preact": True, "residual": True, "concat": True, "split": c >= 2, "se": True,
              "se_cat_res": c >= 2, "dw": True, "grouped": any(c % g == 0 for g in (2, 3, 4)), "pool": L >= 2,
              "norm": True, "cl_linear": True}
        kinds = [k for k in CNN_KINDS if ok[k]]
        # the stem is a conv: a per-channel op on the network input is a known bug
        # (tests/test_invariants.py::test_known_bug_budget_two_with_batchnorm_on_the_input)
        kind = "conv" if i == 0 else d.choice(kinds, [CNN_WEIGHTS[CNN_KINDS.index(k)] for k in kinds])
        kw = draw_cnn_block(d, kind, c, L, ch)
        cfg["cross_norm"] |= cross_norm_block(kind, kw, c)
        c, L = cnn_shape(kind, kw, c, L)
        cfg["blocks"].append([kind, kw])
    cfg["head"] = {"kind": d.choice(["gap", "flatten", "view", "reshape_shape", "flatten_mul", "torch_flatten", "mean",
                                     "amax", "tuple"]),
                   "classes": d.int(1, 5), "hidden": d.int(1, 6)}
    if unknown:
        def where(i):
            c, L = cfg["in_channels"], cfg["size"]
            for kind, kw in cfg["blocks"][: i + 1]:
                c, L = cnn_shape(kind, kw, c, L)
            return "cf", 2 + dim, [0, c] + [L] * dim
        _insert_unknowns(d, cfg, where)
    return cfg


class CNN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg["dim"]
        c, L = cfg["in_channels"], cfg["size"]
        self.blocks = nn.ModuleList()
        builders = {"conv": ConvAct, "preact": PreAct, "residual": Residual, "concat": Concat, "split": SplitBlock,
                    "se": SqueezeExcite, "se_cat_res": SEConcatResidual, "dw": Depthwise, "grouped": Grouped,
                    "norm": Norm, "cl_linear": ChannelsLastLinear}
        for kind, kw in cfg["blocks"]:
            if kind == "pool":
                self.blocks.append(Pool(dim, kw["kind"]))
            elif kind == "unknown":
                axis_dim = unknown_dim(kw["axis"], "cf", 2 + dim)
                self.blocks.append(Unknown(kw["op"], axis_dim, c if axis_dim == 1 else L, kw["seed"]))
            else:
                self.blocks.append(builders[kind](dim, c, kw))
            c, L = cnn_shape(kind, kw, c, L)
        self.head = CNNHead(dim, c, L, cfg["head"])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


# =========================================================================== transformers
class Attention(nn.Module):
    def __init__(self, D, kw):
        super().__init__()
        self.style, self.sdpa, self.heads = kw["style"], kw["sdpa"], kw["heads"]
        self.head_dim = D // self.heads
        self.scale = self.head_dim ** -0.5
        self.merge_heads = kw["merge_heads"]
        self.scale_from_size = kw.get("scale_from_size", False)
        if self.style.startswith("fused"):
            self.qkv = nn.Linear(D, 3 * D, bias=kw["bias"])
        elif self.style.startswith("separate"):
            self.q, self.k, self.v = (nn.Linear(D, D, bias=kw["bias"]) for _ in range(3))
        else:
            self.mha = nn.MultiheadAttention(D, self.heads, bias=kw["bias"], batch_first=self.style == "mha")
        if not self.style.startswith("mha"):
            self.proj = nn.Linear(D, D)

    def forward(self, x, mask=None):
        """mask: (B, N) bool, True for tokens that may be attended to."""
        if self.style == "mha":
            return self.mha(x, x, x, need_weights=False, key_padding_mask=None if mask is None else ~mask)[0]
        if self.style == "mha_seq":
            t = x.transpose(0, 1)
            return self.mha(t, t, t, key_padding_mask=None if mask is None else ~mask)[0].transpose(0, 1)
        B, N, C = x.shape
        if self.style == "fused":
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        elif self.style == "fused_const":
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.style == "separate":
            q = self.q(x).reshape(B, N, self.heads, -1).transpose(1, 2)
            k = self.k(x).reshape(B, N, self.heads, -1).transpose(1, 2)
            v = self.v(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        else:  # separate_view
            q = self.q(x).view(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
            k = self.k(x).view(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
            v = self.v(x).view(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        m = None if mask is None else mask[:, None, None, :]
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            scale = q.size(-1) ** -0.5 if self.scale_from_size else self.scale
            attn = (q @ k.transpose(-2, -1)) * scale
            if m is not None:
                attn = attn.masked_fill(~m, float("-inf"))
            attn = attn.softmax(dim=-1)
            y = attn @ v
        y = y.transpose(1, 2)
        if self.merge_heads == "reshape_C":
            y = y.reshape(B, N, C)
        elif self.merge_heads == "reshape_mul":
            y = y.reshape(B, N, self.heads * self.head_dim)
        else:
            y = y.flatten(2)
        return self.proj(y)


class TMLP(nn.Module):
    def __init__(self, D, hidden, act, dropout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, hidden), nn.Linear(hidden, D)
        self.act = MODULE_ACT[act]()
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TBlock(nn.Module):
    def __init__(self, D, kw, norm, norm_kind):
        super().__init__()
        self.norm = norm
        self.attn = Attention(D, kw)
        self.mlp = TMLP(D, kw["hidden"], kw["act"], kw["dropout"])
        if norm != "none":
            make = (lambda: nn.RMSNorm(D)) if norm_kind == "rms" else (lambda: nn.LayerNorm(D))
            self.n1, self.n2 = make(), make()

    def forward(self, x, mask=None):
        if self.norm == "pre":
            x = x + self.attn(self.n1(x), mask)
            return x + self.mlp(self.n2(x))
        if self.norm == "post":
            x = self.n1(x + self.attn(x, mask))
            return self.n2(x + self.mlp(x))
        x = x + self.attn(x, mask)
        return x + self.mlp(x)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg["heads"] * cfg["head_dim"]
        self.cfg = cfg
        self.stem, self.p = cfg["stem"], cfg.get("patch", 1)
        if self.stem == "embed":
            self.embed = nn.Embedding(cfg["vocab"], D)
        elif self.stem == "tokens":
            self.embed = nn.Linear(cfg["in"], D)
        elif self.stem == "patch_linear":
            self.embed = nn.Linear(cfg["in_channels"] * self.p ** 2, D)
        else:
            self.embed = nn.Conv2d(cfg["in_channels"], D, self.p, self.p)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, D)) if cfg["cls"] else None
        n = cfg["tokens"] + (1 if cfg["cls"] else 0)
        self.pos = nn.Parameter(0.5 * torch.randn(1, n, D)) if cfg["pos"] else None
        self.blocks = nn.ModuleList()
        for kind, kw in cfg["blocks"]:
            if kind == "block":
                self.blocks.append(TBlock(D, kw, cfg["norm"], cfg["norm_kind"]))
            else:
                self.blocks.append(Unknown(kw["op"], unknown_dim(kw["axis"], "fl", 3), D if kw["axis"] != "other" else n,
                                           kw["seed"]))
        self.final = nn.LayerNorm(D) if cfg["norm"] != "none" and cfg["final_norm"] else None
        self.head_kind = cfg["head"]
        self.head = nn.Linear(D, cfg["classes"], bias=not cfg.get("tied"))
        if cfg.get("tied"):  # weight tying: the head reuses the embedding matrix
            self.head.weight = self.embed.weight
        self.masked = cfg.get("mask", False)

    def forward(self, x, mask=None):
        if not self.masked:  # (an fx placeholder is never None: decide on the config)
            mask = None
        if self.stem == "patch_linear":
            B, C, H, W = x.shape
            p = self.p
            x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
            x = x.reshape(B, (H // p) * (W // p), C * p * p)
            x = self.embed(x)
        elif self.stem == "patch_conv":
            x = self.embed(x).flatten(2).transpose(1, 2)
        else:
            x = self.embed(x)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos is not None:
            x = x + self.pos
        if mask is not None and self.cls is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        for b in self.blocks:
            x = b(x, mask) if isinstance(b, TBlock) else b(x)
        if self.final is not None:
            x = self.final(x)
        if self.head_kind == "cls":
            x = x[:, 0]
        elif self.head_kind == "mean":
            x = x.mean(1)
        elif self.head_kind == "mean_patches":
            B, N, C = x.shape
            x = x[:, 1:].reshape(B, N - 1, C).mean(dim=1)
        return self.head(x)


def draw_transformer(d, unknown: bool = False) -> dict:
    heads, head_dim = d.choice([1, 2, 3, 4], [1, 3, 3, 1]), d.choice([1, 2, 3, 4], [1, 2, 2, 2])
    stem = d.choice(["embed", "tokens", "patch_linear", "patch_conv"])
    cfg = {"kind": "transformer", "heads": heads, "head_dim": head_dim, "stem": stem,
           "norm": d.choice(["pre", "post", "none"], [3, 1, 3]), "norm_kind": d.choice(["ln", "rms"], [4, 1]),
           "final_norm": d.bool(0.7), "cls": d.bool(), "pos": d.bool(0.7), "classes": d.int(1, 5), "blocks": []}
    if stem == "embed":
        cfg["vocab"], cfg["tokens"] = d.int(5, 20), d.int(2, 6)
    elif stem == "tokens":
        cfg["in"], cfg["tokens"] = d.int(1, 6), d.int(2, 6)
    else:
        cfg["in_channels"], cfg["patch"], grid = d.int(1, 3), d.choice([1, 2]), d.int(2, 3)
        cfg["image"] = grid * cfg["patch"]
        cfg["tokens"] = grid * grid
    heads_opts = ["cls", "mean", "mean_patches", "tokens"] if cfg["cls"] else ["mean", "tokens"]
    cfg["head"] = d.choice(heads_opts)
    cfg["mask"] = d.bool(0.15)
    if stem == "embed" and cfg["head"] == "tokens" and d.bool(0.4):
        cfg["tied"], cfg["classes"] = True, cfg["vocab"]
    for _ in range(d.int(1, 2)):
        kw = {"style": d.choice(["fused", "fused_const", "separate", "separate_view", "mha", "mha_seq"], [3, 2, 2, 1, 2, 1]),
              "sdpa": d.bool(), "bias": d.bool(0.8), "merge_heads": d.choice(["reshape_C", "reshape_mul", "flatten"]),
              "scale_from_size": d.bool(0.3),
              "hidden": d.int(1, 8), "act": d.choice(["gelu", "relu", "silu"]), "dropout": d.bool(0.3), "heads": heads}
        cfg["blocks"].append(["block", kw])
    cfg["cross_norm"] = cfg["norm"] != "none"
    if unknown:
        n = cfg["tokens"] + (1 if cfg["cls"] else 0)
        _insert_unknowns(d, cfg, lambda i: ("fl", 3, [0, n, heads * head_dim]))
    return cfg


# =========================================================================== nets
def draw_config(category: str, d) -> dict:
    if category == "mlp":
        cfg = draw_mlp(d)
    elif category in ("cnn1d", "cnn2d"):
        cfg = draw_cnn(d, 1 if category == "cnn1d" else 2)
    elif category == "transformer":
        cfg = draw_transformer(d)
    elif category == "unknown":
        base = d.choice(["mlp", "cnn1d", "cnn2d", "transformer"], [1, 1, 2, 1])
        if base == "mlp":
            cfg = draw_mlp(d, unknown=True)
        elif base == "transformer":
            cfg = draw_transformer(d, unknown=True)
        else:
            cfg = draw_cnn(d, 1 if base == "cnn1d" else 2, unknown=True)
    else:
        raise ValueError(category)
    cfg["category"] = category
    cfg["float64"] = category != "transformer" and d.bool(0.08)
    return cfg


# Known bugs (found by this campaign) a config can be kept clear of: a rewrite of the drawn
# config that uses no randomness, so a seed keeps its architecture otherwise. For test runs that
# look for new bugs; `known_bug_tags` recognises them in a record.
KNOWN_BUGS = {
    "traced_head_size": "passes/widen.py _rewrite_sizes keeps a reshape/view size computed from x.shape "
                        "(C // heads, C) symbolic on an axis whose width does not change while the axis it "
                        "is read from is widened: the merged graph fails its own shape check",
    "shared_scalar": "a parameter with no feature axis (PReLU with one shared slope, a ReZero-style scalar "
                     "gate) is averaged between the models, so budget 2 is not the ensemble",
    "tied_weights": "passes/verify.py permute_model permutes a tied (aliased) parameter once per name, "
                    "so the permuted copy of a net with tied embeddings computes another function",
    "spatial_matmul": "conv / pooling / upsampling handlers do not freeze their input's spatial axes, so a "
                      "spatial axis made permutable by a matmul with a buffer is permuted (unsound) or widened",
    "dead_unit_tie": "activation matching ties on units that are dead at every matching site (a group "
                     "measured only after a ReLU: its pre-activation tensors hold several segments)",
}
AVOIDABLE_BUGS = ("traced_head_size", "shared_scalar", "tied_weights", "spatial_matmul")


def avoid_known_bugs(cfg: dict, avoid=AVOIDABLE_BUGS) -> dict:
    cfg = copy.deepcopy(cfg)
    if "tied_weights" in avoid:
        cfg.pop("tied", None)
    for kind, kw in cfg.get("blocks", []):
        if "shared_scalar" in avoid and kw.get("act") == "prelu" and (
                not kw.get("prelu_per_feature") or kw.get("w", kw.get("cout")) == 1):
            kw["act"] = "leaky"
        if "traced_head_size" in avoid and kind == "block":
            kw["style"] = {"fused": "fused_const", "separate_view": "separate"}.get(kw["style"], kw["style"])
            if kw["merge_heads"] == "reshape_C":
                kw["merge_heads"] = "reshape_mul"
        if "spatial_matmul" in avoid and kind == "unknown" and kw["op"] == "matmul_buffer" and cfg["kind"] == "cnn":
            kw["op"] = "roll"
    return cfg


def known_bug_tags(rec: dict) -> list[str]:
    """The known bugs a non-ok record looks like (a heuristic on its config and failures)."""
    cfg = rec["config"]
    failed = {c["check"] for c in rec["checks"] if not c["ok"]}
    tags = []
    if any("ShapeProp error" in e["message"] and "attn" in e["message"] for e in rec["errors"]):
        tags.append("traced_head_size")
    blocks = cfg.get("blocks", [])
    if failed & {"ensemble@2", "ensemble@2_other_batch"} and any(
            kw.get("act") == "prelu" and (not kw.get("prelu_per_feature") or kw.get("w", kw.get("cout")) == 1)
            for _, kw in blocks):
        tags.append("shared_scalar")
    if cfg.get("tied") and "soundness" in failed:
        tags.append("tied_weights")
    if cfg["kind"] == "cnn" and any(k == "unknown" and kw["op"] == "matmul_buffer" for k, kw in blocks) and (
            "soundness" in failed or rec["errors"]):
        tags.append("spatial_matmul")
    return tags


def config_for(seed: int, category: str, avoid=()) -> dict:
    cfg = draw_config(category, RngDraw(seed, category))
    return avoid_known_bugs(cfg, avoid) if avoid else cfg


def randomize_state(model: nn.Module, seed: int) -> None:
    """Random running statistics and affine parameters for every normalisation (their default
    state is nearly the identity, which would hide bugs in how they are mapped)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.3 + 1.7 * torch.rand(m.num_features, generator=gen))
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, nn.Parameter):
                    w.copy_(0.5 + torch.rand(w.shape, generator=gen))
                if isinstance(b, nn.Parameter):
                    b.copy_(0.3 * torch.randn(b.shape, generator=gen))


def build(cfg: dict, seed: int) -> nn.Module:
    """Model of architecture cfg, initialised from seed, in eval mode. Nets with a custom leaf
    module are returned as a GraphModule traced with FuzzTracer (the leaf stays a call_module)."""
    torch.manual_seed(seed)
    kind = cfg["kind"]
    model = MLP(cfg) if kind == "mlp" else CNN(cfg) if kind == "cnn" else Transformer(cfg)
    randomize_state(model, seed)
    if cfg.get("float64"):
        model = model.double()
    model.eval()
    if any(k == "unknown" and kw["op"] == "leaf" for k, kw in cfg["blocks"]):
        graph = FuzzTracer().trace(model)
        model = fx.GraphModule(model, graph, class_name=type(model).__name__).eval()
    return model


def inputs(cfg: dict, seed: int, batch: int):
    """One input batch for the net."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if cfg.get("float64") else torch.float32
    if cfg["kind"] == "mlp":
        return torch.randn(batch, cfg["in"], generator=gen, dtype=dtype)
    if cfg["kind"] == "cnn":
        return torch.randn(batch, cfg["in_channels"], *[cfg["size"]] * cfg["dim"], generator=gen, dtype=dtype)
    if cfg["stem"] == "embed":
        x = torch.randint(0, cfg["vocab"], (batch, cfg["tokens"]), generator=gen)
    elif cfg["stem"] == "tokens":
        x = torch.randn(batch, cfg["tokens"], cfg["in"], generator=gen, dtype=dtype)
    else:
        x = torch.randn(batch, cfg["in_channels"], cfg["image"], cfg["image"], generator=gen, dtype=dtype)
    if not cfg.get("mask"):
        return x
    mask = torch.rand(batch, cfg["tokens"], generator=gen) < 0.7
    mask[:, 0] = True  # every query attends to at least one token
    return x, mask


# =========================================================================== the checks
class Record(dict):
    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    def error(self, name: str, exc: BaseException, outcome: str) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in reversed(tb)
                      if f.filename.startswith(ROOT) and "fuzz_nets" not in f.filename), "")
        self["errors"].append({"check": name, "outcome": outcome, "type": type(exc).__name__,
                               "message": " ".join(str(exc).split())[:500], "where": where})


FRONT_DOOR = {"check_budgets", "checked_batches", "as_args", "validated"}


def classify(exc: BaseException) -> str:
    """'refused' for a documented user-facing error raised at the front door: a TraceError
    because torch.fx cannot trace the model, or the budget / data checks. Anything else is
    'internal' (a TraceError raised while verifying the merged graph blames the user's model
    for the compiler's fault; the nets here run on their inputs and their two copies have the
    same architecture)."""
    if not isinstance(exc, PleasError) or isinstance(exc, InternalError):
        return "internal"
    raised_in = traceback.extract_tb(exc.__traceback__)[-1].name
    if isinstance(exc, TraceError) and raised_in == "trace_model" and "could not be traced" in str(exc):
        return "refused"
    return "refused" if raised_in in FRONT_DOOR else "internal"


def _run(model, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def _args(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _mean(a, b):
    """The ensemble of two (nested) outputs."""
    if torch.is_tensor(a):
        return 0.5 * (a + b)
    if isinstance(a, dict):
        return {k: _mean(a[k], b[k]) for k in a}
    return type(a)(_mean(u, v) for u, v in zip(a, b))


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))


def _finite(out) -> bool:
    if torch.is_tensor(out):
        return bool(torch.isfinite(out).all())
    if isinstance(out, dict):
        return all(_finite(o) for o in out.values())
    return all(_finite(o) for o in out)


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        torch.equal(a[k], b[k]) for k in a)


def hidden_frozen(spec) -> tuple[int, int, list[str]]:
    """(hidden units, frozen hidden units, reasons): top-level groups that are not
    structurally fixed (network input/output, batch, spatial, ...)."""
    total = frozen = 0
    reasons: list[str] = []
    for g in spec.groups.values():
        if g.parent is not None:
            continue
        structural = any(r.structural for r in g.reasons)
        if g.frozen and structural:
            continue
        total += g.size
        if g.frozen:
            frozen += g.size
            reasons.extend(g.reasons)
    return total, frozen, reasons


def run_net(seed: int, category: str | None = None, budgets=(1.0, 1.5, 2.0), cfg: dict | None = None,
            weight_seed: int | None = None) -> Record:
    """Build one net and run every check on it; returns its record."""
    torch.set_num_threads(1)
    category = category or CATEGORIES[seed % len(CATEGORIES)]
    cfg = cfg if cfg is not None else config_for(seed, category)
    ws = 2 * seed if weight_seed is None else weight_seed
    rec = Record(seed=seed, category=category, config=cfg, outcome="ok", checks=[], errors=[], ensemble="not run",
                 params={}, hidden=None, frozen_hidden=None, frozen_reasons=[], merge_frozen=[], seconds=0.0)
    t0 = time.perf_counter()
    budgets = sorted(set(float(b) for b in budgets))
    merge = lambda a, b, bud: pleas_fx.merge(a, b, x, bud, data, progress=False)
    try:
        model_a, model_b = build(cfg, ws), build(cfg, ws + 1)
        x, x_other = inputs(cfg, 3 * seed, 4), inputs(cfg, 3 * seed + 1, 5)
        data = [inputs(cfg, 3 * seed + 2 + 7 * i, 8) for i in range(2)]
        ref_a, ref_a_other = _run(model_a, x), _run(model_a, x_other)
        ref_b, ref_b_other = _run(model_b, x), _run(model_b, x_other)
        if not all(_finite(r) for r in (ref_a, ref_a_other, ref_b, ref_b_other)):
            raise ValueError("the model's output is not finite")
    except Exception as exc:  # a generator bug, not a library one
        rec.error("build", exc, "invalid")
        rec["outcome"] = "invalid"
        return rec

    # ---------------------------------------------------------------- a. self-merge
    spec = gm = None
    try:
        gm = trace_model(model_a, "model")
        propagate_shapes(gm, _args(x))
        spec = infer_groups(gm)
    except Exception as exc:
        if isinstance(exc, TraceError) and "could not be traced" in str(exc):
            # confirm the library itself refuses it, with a user-facing error
            try:
                merge(model_a, model_b, 1.0)
                rec.check("refuses_untraceable", False, "merge succeeded on a model trace_model rejects")
            except Exception as exc2:
                rec.error("merge", exc2, classify(exc2))
            rec["seconds"] = time.perf_counter() - t0
            return _finish(rec)
        rec.error("infer_groups", exc, "internal")
    if spec is not None:
        total, frozen, reasons = hidden_frozen(spec)
        rec["hidden"], rec["frozen_hidden"], rec["frozen_reasons"] = total, frozen, sorted(set(reasons))
        try:
            permuted = permute_model(gm, spec, random_permutations(spec, seed + 1))
            err = relative_error(_run(permuted, x), ref_a)
            rec.check("soundness", err < SOUND_TOL, f"permuted copy differs from the model: rel err {err:.3g}")
        except Exception as exc:
            rec.error("permute", exc, "internal")
            permuted = None
        if permuted is not None:
            before_a, before_p = _state(model_a), _state(permuted)
            try:
                merged = merge(model_a, permuted, 1.0)
                err = relative_error(_run(merged, x), ref_a)
                rec.check("self_merge", err < SELF_TOL, f"self-merge differs from the model: rel err {err:.3g}")
                err = relative_error(_run(merged, x_other), ref_a_other)
                rec.check("self_merge_other_batch", err < SELF_TOL,
                          f"self-merge differs from the model on a batch of 5: rel err {err:.3g}")
            except Exception as exc:
                rec.error("self_merge", exc, classify(exc))
            rec.check("self_merge_inputs_unchanged", _same_state(before_a, _state(model_a)) and
                      _same_state(before_p, _state(permuted)), "merge modified its inputs")

    # ---------------------------------------------------------------- b. merge A and B
    before_a, before_b = _state(model_a), _state(model_b)
    merged_list = None
    try:
        merged_list = merge(model_a, model_b, budgets)
    except Exception as exc:
        rec.error("merge", exc, classify(exc))
    rec.check("inputs_unchanged", _same_state(before_a, _state(model_a)) and _same_state(before_b, _state(model_b)),
              "merge modified model_a or model_b")
    if merged_list is not None:
        one = sum(p.numel() for p in model_a.parameters())
        outs = []
        for b, m in zip(budgets, merged_list):
            try:
                out, out_other = _run(m, x), _run(m, x_other)
            except Exception as exc:
                rec.error(f"run_merged@{b:g}", exc, "internal")
                outs.append(None)
                continue
            outs.append((out, out_other))
            rec.check(f"finite@{b:g}", _finite(out) and _finite(out_other), "merged output is not finite")
            r = m.meta["pleas_fx"]
            rec["params"][f"{b:g}"] = {"stored": sum(p.numel() for p in m.parameters()) / max(one, 1),
                                       "achieved": r["achieved_budget"]}
            rec["merge_frozen"] = sorted({f["reason"] for f in r["frozen"]})
            if b == 2.0:
                if spec is None:
                    rec["ensemble"] = "not checked (no groups)"
                elif rec["frozen_hidden"]:
                    rec["ensemble"] = "not checked (frozen)"
                elif cfg.get("cross_norm"):
                    rec["ensemble"] = "not checked (norm across channels)"
                else:
                    err = relative_error(out, _mean(ref_a, ref_b))
                    err2 = relative_error(out_other, _mean(ref_a_other, ref_b_other))
                    ok = rec.check("ensemble@2", err < ENSEMBLE_TOL, f"budget 2 is not the ensemble: rel err {err:.3g}")
                    if ok:
                        rec.check("ensemble@2_other_batch", err2 < ENSEMBLE_TOL,
                                  f"budget 2 is not the ensemble on a batch of 5: rel err {err2:.3g}")
                    rec["ensemble"] = "ok" if ok and err2 < ENSEMBLE_TOL else "failed"
        # determinism
        try:
            again = merge(model_a, model_b, budgets)
            for b, m, o in zip(budgets, again, outs):
                if o is None:
                    continue
                o2 = _run(m, x)
                same = _equal(o2, o[0])
                rec.check(f"deterministic@{b:g}", same,
                          "" if same else f"a second merge differs: rel err {relative_error(o2, o[0]):.3g}")
        except Exception as exc:
            rec.error("merge_again", exc, classify(exc))
    rec["seconds"] = time.perf_counter() - t0
    return _finish(rec)


def _finish(rec: Record) -> Record:
    outcomes = [e["outcome"] for e in rec["errors"]]
    if "internal" in outcomes:
        rec["outcome"] = "internal"
    elif any(not c["ok"] for c in rec["checks"]):
        rec["outcome"] = "wrong"
    elif "refused" in outcomes:
        rec["outcome"] = "refused"
    else:
        rec["outcome"] = "ok"
    return rec


def failures(rec: dict) -> list[str]:
    """One line per failed check or error of a record (with the known bugs it looks like)."""
    lines = []
    for e in rec["errors"]:
        if e["outcome"] != "refused" or rec["outcome"] == "refused":
            lines.append(f"seed {rec['seed']:>5} {rec['category']:<11} {e['outcome']:<8} {e['check']:<24} "
                         f"{e['type']}: {e['message'][:160]}" + (f"  [{e['where']}]" if e["where"] else ""))
    for c in rec["checks"]:
        if not c["ok"]:
            lines.append(f"seed {rec['seed']:>5} {rec['category']:<11} {'wrong':<8} {c['check']:<24} {c['detail']}")
    tags = known_bug_tags(rec) if rec["outcome"] in ("internal", "wrong") else []
    return [line + f"  (known: {', '.join(tags)})" if tags else line for line in lines]


def failure_classes(records: list[dict]) -> str:
    """Non-ok nets per known bug (heuristic tags; 'unrecognised' for the rest)."""
    by_tag = defaultdict(list)
    for r in records:
        if r["outcome"] in ("internal", "wrong"):
            for tag in known_bug_tags(r) or ["unrecognised"]:
                by_tag[tag].append(r)
    lines = []
    for tag, rs in sorted(by_tag.items(), key=lambda kv: -len(kv[1])):
        cats = Counter(r["category"] for r in rs)
        lines.append(f"{tag:<18} {len(rs):>4} nets, smallest seed {min(r['seed'] for r in rs):>5}; "
                     + ", ".join(f"{c} {n}" for c, n in cats.most_common())
                     + (f": {KNOWN_BUGS[tag]}" if tag in KNOWN_BUGS else ""))
    return "\n".join(lines)


# =========================================================================== the campaign
OUTCOMES = ("ok", "refused", "internal", "wrong", "invalid")


def summary(records: list[dict]) -> str:
    cats = [c for c in CATEGORIES if any(r["category"] == c for r in records)]
    counts = defaultdict(Counter)
    for r in records:
        counts[r["category"]][r["outcome"]] += 1
    outcomes = [o for o in OUTCOMES if o != "invalid" or any(r["outcome"] == "invalid" for r in records)]
    lines = [f"{'category':<12}" + "".join(f"{o:>10}" for o in outcomes) + f"{'total':>8}"
             + f"{'frozen share':>14}{'nets w/ frozen':>16}{'ens. checked':>14}{'stored@2':>10}"]
    for c in cats + ["all"]:
        rs = [r for r in records if c == "all" or r["category"] == c]
        row = Counter(r["outcome"] for r in rs)
        hidden = sum(r["hidden"] or 0 for r in rs)
        frozen = sum(r["frozen_hidden"] or 0 for r in rs)
        with_frozen = sum(1 for r in rs if r["frozen_hidden"])
        with_spec = sum(1 for r in rs if r["hidden"] is not None)
        checked = sum(1 for r in rs if r["ensemble"] in ("ok", "failed"))
        stored = [r["params"]["2"]["stored"] for r in rs if "2" in r["params"]]
        lines.append(f"{c:<12}" + "".join(f"{row[o]:>10}" for o in outcomes) + f"{len(rs):>8}"
                     + f"{(frozen / hidden if hidden else 0):>14.1%}"
                     + f"{f'{with_frozen}/{with_spec}':>16}{f'{checked}/{len(rs)}':>14}"
                     + (f"{np.mean(stored):>10.2f}" if stored else f"{'-':>10}"))
    return "\n".join(lines)


def frozen_reason_table(records: list[dict], top: int = 8) -> str:
    lines = []
    for c in CATEGORIES:
        reasons = Counter()
        for r in records:
            if r["category"] == c:
                for why in r["frozen_reasons"]:
                    reasons[_normalise(why)] += 1
        if reasons:
            lines.append(f"{c}: " + "; ".join(f"{n}x {w}" for w, n in reasons.most_common(top)))
    return "\n".join(lines)


def _normalise(reason: str) -> str:
    import re
    reason = re.sub(r" at \S+ \(.*?\)$", "", reason)
    reason = re.sub(r"\(([a-z_]+[._])*[a-z_]*\d*\)", "", reason)
    return re.sub(r"\[.*?\]", "[...]", reason)[:90]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="number of nets")
    p.add_argument("--seed", type=int, default=0, help="first seed (net i has seed SEED + i)")
    p.add_argument("--budgets", default="1,1.5,2", help="comma-separated budgets for the A/B merge")
    p.add_argument("--only", choices=CATEGORIES, help="draw every net from this category")
    p.add_argument("--verbose", action="store_true", help="print each net's config and result")
    p.add_argument("--json", metavar="OUT", help="write all records to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import logging
    import warnings
    logging.getLogger("pleas_fx").setLevel(logging.ERROR)
    logging.getLogger("passes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    budgets = [float(b) for b in args.budgets.split(",")]
    records = []
    start = time.perf_counter()
    for i in range(args.n):
        seed = args.seed + i
        rec = run_net(seed, args.only, budgets)
        records.append(rec)
        if args.verbose:
            print(f"seed {seed} {rec['category']}: {rec['outcome']} ({rec['seconds']:.1f}s, ensemble: {rec['ensemble']})")
            print("  config:", json.dumps(rec["config"]))
            for line in failures(rec):
                print("  " + line)
        elif (i + 1) % 50 == 0:
            c = Counter(r["outcome"] for r in records)
            print(f"[{i + 1}/{args.n}] {dict(c)} {time.perf_counter() - start:.0f}s", flush=True)
    wall = time.perf_counter() - start
    print()
    print(summary(records))
    print("\nfrozen share: frozen hidden units / hidden units (groups not fixed by the structure);"
          " ens. checked: nets whose budget-2 output was compared with the ensemble")
    reasons = frozen_reason_table(records)
    if reasons:
        print("\nmost common reasons hidden units are frozen, per category:\n" + reasons)
    classes = failure_classes(records)
    if classes:
        print("\nfailure classes (internal and wrong nets by known bug, heuristic):\n" + classes)
    lines = [line for r in records for line in failures(r)]
    if lines:
        print(f"\nnon-ok outcomes ({len(lines)} lines):")
        print("\n".join(lines))
    print(f"\n{len(records)} nets in {wall:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_seconds": wall, "records": records}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
