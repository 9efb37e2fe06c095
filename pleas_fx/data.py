"""Calibration data: validation of user batches and generated inputs for the data-free mode."""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import torch

from pleas_fx.errors import DataError


def as_args(example_input: Any) -> tuple:
    """example_input as a tuple of positional model arguments."""
    if torch.is_tensor(example_input):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(torch.is_tensor(t) for t in example_input):
        return tuple(example_input)
    raise DataError(
        f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}"
    )


def _batch_args(batch: Any, n_inputs: int) -> tuple:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        # a (inputs..., label) tuple: the first n_inputs elements are the model's inputs
        return tuple(batch[:n_inputs])
    raise DataError(f"a data batch must be a tensor or a tuple/list whose first element is the input, got {type(batch).__name__}")


def checked_batches(data: Iterable, example_args: tuple, max_batches: int | None) -> Iterator[tuple]:
    """Yield batches as argument tuples on the example's device, checking every shape and dtype."""
    device = example_args[0].device
    count = 0
    for batch in islice(iter(data), max_batches):
        args = _batch_args(batch, len(example_args))
        if len(args) != len(example_args):
            raise DataError(f"batch {count} has {len(args)} inputs; example_input has {len(example_args)}")
        for i, (a, e) in enumerate(zip(args, example_args)):
            if a.dim() != e.dim() or tuple(a.shape[1:]) != tuple(e.shape[1:]):
                raise DataError(
                    f"batch {count}, input {i}: shape {tuple(a.shape)} does not match example_input "
                    f"{tuple(e.shape)} (all dims but the batch dim must agree)"
                )
            if a.is_floating_point() != e.is_floating_point():
                raise DataError(f"batch {count}, input {i}: dtype {a.dtype} but example_input has {e.dtype}")
            if a.is_floating_point() and not torch.isfinite(a).all():
                raise DataError(f"batch {count}, input {i} contains non-finite values")
        yield tuple(a.to(device=device, dtype=e.dtype) for a, e in zip(args, example_args))
        count += 1
    if count == 0:
        raise DataError("data yielded no batches")


def batches_like(example_args: tuple, batches: int, batch_size: int, seed: int,
                 floating: Callable[[tuple, torch.Generator], torch.Tensor]) -> list[tuple]:
    """`batches` batches of inputs shaped like `example_args` (batch axis `batch_size`): floating
    inputs from `floating(shape, generator)`, integer inputs (token ids, indices) uniformly from
    the example's value range, each on the example's device and dtype."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        args = []
        for e in example_args:
            shape = (batch_size, *e.shape[1:])
            if e.is_floating_point():
                t = floating(shape, gen)
            else:
                hi = int(e.max()) + 1 if e.numel() else 2
                t = torch.randint(int(e.min()) if e.numel() else 0, max(hi, 1), shape, generator=gen)
            args.append(t.to(device=e.device, dtype=e.dtype))
        out.append(tuple(args))
    return out


def generated_batches(example_args: tuple, batches: int, batch_size: int = 32, seed: int = 0) -> list[tuple]:
    """Data-free mode: inputs shaped like example_input. Floating inputs are drawn from a
    standard normal (matching the usual normalised inputs); integer inputs uniformly from
    the example's value range."""
    return batches_like(example_args, batches, batch_size, seed,
                        lambda shape, gen: torch.randn(shape, generator=gen, dtype=torch.float32))
