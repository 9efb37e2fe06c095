"""Calibration data: validation of user batches and generated inputs for the data-free mode."""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import torch

from pleas_fx.core.errors import DataError


REQUIRED = object()  # a model input without a default


def as_args(example_input: Any, inputs: list[tuple[str, Any]] | None = None) -> tuple:
    """example_input as a tuple of positional model arguments.

    A tensor or a tuple/list of tensors is taken as is. A dict (e.g. ``input_ids`` and
    ``attention_mask``) is bound by name to the model's inputs ``inputs`` (name, default or
    REQUIRED, in the traced graph's order); inputs it leaves out take their defaults."""
    if torch.is_tensor(example_input):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(torch.is_tensor(t) for t in example_input):
        return tuple(example_input)
    if isinstance(example_input, dict) and example_input:
        if inputs is None:
            raise DataError("a dict of inputs needs the model's input names (trace the model first)")
        names = [name for name, _ in inputs]
        unknown = [k for k in example_input if k not in names]
        if unknown:
            raise DataError(f"the model has no input named {unknown[0]!r} (its inputs: {', '.join(names)})")
        bad = [k for k, v in example_input.items() if not torch.is_tensor(v)]
        if bad:
            raise DataError(f"input {bad[0]!r} is a {type(example_input[bad[0]]).__name__}, not a tensor")
        args = []
        for name, default in inputs:
            value = example_input.get(name, default)
            if value is REQUIRED:
                raise DataError(f"the model's input {name!r} is missing from the dict (it has no default)")
            args.append(value)
        while args and not torch.is_tensor(args[-1]) and inputs[len(args) - 1][0] not in example_input:
            args.pop()  # trailing defaults: left to the model
        return tuple(args)
    raise DataError(
        f"example_input must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_input).__name__}"
    )


def _batch_args(batch: Any, n_inputs: int, inputs: list[tuple[str, Any]] | None) -> tuple:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, dict):
        return as_args(batch, inputs)
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        # a (inputs..., label) tuple: the first n_inputs elements are the model's inputs
        return tuple(batch[:n_inputs])
    raise DataError(f"a data batch must be a tensor, a dict of tensors, or a tuple/list whose first element is "
                    f"the input, got {type(batch).__name__}")


def checked_batches(data: Iterable, example_args: tuple, max_batches: int | None,
                    inputs: list[tuple[str, Any]] | None = None) -> Iterator[tuple]:
    """Yield batches as argument tuples on the example's device, checking every shape and dtype.
    Dict batches are bound to the model's `inputs` by name, as example_input is."""
    device = next(e.device for e in example_args if torch.is_tensor(e))
    count = 0
    for batch in islice(iter(data), max_batches):
        args = _batch_args(batch, len(example_args), inputs)
        if len(args) != len(example_args):
            raise DataError(f"batch {count} has {len(args)} inputs; example_input has {len(example_args)}")
        for i, (a, e) in enumerate(zip(args, example_args)):
            if not torch.is_tensor(e):  # a default the example left to the model
                if a is not e:
                    raise DataError(f"batch {count}, input {i}: given here but not in example_input")
                continue
            if not torch.is_tensor(a):
                raise DataError(f"batch {count}, input {i}: missing, but example_input has it")
            if a.dim() != e.dim() or tuple(a.shape[1:]) != tuple(e.shape[1:]):
                raise DataError(
                    f"batch {count}, input {i}: shape {tuple(a.shape)} does not match example_input "
                    f"{tuple(e.shape)} (all dims but the batch dim must agree)"
                )
            if a.is_floating_point() != e.is_floating_point():
                raise DataError(f"batch {count}, input {i}: dtype {a.dtype} but example_input has {e.dtype}")
            if a.is_floating_point() and not torch.isfinite(a).all():
                raise DataError(f"batch {count}, input {i} contains non-finite values")
        yield tuple(a.to(device=device, dtype=e.dtype) if torch.is_tensor(e) else a for a, e in zip(args, example_args))
        count += 1
    if count == 0:
        raise DataError("data yielded no batches")


def batches_like(example_args: tuple, batches: int, batch_size: int, seed: int,
                 floating: Callable[[tuple, torch.Generator], torch.Tensor],
                 vocab: dict[int, int] | None = None) -> list[tuple]:
    """`batches` batches of inputs shaped like `example_args` (batch axis `batch_size`): floating
    inputs from `floating(shape, generator)`, integer inputs uniformly from [0, vocab[i]) for the
    inputs `vocab` names (token ids read by an embedding) and from the example's value range
    otherwise (masks, indices), each on the example's device and dtype."""
    vocab = vocab or {}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        args = []
        for i, e in enumerate(example_args):
            if not torch.is_tensor(e):  # a default left to the model
                args.append(e)
                continue
            shape = (batch_size, *e.shape[1:])
            if e.is_floating_point():
                t = floating(shape, gen)
            elif i in vocab:
                t = torch.randint(0, vocab[i], shape, generator=gen)
            else:
                hi = int(e.max()) + 1 if e.numel() else 2
                t = torch.randint(int(e.min()) if e.numel() else 0, max(hi, 1), shape, generator=gen)
            args.append(t.to(device=e.device, dtype=e.dtype))
        out.append(tuple(args))
    return out


def generated_batches(example_args: tuple, batches: int, batch_size: int = 32, seed: int = 0,
                      vocab: dict[int, int] | None = None) -> list[tuple]:
    """Data-free mode: inputs shaped like example_input. Floating inputs are drawn from a
    standard normal (matching the usual normalised inputs); integer inputs uniformly from
    the example's value range."""
    return batches_like(example_args, batches, batch_size, seed,
                        lambda shape, gen: torch.randn(shape, generator=gen, dtype=torch.float32), vocab)
