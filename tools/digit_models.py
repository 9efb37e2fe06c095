"""Small digit models for the benchmarks (1x14x14 inputs): VGG-style, ResNeXt-style (grouped
convolutions) and ViT; the ResNet is pleas_fx.apps.demo.DigitResNet."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.apps.demo import DigitResNet

ARCHS = ("resnet", "vgg", "vit", "resnext")


class DigitVGG(nn.Module):
    """VGG-style CNN for 1x14x14 digits: two conv-BN-ReLU pairs per stage, max pooling, a
    flattened 3x3 map into a hidden Linear layer, and a Linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10, hidden: int = 64):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(2 * width * 3 * 3, hidden)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc(self.relu(self.fc1(x)))


class DigitViT(nn.Module):
    """A small pre-norm ViT for 1x14x14 digits: 2x2 patches (49 tokens) and a class token,
    `depth` blocks of fused-qkv multi-head self-attention and a GELU MLP, a Linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10, depth: int = 2, heads: int = 4):
        super().__init__()
        dim = 2 * width
        self.heads, self.head_dim = heads, dim // heads
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 50, dim))
        self.norms1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos
        for norm1, qkv, proj, norm2, mlp in zip(self.norms1, self.qkv, self.proj, self.norms2, self.mlps):
            q, k, v = qkv(norm1(x)).reshape(b, n + 1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            x = x + proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n + 1, c))
            x = x + mlp(norm2(x))
        return self.fc(self.norm(x)[:, 0])


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 convolution: 1x1 (cin -> mid), 3x3 in `groups` conv
    groups (mid -> mid, stride), 1x1 (mid -> cout), BatchNorm after each; a 1x1 projection
    shortcut where the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, groups: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.short(x))


class DigitResNeXt(nn.Module):
    """ResNeXt-style CNN for digits: a stem, two bottleneck stages with grouped 3x3
    convolutions (4 conv groups; the second stage strided), GAP, a Linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10, groups: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = ResNeXtBlock(width, width, width, groups)
        self.layer2 = ResNeXtBlock(width, 2 * width, 2 * width, groups, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_model(arch: str, classes: int, width: int) -> nn.Module:
    if arch == "vit":
        return DigitViT(width, classes)
    if arch == "resnext":
        return DigitResNeXt(width, classes)
    return DigitResNet(width=width, num_classes=classes) if arch == "resnet" else DigitVGG(width, classes)
