"""Swin (shifted-window attention): torchvision's Swin v1 and v2 and timm's Swin are merged, not
frozen.

torchvision's `shifted_window_attention`, `_get_relative_position_bias` and `_patch_merging_pad`
are torch.fx leaves; passes/lower_windows.py rewrites them as plain ops around three token-moving
leaves of pleas_fx.core.windows. Property tests on small windowed-attention networks (v1 and v2
blocks, various widths, heads, windows, input sizes with padding and with the shift dropped):
the lowered graph computes what the model does, every inferred group (heads, their entries,
MLP units, Swin v2's position-bias MLP) permutes soundly, a self-merge recovers the model,
budget 2 is the ensemble; the full-size models are inspected.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import nets
import pleas_fx
from pleas_fx.inspection import describe_groups
from pleas_fx.passes.trace import trace_model
from pleas_fx.passes.verify import relative_error


def _perturb_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """LayerNorm affines away from (1, 0), so mapping them wrongly would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def tiny_swin(cfg: dict, seed: int) -> SwinTransformer:
    torch.manual_seed(seed)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if cfg["v2"] else {}
    model = SwinTransformer(patch_size=[2, 2], embed_dim=cfg["dim"], depths=cfg["depths"], num_heads=cfg["heads"],
                            window_size=cfg["window"], num_classes=3, **extra)
    return _perturb_norms(model, seed)


@st.composite
def swin_configs(draw):
    stages = draw(st.integers(1, 2))
    heads = [draw(st.sampled_from([1, 2, 3]))]  # one head: a size-1 heads axis (reshape to (.., 1, C))
    heads.append(heads[0] * draw(st.integers(1, 2)))
    return {"v2": draw(st.booleans()), "dim": heads[0] * draw(st.integers(2, 3)),
            "depths": [draw(st.integers(1, 2)) for _ in range(stages - 1)] + [2], "heads": heads[:stages],
            "window": [draw(st.integers(2, 4)), draw(st.integers(2, 4))],
            # 8 px: one window at 4x4; 12 px (6x6 patches) pads for windows of 4; 16 px shifts
            "size": draw(st.sampled_from([8, 12, 16]))}


def _data(cfg, seed, n=2):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, cfg["size"], cfg["size"])
    return torch.randn(3, *shape, generator=gen), [torch.randn(4, *shape, generator=gen) for _ in range(n)]


@nets.hypothesis_settings(15)
@given(cfg=swin_configs(), seed=st.integers(0, 10_000))
def test_swin_groups_are_sound_and_unfrozen(cfg, seed):
    a = tiny_swin(cfg, seed)
    x, _ = _data(cfg, seed)
    gm = trace_model(a, "model")
    assert not any(getattr(n.target, "__module__", "") == "torchvision.models.swin_transformer"
                   for n in gm.graph.nodes)  # every torchvision leaf lowered
    assert torch.equal(nets.run(gm, x), nets.run(a, x))  # the lowered graph computes the same
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-12, report.check
    gm, spec, permuted, perms = nets.permuted_copy(a, x, seed)
    assert nets.nontrivial(perms)
    assert any(g.parent is not None and not g.frozen for g in spec.groups.values())  # heads' entries
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5


@nets.hypothesis_settings(8)
@given(cfg=swin_configs(), seed=st.integers(0, 10_000))
def test_swin_self_merge_and_budget_two(cfg, seed):
    a, b = tiny_swin(cfg, seed), tiny_swin(cfg, seed + 1)
    x, data = _data(cfg, seed)
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed)
    assert relative_error(nets.run(a, x), nets.ensemble(a, b, x)) > 1e-3  # not trivially met


def test_heads_are_widened_as_units_and_the_merged_model_runs_at_other_sizes(tmp_path):
    """Budget 1.5 keeps some heads apart (more heads than the source, each of the source's
    head_dim), the merged model saves and loads (pleas_fx.core.windows is allow-listed) and,
    like torchvision's, runs on inputs of other sizes (padding, shift dropped)."""
    from pleas_fx.io import load, save

    cfg = {"v2": True, "dim": 8, "depths": [2, 2], "heads": [2, 4], "window": [4, 4], "size": 16}
    a, b = tiny_swin(cfg, 0), tiny_swin(cfg, 1)
    x, data = _data(cfg, 0, n=3)
    merged = pleas_fx.merge(a, b, x, 1.5, data, progress=False)
    r = merged.meta["pleas_fx"]
    assert r["frozen"] == [] and r["parameters"] <= 1.5 * r["parameters_one_model"]
    params = dict(merged.named_parameters())
    heads = {n[:-len(".logit_scale")]: p.shape[0] for n, p in params.items() if n.endswith("attn.logit_scale")}
    assert sorted(heads) == [f"features.{s}.{b}.attn" for s in (1, 3) for b in (0, 1)]
    assert any(h > cfg["heads"][i // 2] for i, h in enumerate(heads.values()))  # some heads kept apart
    for attn, h in heads.items():  # q, k and v: whole heads of the source's head_dim (4)
        rows = params[f"{attn}.qkv.weight"].shape[0] if f"{attn}.qkv.weight" in params \
            else sum(merged.get_submodule(f"{attn}.qkv.weight_block").out_blocks)
        assert rows == 3 * h * 4, (attn, rows, h)
    loaded = load(save(merged, tmp_path / "m"))
    other = torch.randn(2, 3, 20, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))
        assert merged(other).shape == (2, 3) and torch.isfinite(merged(other)).all()


# --------------------------------------------------------------------------- full-size models
@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_torchvision_swin_is_merged_not_frozen(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    report = describe_groups(model, torch.randn(1, 3, 64, 64), check=True)
    hidden = report.frozen_hidden_units + report.mergeable_units
    assert report.frozen_hidden_units <= 0.01 * hidden, report.frozen_by_reason
    assert report.check.passed, report.check


@functools.lru_cache(maxsize=2)
def _timm_tiny(seed):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.models.swin_transformer.SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=8,
                                                         depths=(2, 2), num_heads=(2, 4), num_classes=3)
    return _perturb_norms(model, seed)


def test_timm_swin_is_merged():
    """timm's Swin traces to plain ops (roll, computed pads and slices, a fused qkv reshaped
    with head_dim -1): nothing frozen, self-merge exact, budget 2 the ensemble."""
    a, b = _timm_tiny(0), _timm_tiny(1)
    x, data = _data({"size": 16}, 0)
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-12
    gm, _, permuted, perms = nets.permuted_copy(a, x, 1)
    assert nets.nontrivial(perms)
    one = pleas_fx.merge(gm, permuted, x, 1.0, data, progress=False)
    assert relative_error(nets.run(one, x), nets.run(a, x)) < 1e-4
    two = pleas_fx.merge(a, b, x, 2.0, data, progress=False)
    assert two.meta["pleas_fx"]["frozen"] == []
    assert relative_error(nets.run(two, x), nets.ensemble(a, b, x)) < 1e-4


def test_timm_swin_tiny_is_merged_not_frozen():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10).eval()
    report = describe_groups(model, torch.randn(1, 3, 224, 224), check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.passed, report.check


class GridView(torch.nn.Module):
    """MaxViT-style grid partition of a 7x7 map with grid 7: (B, 7, 7, C) -> (B, 7, 1, 7, 1, C),
    axes swapped, viewed back; channels mixed by Linear layers before and after."""

    def __init__(self, c=8):
        super().__init__()
        self.inp, self.mid, self.out = torch.nn.Linear(3, c), torch.nn.Linear(c, c), torch.nn.Linear(c, 4)

    def forward(self, x):  # x: (B, 7, 7, 3)
        y = torch.relu(self.inp(x))
        b, h, w, c = y.shape
        y = y.view(b, 7, h // 7, 7, w // 7, c).permute(0, 2, 4, 1, 3, 5).reshape(b, h, w, c)
        return self.out(torch.relu(self.mid(y))).mean((1, 2))


def test_a_grid_view_with_size_one_windows_is_not_a_single_head():
    """(B, N, C) -> (B, N, 1, C) is read as one attention head only when the other axes are
    unchanged; a grid view that inserts size-1 window axes (timm's MaxViT at 224 px, stage 4)
    keeps the channels plain: nothing frozen, permutations sound."""
    torch.manual_seed(0)
    a, x = GridView().eval(), torch.randn(2, 7, 7, 3)
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-12, report.check


def test_swin_v2_key_bias_stays_zero_on_padded_windows():
    """Swin v2 zeroes its key bias at run time, so padded window tokens have keys of exactly 0;
    a merged key bias of rounding size (~1e-16) would become, through F.normalize (eps 1e-12),
    keys the real queries attend to: torchvision's swin_v2_t at 64 px self-merged to 5e-4."""
    cfg = {"v2": True, "dim": 8, "depths": [2], "heads": [2], "window": [8, 8], "size": 12}  # 6x6 map, 8x8 window
    a = tiny_swin(cfg, 3)
    x, data = _data(cfg, 3, n=8)  # enough rows for every layer's least squares
    gm, _, permuted, _ = nets.permuted_copy(a, x, 5)
    for dtype, least_squares in ((torch.float32, "merged"), (torch.float64, "source")):
        one = pleas_fx.merge(gm.to(dtype), permuted.to(dtype), x.to(dtype), 1.0, [d.to(dtype) for d in data],
                             least_squares=least_squares, progress=False)
        biases = [p for n, p in one.named_parameters() if n.endswith("qkv.bias") or n.endswith("qkv_bias")]
        assert biases and all(torch.equal(b[len(b) // 3: 2 * len(b) // 3], torch.zeros_like(b[: len(b) // 3]))
                              for b in biases)
        assert relative_error(nets.run(one, x.to(dtype)), nets.run(a.to(dtype), x.to(dtype))) < 1e-6
