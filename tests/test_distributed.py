"""The statistics pass sharded across processes (torch.distributed, gloo on the CPU): each rank
reads its share of the calibration batches, the running sums are all-reduced, and every rank
returns the merge a single process computes (< 1e-6 relative)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import pleas_fx

BUDGETS = [1.0, 1.5]


def _models():
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()

    gen = torch.Generator().manual_seed(7)
    data = [torch.randn(6, 3, 8, 8, generator=gen) for _ in range(5)]
    return make(0), make(1), data


def _worker(rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, b, data = _models()
        merged = pleas_fx.merge(a, b, data[0][:2], BUDGETS, data, **kwargs)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        torch.save({"outputs": [m(x).detach() for m in merged], "batches": merged[0].meta["pleas_fx"]["statistics"]},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("kwargs", [
    {"positions": "auto"},
    {"positions": 5},  # drawn positions: the same rows whatever the sharding
    # every rank distils on every batch; the 24 fit samples give the Linear layer fewer than 2 rows
    # per merged input entry (2 x 6 + 1): 2 mixup samples are topped up (passes/mixup.py), sharded
    {"positions": "auto", "distill": 3},
])
def test_two_gloo_processes_merge_as_one_process(tmp_path, kwargs):
    a, b, data = _models()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the distilled weights depend on the order of float sums
    try:
        single = pleas_fx.merge(a, b, data[0][:2], BUDGETS, data, **kwargs)
    finally:
        torch.set_num_threads(threads)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, _free_port(), out, kwargs), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        # every batch once (with distill, one batch of 6 samples -- one chunk -- held out of the merge)
        assert (got["batches"]["batches"], got["batches"]["samples"]) == ((4, 24) if "distill" in kwargs else (5, 30))
        for m, y in zip(single, got["outputs"]):
            expected = m(x).detach()
            assert float((y - expected).abs().max() / expected.abs().max()) < 1e-6


def test_without_a_process_group_nothing_is_sharded():
    from pleas_fx.passes.distributed import shard_total, sharded, world

    assert world() == (0, 1)
    assert list(sharded(range(5))) == [0, 1, 2, 3, 4] and shard_total(5) == 5
