"""CNN blocks (1-D or 2-D: conv, residual, concat, split, squeeze-excitation, depthwise,
grouped, pooling, normalisations, heads) and the shape arithmetic of a block config (cnn_shape)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Act


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


class ShuffleBlock(nn.Module):
    """ShuffleNet-style: `pieces` branches (1x1 conv, BN, ReLU, depthwise 3x3, 1x1 conv, ReLU) on
    the input, or the identity on the first of `pieces` chunks and branches on the others;
    concatenated, then a channel shuffle with `groups`, written one of several ways."""

    def __init__(self, dim, cin, kw):
        super().__init__()
        conv, bn = _nd(dim, "Conv"), _nd(dim, "BatchNorm")
        self.split, self.pieces, self.groups, self.style = kw["split"], kw["pieces"], kw["groups"], kw["style"]
        self.dim = dim
        w_in = cin // self.pieces if self.split else cin
        widths = [w_in] * (self.pieces - 1) if self.split else kw["widths"]
        self.branches = nn.ModuleList(
            nn.Sequential(conv(w_in, w, 1, bias=False), bn(w), nn.ReLU(), conv(w, w, 3, 1, 1, groups=w), bn(w),
                          conv(w, w, 1), nn.ReLU()) for w in widths)

    def forward(self, x):
        if self.split:
            parts = x.chunk(self.pieces, dim=1)
            y = torch.cat([parts[0]] + [f(parts[i + 1]) for i, f in enumerate(self.branches)], 1)
        else:
            y = torch.cat([f(x) for f in self.branches], 1)
        b, c = y.shape[0], y.shape[1]
        rest = [y.shape[2 + i] for i in range(self.dim)]  # (a proxy cannot be iterated)
        g = self.groups
        if self.style == "view":
            return torch.transpose(y.view(b, g, c // g, *rest), 1, 2).contiguous().view(b, -1, *rest)
        if self.style == "reshape":
            return y.reshape(b, g, c // g, *rest).transpose(1, 2).reshape(b, c, *rest)
        if self.style == "flatten":
            return y.view(b, g, c // g, *rest).transpose(1, 2).flatten(1, 2)
        order = (0, 2, 1) + tuple(range(3, 3 + len(rest)))
        return y.reshape(b, g, c // g, *rest).permute(*order).reshape(b, c, *rest)  # permute


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
    if kind == "shuffle":
        return (c if kw["split"] else sum(kw["widths"])), L
    if kind == "pool":
        if kw["kind"] in ("upsample", "f_interpolate"):
            return c, 2 * L
        return c, (2 if "adaptive" in kw["kind"] else L // 2)
    return c, L  # se, se_cat_res, norm, unknown
