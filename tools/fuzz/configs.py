"""Random architecture configs per category (plain JSON-able dicts), drawn from a seed (RngDraw:
the campaign) or by hypothesis (HypothesisDraw: the tests). Same seed, same config."""
from __future__ import annotations

import numpy as np

from .cnn_layers import cnn_shape
from .layers import ACTIVATIONS, unknown_dim

CATEGORIES = ("mlp", "cnn1d", "cnn2d", "transformer", "unknown", "shuffle")
# a campaign's seed picks its category from these (seed % 5; "shuffle" came later and is drawn
# with --only shuffle, so that older seeds keep their nets)
ROTATION = CATEGORIES[:5]


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


def unknown_ok(kw: dict, layout: str, rank: int, sizes: list[int]) -> bool:
    dim = unknown_dim(kw["axis"], layout, rank)
    if kw["op"] in ("narrow_cat", "standardize") and sizes[dim] < 2:
        return False
    if kw["op"] == "einsum" and kw["axis"] != "feature":
        return False
    return True


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


CNN_KINDS = ("conv", "preact", "residual", "concat", "split", "se", "se_cat_res", "dw", "grouped", "pool", "norm",
             "cl_linear")
CNN_WEIGHTS = (4, 1, 3, 2, 2, 2, 1, 2, 1, 2, 2, 1)


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
    if kind == "shuffle":
        pieces = d.choice([2, 2, 3])
        split = c % pieces == 0 and d.bool(0.7)
        kw = {"pieces": pieces, "split": split, "style": d.choice(["view", "view", "reshape", "flatten", "permute"])}
        if not split:
            kw["widths"] = [ch() for _ in range(pieces)]
        out = cnn_shape("shuffle", kw, c, L)[0]
        kw["groups"] = d.choice([g for g in (2, 3, 4, pieces) if out % g == 0] or [1])
        return kw
    raise ValueError(kind)


def cross_norm_block(kind, kw, c) -> bool:
    """A normalisation across channels (LayerNorm / GroupNorm over a widened axis)."""
    if kind != "norm":
        return False
    return kw["kind"] in ("layer_cl", "f_layer_cl") or (kw["kind"] in ("group", "f_group") and kw["groups"] != c)


def draw_cnn(d, dim: int, unknown: bool = False, shuffle: bool = False) -> dict:
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
        weights = [CNN_WEIGHTS[CNN_KINDS.index(k)] for k in kinds]
        if shuffle:  # ShuffleNet-style blocks, often in a row
            kinds, weights = kinds + ["shuffle"], weights + [8]
        # the stem is a conv: a per-channel op on the network input is a known bug
        # (tests/test_invariants.py::test_known_bug_budget_two_with_batchnorm_on_the_input)
        kind = "conv" if i == 0 else d.choice(kinds, weights)
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


def draw_config(category: str, d) -> dict:
    if category == "mlp":
        cfg = draw_mlp(d)
    elif category in ("cnn1d", "cnn2d"):
        cfg = draw_cnn(d, 1 if category == "cnn1d" else 2)
    elif category == "transformer":
        cfg = draw_transformer(d)
    elif category == "shuffle":
        cfg = draw_cnn(d, 2, shuffle=True)
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


def config_for(seed: int, category: str) -> dict:
    """The campaign's config for a seed."""
    return draw_config(category, RngDraw(seed, category))
