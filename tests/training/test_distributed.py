"""training.train.Distributed across two real processes (gloo on this machine's loopback):
what the ranks agree on is rank 0's."""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.subprocess  # two processes, a process group between them


def _rank(rank: int, init_file: str, results) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    from training.train import Distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    group = Distributed(torch.device("cpu"))
    # each rank's own clock differs; both leave with rank 0's reading
    results[rank] = group.agree(100.0 + 7.5 * rank)
    group.close()


def test_every_rank_gets_rank_zeros_value(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        assert dict(results) == {0: 100.0, 1: 100.0}


def test_a_single_process_keeps_its_own_value(monkeypatch):
    import torch

    from training.train import Distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Distributed(torch.device("cpu")).agree(12.25) == 12.25
