"""Modules the generated nets are built from: activations, the ops pleas_fx cannot know
(wrapped functions, a custom leaf module, rarer torch ops), MLP blocks and transformer blocks.
CNN blocks are in cnn_layers.py."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid", "leaky", "hardswish", "relu6", "elu")
MODULE_ACT = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "leaky": lambda: nn.LeakyReLU(0.1), "hardswish": nn.Hardswish, "relu6": nn.ReLU6, "elu": nn.ELU,
}
FUNCTIONAL_ACT = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "leaky": lambda x: F.leaky_relu(x, 0.1), "hardswish": F.hardswish, "relu6": F.relu6, "elu": F.elu,
}


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
