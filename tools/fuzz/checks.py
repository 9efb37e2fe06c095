"""One net through every check (run_net) and its outcome record: ok, refused, internal, wrong
or invalid (a generator bug)."""
from __future__ import annotations

import copy
import os
import time
import traceback

import torch
import torch.nn as nn

import pleas_fx
from pleas_fx.errors import InternalError, PleasError, TraceError
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import permute_model, random_permutations, relative_error

from .configs import ROTATION, config_for
from .nets import build, inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
SELF_TOL, SOUND_TOL, ENSEMBLE_TOL = 1e-4, 1e-5, 1e-4


class Record(dict):
    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    def error(self, name: str, exc: BaseException, outcome: str) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in reversed(tb)
                      if f.filename.startswith(ROOT) and not f.filename.startswith(HERE)), "")
        self["errors"].append({"check": name, "outcome": outcome, "type": type(exc).__name__,
                               "message": " ".join(str(exc).split())[:500], "where": where})


FRONT_DOOR = {"check_budgets", "checked_batches", "as_args", "validated"}


def classify(exc: BaseException) -> str:
    """'refused' for a documented user-facing error raised at the front door: a TraceError
    because torch.fx cannot trace the model, or the budget / data checks. Anything else is
    'internal' (a TraceError raised while verifying the merged graph blames the user's model
    for the compiler's fault; the nets here run on their inputs and their two copies have the
    same architecture)."""
    if not isinstance(exc, PleasError) or isinstance(exc, InternalError):
        return "internal"
    raised_in = traceback.extract_tb(exc.__traceback__)[-1].name
    if isinstance(exc, TraceError) and raised_in == "trace_model" and "could not be traced" in str(exc):
        return "refused"
    return "refused" if raised_in in FRONT_DOOR else "internal"


def _run(model, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def _float64_error(permuted, gm, x) -> float | None:
    """The permuted copy against the model, both in float64 (None where they cannot run so): a
    float32 difference that vanishes here is rounding, amplified by the net (a norm over two
    features), not a wrong permutation."""
    x64 = tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in _args(x))
    try:
        return relative_error(_run(copy.deepcopy(permuted).double(), x64), _run(copy.deepcopy(gm).double(), x64))
    except Exception:  # noqa: BLE001 -- an op without float64 support: the float32 figure stands
        return None


def _args(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _mean(a, b):
    """The ensemble of two (nested) outputs."""
    if torch.is_tensor(a):
        return 0.5 * (a + b)
    if isinstance(a, dict):
        return {k: _mean(a[k], b[k]) for k in a}
    return type(a)(_mean(u, v) for u, v in zip(a, b))


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))


def _finite(out) -> bool:
    if torch.is_tensor(out):
        return bool(torch.isfinite(out).all())
    if isinstance(out, dict):
        return all(_finite(o) for o in out.values())
    return all(_finite(o) for o in out)


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        torch.equal(a[k], b[k]) for k in a)


def hidden_frozen(spec) -> tuple[int, int, list[str]]:
    """(hidden units, frozen hidden units, reasons): top-level groups that are not
    structurally fixed (network input/output, batch, spatial, ...)."""
    total = frozen = 0
    reasons: list[str] = []
    for g in spec.groups.values():
        if g.parent is not None:
            continue
        structural = any(r.structural for r in g.reasons)
        if g.frozen and structural:
            continue
        total += g.size
        if g.frozen:
            frozen += g.size
            reasons.extend(str(r) for r in g.reasons)
    return total, frozen, reasons


def run_net(seed: int, category: str | None = None, budgets=(1.0, 1.5, 2.0), cfg: dict | None = None,
            weight_seed: int | None = None) -> Record:
    """Build one net and run every check on it; returns its record."""
    torch.set_num_threads(1)
    category = category or ROTATION[seed % len(ROTATION)]
    cfg = cfg if cfg is not None else config_for(seed, category)
    ws = 2 * seed if weight_seed is None else weight_seed
    rec = Record(seed=seed, category=category, config=cfg, outcome="ok", checks=[], errors=[], ensemble="not run",
                 params={}, hidden=None, frozen_hidden=None, frozen_reasons=[], merge_frozen=[], seconds=0.0)
    t0 = time.perf_counter()
    budgets = sorted(set(float(b) for b in budgets))
    merge = lambda a, b, bud: pleas_fx.merge(a, b, x, bud, data, progress=False)
    try:
        model_a, model_b = build(cfg, ws), build(cfg, ws + 1)
        x, x_other = inputs(cfg, 3 * seed, 4), inputs(cfg, 3 * seed + 1, 5)
        data = [inputs(cfg, 3 * seed + 2 + 7 * i, 8) for i in range(2)]
        ref_a, ref_a_other = _run(model_a, x), _run(model_a, x_other)
        ref_b, ref_b_other = _run(model_b, x), _run(model_b, x_other)
        if not all(_finite(r) for r in (ref_a, ref_a_other, ref_b, ref_b_other)):
            raise ValueError("the model's output is not finite")
    except Exception as exc:  # a generator bug, not a library one
        rec.error("build", exc, "invalid")
        rec["outcome"] = "invalid"
        return rec

    # ---------------------------------------------------------------- a. self-merge
    spec = gm = None
    try:
        gm = trace_model(model_a, "model")
        propagate_shapes(gm, _args(x))
        spec = infer_groups(gm)
    except Exception as exc:
        if isinstance(exc, TraceError) and "could not be traced" in str(exc):
            # confirm the library itself refuses it, with a user-facing error
            try:
                merge(model_a, model_b, 1.0)
                rec.check("refuses_untraceable", False, "merge succeeded on a model trace_model rejects")
            except Exception as exc2:
                rec.error("merge", exc2, classify(exc2))
            rec["seconds"] = time.perf_counter() - t0
            return _finish(rec)
        rec.error("infer_groups", exc, "internal")
    if spec is not None:
        total, frozen, reasons = hidden_frozen(spec)
        rec["hidden"], rec["frozen_hidden"], rec["frozen_reasons"] = total, frozen, sorted(set(reasons))
        try:
            permuted = permute_model(gm, spec, random_permutations(spec, seed + 1))
            err = relative_error(_run(permuted, x), ref_a)
            detail = f"permuted copy differs from the model: rel err {err:.3g}"
            if err >= SOUND_TOL and not cfg.get("float64"):  # float32 rounding, amplified by a norm of few features?
                err64 = _float64_error(permuted, gm, x)
                if err64 is not None:
                    detail += f" (float64: {err64:.3g})"
                    err = err if err64 >= SOUND_TOL * 1e-6 else err64
            rec.check("soundness", err < SOUND_TOL, detail)
        except Exception as exc:
            rec.error("permute", exc, "internal")
            permuted = None
        if permuted is not None:
            before_a, before_p = _state(model_a), _state(permuted)
            try:
                merged = merge(model_a, permuted, 1.0)
                err = relative_error(_run(merged, x), ref_a)
                rec.check("self_merge", err < SELF_TOL, f"self-merge differs from the model: rel err {err:.3g}")
                err = relative_error(_run(merged, x_other), ref_a_other)
                rec.check("self_merge_other_batch", err < SELF_TOL,
                          f"self-merge differs from the model on a batch of 5: rel err {err:.3g}")
            except Exception as exc:
                rec.error("self_merge", exc, classify(exc))
            rec.check("self_merge_inputs_unchanged", _same_state(before_a, _state(model_a)) and
                      _same_state(before_p, _state(permuted)), "merge modified its inputs")

    # ---------------------------------------------------------------- b. merge A and B
    before_a, before_b = _state(model_a), _state(model_b)
    merged_list = None
    try:
        merged_list = merge(model_a, model_b, budgets)
    except Exception as exc:
        rec.error("merge", exc, classify(exc))
    rec.check("inputs_unchanged", _same_state(before_a, _state(model_a)) and _same_state(before_b, _state(model_b)),
              "merge modified model_a or model_b")
    if merged_list is not None:
        one = sum(p.numel() for p in model_a.parameters())
        outs = []
        for b, m in zip(budgets, merged_list):
            try:
                out, out_other = _run(m, x), _run(m, x_other)
            except Exception as exc:
                rec.error(f"run_merged@{b:g}", exc, "internal")
                outs.append(None)
                continue
            outs.append((out, out_other))
            rec.check(f"finite@{b:g}", _finite(out) and _finite(out_other), "merged output is not finite")
            r = m.meta["pleas_fx"]
            rec["params"][f"{b:g}"] = {"stored": sum(p.numel() for p in m.parameters()) / max(one, 1),
                                       "achieved": r["achieved_budget"]}
            rec["merge_frozen"] = sorted({f["reason"] for f in r["frozen"]})
            if b == 2.0:
                if spec is None:
                    rec["ensemble"] = "not checked (no groups)"
                elif rec["frozen_hidden"]:
                    rec["ensemble"] = "not checked (frozen)"
                elif cfg.get("cross_norm"):
                    rec["ensemble"] = "not checked (norm across channels)"
                else:
                    err = relative_error(out, _mean(ref_a, ref_b))
                    err2 = relative_error(out_other, _mean(ref_a_other, ref_b_other))
                    ok = rec.check("ensemble@2", err < ENSEMBLE_TOL, f"budget 2 is not the ensemble: rel err {err:.3g}")
                    if ok:
                        rec.check("ensemble@2_other_batch", err2 < ENSEMBLE_TOL,
                                  f"budget 2 is not the ensemble on a batch of 5: rel err {err2:.3g}")
                    rec["ensemble"] = "ok" if ok and err2 < ENSEMBLE_TOL else "failed"
        # determinism
        try:
            again = merge(model_a, model_b, budgets)
            for b, m, o in zip(budgets, again, outs):
                if o is None:
                    continue
                o2 = _run(m, x)
                same = _equal(o2, o[0])
                rec.check(f"deterministic@{b:g}", same,
                          "" if same else f"a second merge differs: rel err {relative_error(o2, o[0]):.3g}")
        except Exception as exc:
            rec.error("merge_again", exc, classify(exc))
    rec["seconds"] = time.perf_counter() - t0
    return _finish(rec)


def _finish(rec: Record) -> Record:
    outcomes = [e["outcome"] for e in rec["errors"]]
    if "internal" in outcomes:
        rec["outcome"] = "internal"
    elif any(not c["ok"] for c in rec["checks"]):
        rec["outcome"] = "wrong"
    elif "refused" in outcomes:
        rec["outcome"] = "refused"
    else:
        rec["outcome"] = "ok"
    return rec


def failures(rec: dict) -> list[str]:
    """One line per failed check or error of a record."""
    lines = []
    for e in rec["errors"]:
        if e["outcome"] != "refused" or rec["outcome"] == "refused":
            lines.append(f"seed {rec['seed']:>5} {rec['category']:<11} {e['outcome']:<8} {e['check']:<24} "
                         f"{e['type']}: {e['message'][:160]}" + (f"  [{e['where']}]" if e["where"] else ""))
    for c in rec["checks"]:
        if not c["ok"]:
            lines.append(f"seed {rec['seed']:>5} {rec['category']:<11} {'wrong':<8} {c['check']:<24} {c['detail']}")
    return lines
