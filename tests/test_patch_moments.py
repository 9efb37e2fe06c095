"""passes.patch_moments: the im2col-free patch second moments equal the F.unfold computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pleas_fx.passes.moments import SecondMoments as PatchSums
from pleas_fx.passes.patch_moments import conv_patch_sums
from pleas_fx.passes.patch_plan import conv_output_size, estimate_seconds


def unfold_sums(xa, xb, kernel, stride, padding, dilation):
    """The reference: unfold both maps and multiply, in float64."""
    pa = F.unfold(xa.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    pb = F.unfold(xb.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    a = pa.transpose(1, 2).reshape(-1, pa.shape[1])
    b = pb.transpose(1, 2).reshape(-1, pb.shape[1])
    return PatchSums(a.T @ a, a.T @ b, b.T @ b, a.sum(0), b.sum(0), a.shape[0])


def assert_close(got: PatchSums, want: PatchSums, rtol: float) -> None:
    assert got.count == want.count
    for name in ("aa", "ab", "bb", "sum_a", "sum_b"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        scale = w.abs().max().clamp_min(1e-300)
        err = ((g.cpu() - w.cpu()).abs().max() / scale).item()
        assert err < rtol, (name, err)


def maps(shape, seed, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    xa = torch.randn(*shape, generator=gen, dtype=torch.float64)
    xb = 0.5 * xa + torch.randn(*shape, generator=gen, dtype=torch.float64)  # correlated, as two models are
    return xa.to(dtype).to(device), xb.to(dtype).to(device)


pair = lambda lo, hi: st.tuples(st.integers(lo, hi), st.integers(lo, hi))


@settings(max_examples=150, derandomize=True, deadline=None)
@given(kernel=pair(1, 5), stride=pair(1, 3), padding=pair(0, 3), dilation=pair(1, 2),
       c=st.integers(1, 6), h=st.integers(1, 12), w=st.integers(1, 12), n=st.integers(1, 3),
       chunked=st.booleans(), seed=st.integers(0, 2**16))
def test_correlation_equals_unfold_float64(kernel, stride, padding, dilation, c, h, w, n, chunked, seed):
    assume(all(conv_output_size(size, k, s, p, p, d) >= 1  # skip geometries without output position
               for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation)))
    xa, xb = maps((n, c, h, w), seed)
    got = conv_patch_sums(xa, xb, kernel, stride, padding, dilation, method="correlation",
                          chunk_bytes=1 if chunked else 2**26)  # chunked: one sample at a time
    assert_close(got, unfold_sums(xa, xb, kernel, stride, padding, dilation), 1e-10)


@pytest.mark.parametrize("method", ["correlation", "unfold", "auto"])
@pytest.mark.parametrize("geometry", [
    ((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((1, 1), 2, 0, 1), ((5, 2), (2, 3), (2, 0), (1, 2)), ((4, 4), 4, 0, 1),
])
def test_methods_agree(method, geometry):
    xa, xb = maps((3, 5, 12, 10), 7)
    for chunk_bytes in (1, 2**26):
        got = conv_patch_sums(xa, xb, *geometry, method=method, chunk_bytes=chunk_bytes)
        assert_close(got, unfold_sums(xa, xb, *geometry), 1e-10)


def test_auto_picks_the_cheaper_method():
    """Many taps over few channels (a patchify convolution) unfold; a 3x3 over 64 channels correlates."""
    patchify = estimate_seconds((8, 3, 224, 224), 16, 16)
    assert patchify["unfold"] < patchify["correlation"]
    conv3x3 = estimate_seconds((64, 64, 14, 14), 3, 1, 1)
    assert conv3x3["correlation"] < conv3x3["unfold"] / 2


@pytest.mark.parametrize("geometry", [
    ((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((1, 1), 1, 0, 1), ((1, 1), 2, 0, 1), ((2, 4), (1, 2), (0, 2), (2, 1)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(geometry, dtype):
    """Products in float32 (bfloat16 is promoted), sums in float64: float32 rounding only."""
    xa, xb = maps((5, 7, 13, 11), 0, dtype)
    for method in ("correlation", "unfold"):
        got = conv_patch_sums(xa, xb, *geometry, method=method)
        assert_close(got, unfold_sums(xa, xb, *geometry), 2e-5)


def test_one_dimensional_convolution():
    """A Conv1d input as a height-1 map: kernel (1, k)."""
    xa, xb = maps((4, 3, 1, 20), 1)
    for k, s, p, d in [(5, 1, 2, 1), (3, 2, 1, 3), (7, 1, 0, 1)]:
        got = conv_patch_sums(xa, xb, (1, k), (1, s), (0, p), (1, d), method="correlation")
        assert_close(got, unfold_sums(xa, xb, (1, k), (1, s), (0, p), (1, d)), 1e-10)


def test_kernel_larger_than_map():
    xa, xb = maps((2, 3, 2, 3), 2)
    got = conv_patch_sums(xa, xb, 5, 1, 3, 1, method="correlation")
    assert_close(got, unfold_sums(xa, xb, 5, 1, 3, 1), 1e-10)


def test_padding_strings():
    xa, xb = maps((2, 3, 7, 6), 3)
    for kernel, dilation in [((3, 4), (1, 1)), ((2, 3), (2, 1))]:
        (pt, pl) = [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
        (pb, pr) = [d * (k - 1) - p for k, d, p in zip(kernel, dilation, (pt, pl))]
        padded = lambda x: F.pad(x, (pl, pr, pt, pb))  # torch's 'same': the extra one after
        want = unfold_sums(padded(xa), padded(xb), kernel, 1, 0, dilation)
        for method in ("correlation", "unfold"):
            assert_close(conv_patch_sums(xa, xb, kernel, 1, "same", dilation, method=method), want, 1e-10)
            assert_close(conv_patch_sums(xa, xb, kernel, 1, ((pt, pb), (pl, pr)), dilation, method=method),
                         want, 1e-10)
    assert_close(conv_patch_sums(xa, xb, 3, 2, "valid"), unfold_sums(xa, xb, 3, 2, 0, 1), 1e-10)


@pytest.mark.parametrize("method", ["correlation", "unfold"])
def test_out_accumulates_batches(method):
    """Adding into running sums (which the correlation method reorders in place and back)."""
    xa, xb = maps((6, 4, 9, 8), 4)
    geometry = ((3, 2), (2, 1), 1, 1)
    acc = PatchSums.zeros(4 * 3 * 2)
    conv_patch_sums(xa[:2], xb[:2], *geometry, out=acc, method=method)
    assert conv_patch_sums(xa[2:], xb[2:], *geometry, out=acc, method=method) is acc
    assert_close(acc, unfold_sums(xa, xb, *geometry), 1e-10)
    assert_close(conv_patch_sums(xa[:2], xb[:2], *geometry).add_(conv_patch_sums(xa[2:], xb[2:], *geometry)),
                 acc, 1e-12)


def test_rejects_bad_input():
    xa, xb = maps((1, 2, 3, 3), 5)
    with pytest.raises(ValueError, match="no output position"):
        conv_patch_sums(xa, xb, 5)
    with pytest.raises(ValueError, match="one shape"):
        conv_patch_sums(xa, xb[:, :1], 1)
    with pytest.raises(ValueError, match="dimension"):
        conv_patch_sums(xa, xb, 1, out=PatchSums.zeros(3))
    with pytest.raises(ValueError, match="method"):
        conv_patch_sums(xa, xb, 1, method="fft")


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("method", ["correlation", "unfold"])
@pytest.mark.parametrize("device", DEVICES)
def test_outputs_on_input_device(device, method):
    """Every output lives on the inputs' device (meta checks placement without data)."""
    xa, xb = maps((3, 5, 10, 9), 6, torch.float32, device)
    geometry = ((3, 3), (2, 1), 1, (1, 2))
    got = conv_patch_sums(xa, xb, *geometry, method=method)
    for t in (got.aa, got.ab, got.bb, got.sum_a, got.sum_b):
        assert t.device.type == torch.device(device).type and t.dtype == torch.float64
    assert got.aa.shape == (45, 45) and got.sum_b.shape == (45,)
    if device != "meta":
        assert_close(got, unfold_sums(xa.cpu(), xb.cpu(), *geometry), 2e-5)


def test_inputs_that_require_grad():
    """Statistics: no autograd graph is built, whatever the inputs."""
    xa, xb = maps((2, 3, 6, 6), 8)
    got = conv_patch_sums(xa.requires_grad_(), xb.requires_grad_(), 3, 1, 1)
    assert not got.aa.requires_grad and not got.sum_b.requires_grad


@pytest.mark.parametrize("method", ["correlation", "unfold"])
@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (5, 1, 2, 2), (7, 2, 3, 1)])
def test_one_map_gives_its_own_patch_moments(geometry, method):
    """xb=None: the patch Gram and sums of one map (the merged-input moments), no b part."""
    xa, xb = maps((3, 5, 13, 11), seed=7)
    got = conv_patch_sums(xa, None, *geometry, method=method)
    want = unfold_sums(xa, xb, *geometry)
    assert got.dim_b == 0 and got.ab.shape == (want.aa.shape[0], 0) and got.count == want.count
    for name in ("aa", "sum_a"):
        g, w = getattr(got, name), getattr(want, name)
        assert ((g - w).abs().max() / w.abs().max()).item() < 1e-12, name
    acc = conv_patch_sums(xa[:1], None, *geometry, method=method)  # accumulating into running sums
    conv_patch_sums(xa[1:], None, *geometry, out=acc, method=method)
    assert ((acc.aa - want.aa).abs().max() / want.aa.abs().max()).item() < 1e-12


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(kernel=st.sampled_from([(1, 1), (3, 3), (2, 3)]), stride=st.sampled_from([(1, 1), (2, 2), (1, 2)]),
       pads=st.sampled_from([((0, 0), (0, 0)), ((1, 1), (1, 1)), ((0, 1), (1, 0))]),
       dilation=st.sampled_from([(1, 1), (2, 2)]), c=st.integers(1, 4), size=st.integers(5, 9), seed=st.integers(0, 999))
def test_target_cross_from_patches_equals_the_weight_gradient(kernel, stride, pads, dilation, c, size, seed):
    """E[y~ x~^T] of merged-input least squares: from im2col patches (small maps) or as a
    convolution's weight gradient (large ones), the same sums (F.unfold's channel-then-taps order)."""
    from pleas_fx.core.ir import WeightNode
    from pleas_fx.passes import merged_sums
    from pleas_fx.passes.patch_plan import node_output_size
    w = WeightNode("conv", "conv.weight", None, "conv", kernel=kernel, stride=stride, padding=pads, dilation=dilation)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c, size, size, generator=gen, dtype=torch.float64)
    out_h, out_w = node_output_size(w, x)
    assume(out_h > 0 and out_w > 0)
    y = torch.randn(3, 5, out_h, out_w, generator=gen, dtype=torch.float64)
    saved = merged_sums.UNFOLD_BYTES
    try:
        merged_sums.UNFOLD_BYTES = 2**40
        patches = merged_sums._target_cross(x, y, w, pads)
        merged_sums.UNFOLD_BYTES = 0
        gradient = merged_sums._target_cross(x, y, w, pads)
    finally:
        merged_sums.UNFOLD_BYTES = saved
    torch.testing.assert_close(patches, gradient, rtol=1e-10, atol=1e-10)
