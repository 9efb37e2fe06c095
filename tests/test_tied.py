"""Tied embeddings (passes/tied.py): an embedding matrix that is also the output head merges
to the ensemble at budget 2, keeps its tie, and saves and loads."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pleas_fx
from pleas_fx.passes.verify import relative_error

torch.set_num_threads(1)


class TiedLM(nn.Module):
    """Embedding -> two residual MLP blocks -> head reusing the embedding matrix."""

    def __init__(self, vocab: int = 13, d: int = 8, functional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(2))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.functional = functional

    def forward(self, tokens):
        h = F.embedding(tokens, self.embed.weight) if self.functional else self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _pair(functional: bool):
    torch.manual_seed(0)
    a = TiedLM(functional=functional).eval()
    torch.manual_seed(1)
    b = TiedLM(functional=functional).eval()
    data = [torch.randint(0, 13, (16, 5)) for _ in range(3)]
    return a, b, data


@pytest.mark.parametrize("functional", [False, True])
def test_tied_head_budget_two_is_the_ensemble(functional):
    a, b, data = _pair(functional)
    x = data[0]
    merged = pleas_fx.merge(a, b, x, [1.0, 1.5, 2.0], data, progress=False)
    assert relative_error(merged[-1](x), 0.5 * (a(x) + b(x))) < 1e-5
    # budget 1 merges every feature: nothing to rescale; the others rescale the kept-apart features
    assert not hasattr(merged[0], "pleas_fx_tied")
    for m in merged[1:]:
        scale = m.pleas_fx_tied.scale0
        width = m.head.weight.shape[1]
        assert scale.shape == (width,) and set(scale.unique().tolist()) <= {1.0, 2.0}
        # 16 source features in `width` merged ones: 16 - width merged pairs, the rest kept apart
        assert int((scale == 2.0).sum()) == width - (16 - width)
    for m in merged:
        assert m.head.weight is m.embed.weight  # still tied


def test_tied_head_round_trip(tmp_path):
    a, b, data = _pair(False)
    x = data[0]
    merged = pleas_fx.merge(a, b, x, 1.5, data, progress=False)
    loaded = pleas_fx.load(pleas_fx.save(merged, tmp_path / "m", example_input=x))
    assert torch.equal(loaded(x), merged(x))


@pytest.mark.parametrize("functional", [False, True])
def test_embedding_max_norm_freezes_the_features(functional):
    """max_norm renormalises each looked-up row over the features: a norm over the widened
    axis, so the feature group is frozen with that reason (module and F.embedding alike)."""
    from pleas_fx.passes.infer_groups import infer_groups
    from pleas_fx.passes.trace import propagate_shapes, trace_model

    class Net(nn.Module):
        def __init__(self, max_norm):
            super().__init__()
            self.embed, self.fc = nn.Embedding(10, 6, max_norm=max_norm), nn.Linear(6, 3)

        def forward(self, ids):
            if functional:
                return self.fc(F.embedding(ids, self.embed.weight, max_norm=self.embed.max_norm))
            return self.fc(self.embed(ids))

    ids = torch.randint(0, 10, (4, 5))
    for max_norm, frozen in ((None, False), (1.0, True)):
        gm = trace_model(Net(max_norm), "model")
        propagate_shapes(gm, (ids,))
        spec = infer_groups(gm)
        group = spec.groups[spec.param_layouts["embed.weight"][1][0].group]
        assert group.frozen == frozen
        if frozen:
            assert any("max_norm" in r.detail for r in group.reasons)
