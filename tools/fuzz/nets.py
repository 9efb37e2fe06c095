"""nn.Modules from configs (MLP, CNN, Transformer), with random weights and normalisation
statistics (build), and input batches for them (inputs)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .cnn_layers import CNNHead, ChannelsLastLinear, Concat, ConvAct, Depthwise, Grouped, Norm, Pool, PreAct, \
    Residual, SEConcatResidual, ShuffleBlock, SplitBlock, SqueezeExcite, cnn_shape
from .layers import FuzzTracer, MLPLinear, MLPResidual, SwiGLU, TBlock, Unknown, unknown_dim


class Stack(nn.Module):
    """Blocks in sequence, then the head (MLP and CNN)."""

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class MLP(Stack):
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


class CNN(Stack):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg["dim"]
        c, L = cfg["in_channels"], cfg["size"]
        self.blocks = nn.ModuleList()
        builders = {"conv": ConvAct, "preact": PreAct, "residual": Residual, "concat": Concat, "split": SplitBlock,
                    "se": SqueezeExcite, "se_cat_res": SEConcatResidual, "dw": Depthwise, "grouped": Grouped,
                    "norm": Norm, "cl_linear": ChannelsLastLinear, "shuffle": ShuffleBlock}
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
        try:
            graph = FuzzTracer().trace(model)
        except Exception:  # noqa: BLE001 -- untraceable (a "branch" op too): pleas_fx must refuse the module itself
            return model
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
