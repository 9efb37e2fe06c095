"""Distillation towards the ensemble (merge(..., distill=epochs), passes/distill.py): it lowers
the held-out loss, keeps the budget's structural zeros and the exactness invariants, never leaves
the merge worse than the fill on held-out samples, and rejects bad settings."""
from __future__ import annotations

import copy

import pytest
import torch

import pleas_fx
from pleas_fx.core.errors import PleasError
from pleas_fx.passes.distill import chunks, split_holdout
from pleas_fx.passes.verify import relative_error
from nets import ensemble, permuted_copy, run, trained_digit_pair


@pytest.fixture(scope="module")
def pair():
    (a, b), calib, test = trained_digit_pair()
    return a, b, calib, calib[0][0][:2], test


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distillation_lowers_the_held_out_loss_and_stores_the_same_parameters(pair):
    a, b, data, x, _ = pair
    before_a, before_b = _params(a), _params(b)
    plain = pleas_fx.merge(a, b, x, [1.0, 1.5], data, progress=False)
    tuned = pleas_fx.merge(a, b, x, [1.0, 1.5], data, progress=False, distill=10)
    for p, t in zip(plain, tuned):
        report = t.meta["pleas_fx"]["distill"]
        assert report["steps"] == 10 * 12  # 4 batches of 100: 16 chunks of 25, every fifth held out
        assert 1 <= report["kept_epoch"] <= 10
        assert report["holdout_after"] < 0.95 * report["holdout_before"]
        assert sum(v.numel() for v in t.parameters()) == sum(v.numel() for v in p.parameters())
        assert relative_error(run(t, data[1][0]), run(p, data[1][0])) > 1e-3  # it did change the weights
    for k, v in a.state_dict().items():  # the sources are not touched
        assert torch.equal(v, before_a[k])
    for k, v in b.state_dict().items():
        assert torch.equal(v, before_b[k])


def test_chunks_cut_every_batch_tensor_and_keep_other_arguments():
    batch = (torch.arange(70).reshape(70, 1).float(), 3, torch.ones(5))
    parts = chunks([batch], size=32)
    assert [p[0].shape[0] for p in parts] == [23, 24, 23]
    assert torch.equal(torch.cat([p[0] for p in parts]), batch[0])
    assert all(p[1] == 3 and p[2].shape == (5,) for p in parts)  # not the batch's leading size: whole


def test_dense_emission_keeps_its_zero_blocks_zero(pair):
    a, b, data, x, _ = pair
    plain = pleas_fx.merge(a, b, x, 1.5, data, progress=False, emit="dense")
    tuned = pleas_fx.merge(a, b, x, 1.5, data, progress=False, emit="dense", distill=2)
    zeros = 0
    for (name, p), t in zip(plain.named_parameters(), tuned.parameters()):
        zero = p == 0
        zeros += int(zero.sum())
        assert bool((t[zero] == 0).all()), name
    assert zeros > 1000  # the A-only / B-only blocks of the partly merged layers


def test_budget_two_and_self_merge_stay_exact(pair):
    a, b, data, x, _ = pair
    two = pleas_fx.merge(a, b, x, 2.0, data, progress=False, distill=2)
    assert two.meta["pleas_fx"]["distill"]["skipped"] == "the merge is the ensemble"
    assert relative_error(run(two, data[0][0]), ensemble(a, b, data[0][0])) < 1e-4
    gm, _, permuted, _ = permuted_copy(a, x, 7)
    one = pleas_fx.merge(gm, permuted, x, 1.0, data, progress=False, distill=2)
    assert one.meta["pleas_fx"]["distill"]["steps"] == 0
    assert relative_error(run(one, data[0][0]), run(a, data[0][0])) < 1e-4


def test_a_diverging_run_restores_the_filled_weights_fitted_without_the_held_out_chunks(pair):
    a, b, data, x, _ = pair
    fit, held = split_holdout(data)
    assert len(held) == 4 and sum(len(c[0]) for c in fit + held) == sum(len(c[0]) for c in data)
    plain = pleas_fx.merge(a, b, x, 1.0, fit, progress=False)  # the merge distillation starts from
    wild = pleas_fx.merge(a, b, x, 1.0, data, progress=False, distill=2, distill_lr=50.0)
    report = wild.meta["pleas_fx"]["distill"]
    assert report["kept_epoch"] == 0 and report["steps"] == 2 * 12
    assert report["holdout_after"] == report["holdout_before"]
    for p, q in zip(plain.state_dict().values(), wild.state_dict().values()):
        assert torch.equal(p, q)


def test_separate_heads_distil_towards_each_models_own_output(pair):
    a, b, data, x, _ = pair
    merged = pleas_fx.merge(a, b, x, 1.0, data, progress=False, heads="separate", distill=5)
    report = merged.meta["pleas_fx"]["distill"]
    assert report["holdout_after"] < report["holdout_before"]
    out_a, out_b = run(merged, data[0][0])
    assert relative_error(out_a, run(a, data[0][0])) < 0.5 and relative_error(out_b, run(b, data[0][0])) < 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"distill": -1}, "distill must be an integer >= 0"),
    ({"distill": 2.5}, "distill must be an integer >= 0"),
    ({"distill": True}, "distill must be an integer >= 0"),
    ({"distill": 2, "distill_lr": 0.0}, "distill_lr must be a finite number > 0"),
    ({"distill": 2, "distill_lr": float("nan")}, "distill_lr must be a finite number > 0"),
    ({"distill": 2, "distill_lr": "fast"}, "distill_lr must be a finite number > 0"),
])
def test_bad_distillation_settings_are_refused(pair, kwargs, message):
    a, b, data, x, _ = pair
    with pytest.raises(PleasError, match=message):
        pleas_fx.merge(copy.deepcopy(a), b, x, 1.0, data, progress=False, **kwargs)


def test_dict_inputs_of_a_transformer_are_cut_into_chunks_and_distilled():
    """Token ids and an attention mask (an HF-style call): every chunk keeps its rows of both, the
    None argument passes whole, and the per-model LayerNorms train like any parameter."""
    from test_transformers import TinyText, _randomised, _text_batch

    torch.manual_seed(0)
    a = _randomised(TinyText(), 0)
    torch.manual_seed(1)
    b = _randomised(TinyText(), 1)
    data = [_text_batch(i, n=40) for i in range(1, 5)]  # 8 chunks: 6 trained on, 2 held out
    merged = pleas_fx.merge(a, b, _text_batch(0), [1.0, 2.0], data=data, progress=False, distill=20,
                            distill_lr=3e-3)  # random tokens: the default rate gains nothing in 20 epochs here
    report = merged[0].meta["pleas_fx"]["distill"]
    assert report["steps"] == 20 * 6 and report["holdout_after"] < report["holdout_before"]
    assert merged[1].meta["pleas_fx"]["distill"]["skipped"] == "the merge is the ensemble"
    batch = data[0]
    args = (batch["input_ids"], None, batch["attention_mask"])
    with torch.no_grad():
        assert relative_error(merged[1](*args), 0.5 * (a(**batch) + b(**batch))) < 1e-4
