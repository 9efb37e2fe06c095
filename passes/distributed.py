"""Statistics passes sharded across processes with torch.distributed (under torchrun: gloo on
the CPU, NCCL on GPUs). Every rank reads its share of the calibration batches (batch i goes to
rank i mod world size), accumulates its running sums, and the sums are all-reduced, so every
rank ends with the statistics of all batches and then solves the same model. Without an
initialised process group of two or more ranks, everything here is a no-op."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded(batches: Iterable) -> Iterator:
    """This rank's share of `batches`: every world-size-th batch, starting at the rank."""
    rank, size = world()
    for i, batch in enumerate(batches):
        if i % size == rank:
            yield batch


def shard_total(total: int | None) -> int | None:
    """How many of `total` batches this rank reads (for progress bars)."""
    rank, size = world()
    return None if total is None else len(range(rank, total, size))


def all_reduce_sums(tensors: list[torch.Tensor], counts: list[int]) -> list[int]:
    """Sum every tensor in place over the ranks, and the integer counts; returns the counts.
    The tensors are reduced in the given order (every rank must give the same list)."""
    rank, size = world()
    if size == 1:
        return counts
    dist = torch.distributed
    for t in tensors:
        dist.all_reduce(t)
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return [int(round(c)) for c in total.tolist()]
