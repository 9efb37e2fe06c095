"""Calibration data for a merge: the user's batches (checked against example_input), or inputs
generated like example_input for the data-free mode (PLeaS-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pleas_fx.core.errors import DataError
from pleas_fx.core.inputs import checked_batches, generated_batches
from pleas_fx.core.procedural import procedural_batches
from pleas_fx.options import MergeOptions
from pleas_fx.passes.trace import TracedPair, embedding_vocab, model_inputs

GENERATORS = {"gaussian": generated_batches, "procedural": procedural_batches}


@dataclass
class Calibration:
    """Argument tuples to run both models on; `total` their count when known (progress bars)."""

    batches: Iterable[tuple]
    total: int | None


def calibration(opts: MergeOptions, traced: TracedPair) -> Calibration:
    """The calibration batches of a merge. The user's batches are read lazily, once, unless a
    later step (BatchNorm repair, merged-input least squares, distillation) reads them again."""
    data, inputs = opts.data, model_inputs(traced.gm_a)
    if opts.user_data:
        batches: Iterable[tuple] = checked_batches(data, traced.example_args, opts.max_batches, inputs)
        if opts.repair or opts.merged_inputs or opts.distill:
            batches = list(batches)
        total = opts.max_batches if opts.max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
        return Calibration(batches, total)
    n = opts.max_batches or opts.generated_batches_count
    if callable(data):
        made = list(data(traced.example_args, n, opts.seed))
        if not made:
            raise DataError("the data function returned no batches")
        batches = list(checked_batches(made, traced.example_args, None, inputs))
    else:
        batches = GENERATORS[data or "gaussian"](traced.example_args, n, seed=opts.seed,
                                                 vocab=embedding_vocab(traced.gm_a))
    return Calibration(batches, len(batches))
