"""Block layers: the weight layers of a merged model, storing only their structural blocks.

A merged feature axis holds three kinds of entries: features only model A has (A-only),
features both models share (merged pairs, and frozen axes), features only B has (B-only).
A merged weight layer is zero wherever an A-only output would read a B-only input or the
reverse, so it is stored as three row blocks over its inputs ordered [A-only | shared | B-only]:

    A-only outputs  = layer(x[A-only | shared],          weight_a, bias_a)
    shared outputs  = layer(x[A-only | shared | B-only], weight_s, bias_s)
    B-only outputs  = layer(x[shared | B-only],          weight_b, bias_b)

Each block reads a contiguous slice of the ordered input. The merge emits every group's
features as [A-only | merged | B-only] (GroupPlan.from_matching), so on a plain channel axis
the input and output are already in this order; where they are not (concatenations,
flattened maps, ZipIt!-style plans) the layer holds index buffers: `in_order` (the merged input
entry read at each ordered position) and `out_order` (the ordered output placed at each merged
output entry). An empty block is not stored (its parameters are None). At budget 2 nothing is
shared and the layer is block-diagonal: two matmuls / convolutions, no zero stored.

`write_tensor` is the one way the fill pass writes a merged tensor: into a dense parameter or
buffer, or, for a block layer's `weight` / `bias`, from the dense value into the blocks (the
structurally zero blocks must be zero). `tensor_shape` is the dense shape of a merged tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.errors import InternalError

BLOCKS = ("a", "s", "b")  # row blocks, in the order of the ordered output


class _BlockLayer(nn.Module):
    """What block layers share: block sizes, index buffers, the forward over the three row
    blocks, and reading / writing the dense weight. Subclasses say how one block is applied
    (`apply_block`) and which axis holds the features (`feature_axis`)."""

    feature_axis = -1

    def __init__(self, in_blocks: Sequence[int], out_blocks: Sequence[int], kernel: Sequence[int] = (),
                 bias: bool = True, in_order: bool = False, out_order: bool = False) -> None:
        super().__init__()
        self.in_blocks = tuple(int(n) for n in in_blocks)
        self.out_blocks = tuple(int(n) for n in out_blocks)
        self.in_features, self.out_features = sum(self.in_blocks), sum(self.out_blocks)
        a, s, b = self.in_blocks
        reads = {"a": a + s, "s": a + s + b, "b": s + b}
        for name, rows in zip(BLOCKS, self.out_blocks):
            weight = nn.Parameter(torch.zeros(rows, reads[name], *kernel)) if rows else None
            self.register_parameter(f"weight_{name}", weight)
            self.register_parameter(f"bias_{name}", nn.Parameter(torch.zeros(rows)) if rows and bias else None)
        self.register_buffer("in_order", torch.arange(self.in_features) if in_order else None)
        self.register_buffer("out_order", torch.arange(self.out_features) if out_order else None)

    # -- forward
    def apply_block(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _read(self, x: torch.Tensor, start: int, length: int) -> torch.Tensor:
        return x if length == x.shape[self.feature_axis] else x.narrow(self.feature_axis, start, length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.feature_axis
        if self.in_order is not None:
            x = x.index_select(axis, self.in_order)
        a, s, b = self.in_blocks
        parts = []
        if self.weight_a is not None:  # A-only outputs read [A-only | shared]
            parts.append(self.apply_block(self._read(x, 0, a + s), self.weight_a, self.bias_a))
        if self.weight_s is not None:  # shared outputs read every input
            parts.append(self.apply_block(x, self.weight_s, self.bias_s))
        if self.weight_b is not None:  # B-only outputs read [shared | B-only]
            parts.append(self.apply_block(self._read(x, a, s + b), self.weight_b, self.bias_b))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, axis)
        return y if self.out_order is None else y.index_select(axis, self.out_order)

    # -- the dense view (merged entry order)
    def _orders(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(merged input entry at each ordered input position, merged output entry of each
        ordered output row)."""
        ins = self.in_order if self.in_order is not None else torch.arange(self.in_features, device=device)
        outs = (torch.argsort(self.out_order) if self.out_order is not None
                else torch.arange(self.out_features, device=device))
        return ins.to(device), outs.to(device)

    def _like(self) -> torch.Tensor:
        return next(p for p in (self.weight_s, self.weight_a, self.weight_b) if p is not None)

    def dense_shape(self, leaf: str) -> tuple[int, ...]:
        like = self._like()
        if leaf == "weight":
            return (self.out_features, self.in_features, *like.shape[2:])
        if leaf == "bias":
            return (self.out_features,)
        raise KeyError(leaf)

    def dense(self, leaf: str) -> torch.Tensor | None:
        """The dense `weight` or `bias` (merged entry order, structural zeros written out)."""
        like = self._like()
        if leaf == "bias" and self.bias_s is None and self.bias_a is None and self.bias_b is None:
            return None
        ins, outs = self._orders(like.device)
        a, s, b = self.in_blocks
        cols = {"a": slice(0, a + s), "s": slice(0, a + s + b), "b": slice(a, a + s + b)}
        ordered = torch.zeros(self.dense_shape(leaf), dtype=like.dtype, device=like.device)
        row = 0
        for name, rows in zip(BLOCKS, self.out_blocks):
            block = getattr(self, f"{leaf}_{name}")
            if block is not None:
                ordered[row:row + rows] = block if leaf == "bias" else 0
                if leaf == "weight":
                    ordered[row:row + rows, cols[name]] = block
            row += rows
        out = torch.empty_like(ordered)
        out[outs] = ordered
        if leaf == "weight":
            out[:, ins] = out.clone()
        return out

    def write(self, leaf: str, value: torch.Tensor, where: str) -> None:
        """Write the dense `weight` or `bias` `value` (merged entry order) into the blocks."""
        if tuple(value.shape) != self.dense_shape(leaf):
            raise InternalError("fill", where, f"filled with shape {tuple(value.shape)}, expected {self.dense_shape(leaf)}")
        ins, outs = self._orders(value.device)
        ordered = value.index_select(0, outs)
        a, s, b = self.in_blocks
        if leaf == "weight":
            ordered = ordered.index_select(1, ins)
        row = 0
        for name, rows in zip(BLOCKS, self.out_blocks):
            block = ordered[row:row + rows]
            if leaf == "weight":
                kept = {"a": slice(0, a + s), "s": slice(0, a + s + b), "b": slice(a, a + s + b)}[name]
                dropped = {"a": block[:, a + s:], "s": block[:, :0], "b": block[:, :a]}[name]
                if dropped.numel() and bool((dropped != 0).any()):
                    raise InternalError("fill", where, f"structurally zero block of {name}-only outputs is not zero")
                block = block[:, kept]
            target = getattr(self, f"{leaf}_{name}")
            if target is not None:
                target.data.copy_(block.to(target.dtype))
            row += rows

    def extra_repr(self) -> str:
        return f"in_blocks={self.in_blocks}, out_blocks={self.out_blocks}"


class BlockLinear(_BlockLayer):
    """A merged nn.Linear stored as its structural blocks (see the module docstring)."""

    feature_axis = -1

    def __init__(self, in_blocks: Sequence[int], out_blocks: Sequence[int], bias: bool = True,
                 in_order: bool = False, out_order: bool = False) -> None:
        super().__init__(in_blocks, out_blocks, (), bias, in_order, out_order)

    def apply_block(self, x, weight, bias):
        return F.linear(x, weight, bias)


class BlockConv(_BlockLayer):
    """A merged groups=1 nn.Conv1d / nn.Conv2d stored as its structural blocks (see the module
    docstring): each block a convolution of its slice of the input channels."""

    feature_axis = 1

    def __init__(self, in_blocks: Sequence[int], out_blocks: Sequence[int], kernel_size: Sequence[int],
                 stride: Sequence[int] = (1,), padding: Sequence[int] | str = (0,), dilation: Sequence[int] = (1,),
                 bias: bool = True, in_order: bool = False, out_order: bool = False) -> None:
        super().__init__(in_blocks, out_blocks, tuple(kernel_size), bias, in_order, out_order)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride = tuple(int(v) for v in stride)
        self.padding = padding if isinstance(padding, str) else tuple(int(v) for v in padding)
        self.dilation = tuple(int(v) for v in dilation)
        if len(self.kernel_size) not in (1, 2):
            raise ValueError(f"BlockConv is 1-D or 2-D, got kernel {self.kernel_size}")

    def apply_block(self, x, weight, bias):
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        return conv(x, weight, bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


BLOCK_LAYERS = (BlockLinear, BlockConv)


# --------------------------------------------------------------------------- writing tensors
def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding tensor `name` and its leaf name; a tensor a block layer absorbed
    (root.meta["block_tensors"]: name -> (module path, "weight" / "bias")) resolves to it."""
    moved = getattr(root, "meta", {}).get("block_tensors", {}) if hasattr(root, "meta") else {}
    if name in moved:
        path, leaf = moved[name]
        return root.get_submodule(path), leaf
    owner_name, _, leaf = name.rpartition(".")
    return (root.get_submodule(owner_name) if owner_name else root), leaf


def tensor_shape(root: nn.Module, name: str) -> tuple[int, ...]:
    """The dense shape of merged tensor `name` (a block layer's weight as one matrix)."""
    owner, leaf = _owner(root, name)
    if isinstance(owner, _BlockLayer):
        return owner.dense_shape(leaf)
    return tuple(getattr(owner, leaf).shape)


def read_tensor(root: nn.Module, name: str) -> torch.Tensor:
    """The dense value of merged tensor `name` (a block layer's weight with its zero blocks)."""
    owner, leaf = _owner(root, name)
    return owner.dense(leaf) if isinstance(owner, _BlockLayer) else getattr(owner, leaf)


def write_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write the dense `value` of merged tensor `name`: copied into a parameter or buffer, or
    into the blocks of a block layer."""
    owner, leaf = _owner(root, name)
    if isinstance(owner, _BlockLayer):
        owner.write(leaf, value, name)
        return
    target = getattr(owner, leaf)
    if tuple(value.shape) != tuple(target.shape):
        raise InternalError("fill", name, f"filled with shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    target.data.copy_(value.to(target.dtype))
