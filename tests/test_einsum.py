"""einsum (MaxViT's attention: "B G H I D, B G H J D -> B G H I J" and back): letters shared by
the operands share a permutation, q . k over a head's entries is a within group as for matmul.

Property tests on random einsum attention blocks (various heads, one head included, head_dim,
widths): every inferred group permutes soundly, nothing hidden is frozen, a self-merge recovers
A, budget 2 is the ensemble; and a small torchvision MaxViT is merged, not frozen.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.inspection import describe_groups
from pleas_fx.passes.verify import relative_error


class EinsumAttention(nn.Module):
    """x (B, G, P, 3) embedded to C: fused qkv, heads split by reshape, scores and output by einsum, a
    per-head bias, output projection, residual MLP."""

    def __init__(self, c, heads, head_dim, hidden):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.embed = nn.Linear(3, c)
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * heads * head_dim)
        self.bias = nn.Parameter(0.3 * torch.randn(heads, 1, 1))
        self.proj = nn.Linear(heads * head_dim, c)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.embed(x)
        b, g, p, _ = x.shape
        q, k, v = torch.chunk(self.qkv(self.norm(x)), 3, dim=-1)
        q, k, v = (t.reshape(b, g, p, self.heads, self.head_dim).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        scores = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k * self.head_dim ** -0.5)
        attn = torch.softmax(scores + self.bias, dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", attn, v).permute(0, 1, 3, 2, 4).reshape(b, g, p, -1)
        x = x + self.proj(out)
        x = x + self.mlp(x)
        return self.head(x.mean((1, 2)))


@st.composite
def configs(draw):
    return {"c": draw(st.integers(3, 6)), "heads": draw(st.integers(1, 3)), "head_dim": draw(st.integers(2, 4)),
            "hidden": draw(st.integers(3, 8))}


def _build(cfg, seed):
    torch.manual_seed(seed)
    return EinsumAttention(**cfg).eval()


def _data(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 4, 3, generator=gen), [torch.randn(4, 2, 4, 3, generator=gen) for _ in range(2)]


@nets.hypothesis_settings(10)
@given(cfg=configs(), seed=st.integers(0, 10_000))
def test_einsum_attention_groups_are_sound_and_unfrozen(cfg, seed):
    a = _build(cfg, seed)
    x, _ = _data(seed)
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-5, report.check
    gm, spec, permuted, perms = nets.permuted_copy(a, x, seed)
    assert any(g.parent is not None and not g.frozen for g in spec.groups.values())  # each head's entries
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5


@nets.hypothesis_settings(6)
@given(cfg=configs(), seed=st.integers(0, 10_000))
def test_einsum_attention_self_merge_and_budget_two(cfg, seed):
    a, b = _build(cfg, seed), _build(cfg, seed + 1)
    x, data = _data(seed)
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed)


def _maxvit(seed):
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(seed)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
                   head_dim=4, stochastic_depth_prob=0.0, num_classes=3)
    return nets.randomize_norms(model, seed).eval()


def test_small_maxvit_is_merged_not_frozen():
    a, b = _maxvit(0), _maxvit(1)
    gen = torch.Generator().manual_seed(0)
    x, data = torch.randn(2, 3, 32, 32, generator=gen), [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.passed, report.check
    gm, _, permuted, _ = nets.permuted_copy(a, x, 1)
    one = pleas_fx.merge(gm, permuted, x, 1.0, data, progress=False)
    assert relative_error(nets.run(one, x), nets.run(a, x)) < 1e-4
    two = pleas_fx.merge(a, b, x, 2.0, data, progress=False)
    assert relative_error(nets.run(two, x), nets.ensemble(a, b, x)) < 1e-4


class EllipsisMix(nn.Module):
    """A conv stem, then channels mixed by einsum with "..." over the spatial axes (a 1x1 conv as
    einsum, "bc...,dc->bd...") and a second einsum that pools them ("bc...->bc"), a Linear head."""

    def __init__(self, c=5, d=4):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(d, c) / c ** 0.5)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        y = torch.relu(torch.einsum("bc...,dc->bd...", torch.relu(self.stem(x)), self.mix))
        return self.head(torch.einsum("bc...->bc", y) / (y.shape[2] * y.shape[3]))


def test_einsum_with_an_ellipsis_is_merged_not_frozen():
    """"..." stands for axes of their own: the channels stay mergeable, permutations are sound,
    and the invariants hold."""
    torch.manual_seed(0)
    a, b = EllipsisMix().eval(), EllipsisMix().eval()
    x, data = torch.randn(2, 2, 5, 5), [torch.randn(4, 2, 5, 5) for _ in range(2)]
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-5, report.check
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed=0)


class DiagonalMix(nn.Module):
    """Two projections multiplied as an outer product, then its diagonal read by a repeated
    subscript ("bii->bi": h * g); `trace` also sums the diagonal ("bii->b")."""

    def __init__(self, c: int = 5, trace: bool = False):
        super().__init__()
        self.h, self.g, self.out = nn.Linear(4, c), nn.Linear(4, c), nn.Linear(c, 3)
        self.trace = trace

    def forward(self, x):
        outer = torch.einsum("bi,bj->bij", self.h(x), self.g(x))
        y = self.out(torch.relu(torch.einsum("bii->bi", outer)))
        return y + torch.einsum("bii->b", outer)[:, None] if self.trace else y


@nets.hypothesis_settings(10)
@given(c=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_a_repeated_subscript_reads_a_diagonal_whose_axes_share_a_permutation(c, seed):
    """The diagonal's two axes are one group (the two projections' outputs are unified): nothing
    is frozen, permutations are sound, a self-merge recovers A and budget 2 is the ensemble."""
    torch.manual_seed(seed)
    a, b = DiagonalMix(c).eval(), DiagonalMix(c).eval()
    gen = torch.Generator().manual_seed(seed)
    x, data = torch.randn(3, 4, generator=gen), [torch.randn(8, 4, generator=gen) for _ in range(2)]
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert [g.size for g in report.groups] == [c]  # the mergeable groups: h and g unified
    assert report.check.max_deviation < 1e-5, report.check
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed=seed)


def test_a_trace_over_a_diagonal_is_frozen_with_its_reason():
    """Summing the diagonal ("bii->b") adds the two models' features at a wider merge: frozen,
    and said so."""
    torch.manual_seed(0)
    report = describe_groups(DiagonalMix(4, trace=True).eval(), torch.randn(3, 4), check=True)
    assert report.frozen_hidden_units == 4
    assert any("einsum sum over an axis" in r for r in report.frozen_by_reason), report.frozen_by_reason
