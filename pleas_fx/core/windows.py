"""The spatial steps of shifted-window attention (Swin), as three torch.fx leaf functions.

torchvision's `shifted_window_attention` is one opaque fx leaf: its projections, heads and
position bias are hidden from group inference. passes/lower.py rewrites each call as these
three functions around plain ops (F.linear, reshape, matmul, softmax) that the op specs
understand. Each function moves tokens only (padding, cyclic shift, window partition) and never
mixes or reorders the channel (or heads) axis, so the channel axis passes through unchanged
(passes/ops/windows.py); sizes are read from the tensors at run time, so a merged model runs at
any input size the source model does, whatever its widths.

- `window_partition(x, window_size, shift_size)`: (B, H, W, C) -> (B * windows, Wh * Ww, C):
  pad to multiples of the window, shift cyclically, cut into windows;
- `window_shift_mask(attn, x, window_size, shift_size)`: add the shifted-window attention mask
  (-100 between tokens from different regions) to scores (B * windows, heads, N, N);
- `window_merge(y, x, window_size, shift_size)`: the inverse of `window_partition` back to
  x's (B, H, W) positions.

The shift is dropped along an axis whose padded size fits in one window, as in torchvision.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F


def _geometry(x: torch.Tensor, window_size: list[int], shift_size: list[int]):
    """(pad_bottom, pad_right, padded H, padded W, effective shift) for x of shape (B, H, W, C)."""
    H, W = x.shape[1], x.shape[2]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_h, pad_w = H + pad_b, W + pad_r
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    return pad_b, pad_r, pad_h, pad_w, shift


def window_partition(x: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    B, C = x.shape[0], x.shape[-1]
    pad_b, pad_r, pad_h, pad_w, shift = _geometry(x, window_size, shift_size)
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(B, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size[0] * window_size[1], C)


def window_shift_mask(attn: torch.Tensor, x: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    _, _, pad_h, pad_w, shift = _geometry(x, window_size, shift_size)
    if sum(shift) == 0:
        return attn
    mask = attn.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window_size[0] * window_size[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
    heads, n = attn.shape[1], attn.shape[-1]
    attn = attn.view(attn.shape[0] // windows, windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
    return attn.view(-1, heads, n, n)


def window_merge(y: torch.Tensor, x: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    B, H, W, C = x.shape[0], x.shape[1], x.shape[2], y.shape[-1]
    _, _, pad_h, pad_w, shift = _geometry(x, window_size, shift_size)
    y = y.view(B, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], C)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_h, pad_w, C)
    if sum(shift) > 0:
        y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
    return y[:, :H, :W, :].contiguous()


WINDOW_FUNCTIONS = (window_partition, window_shift_mask, window_merge)
for _fn in WINDOW_FUNCTIONS:
    torch.fx.wrap(_fn.__name__)
