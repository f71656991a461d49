"""`ExpertQueue.enqueue(gather=True)` keeps the queues of all ranks identical (two gloo processes on CPU)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsedoctor_kernels as sdk

import brute

ROWS_PER_RANK = (5, 9)  # ranks bring different numbers of rows


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    rows = ROWS_PER_RANK[rank] + step
    return torch.randn(rows, 3, generator=gen), torch.randint(-1, 4, (rows,), generator=gen)


def _worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue = sdk.ExpertQueue(4, 6, 3)
        for step in range(3):
            keys, experts = _batch(rank, step)
            queue.enqueue(keys, experts, gather=True, validate=False)
        results[rank] = {name: t.clone() for name, t in queue.state_dict().items()}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_enqueue_gives_identical_queues_in_rank_then_row_order():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        states = [dict(results[r]) for r in range(world)]

    keys, ptr, size = torch.zeros(4, 6, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    for step in range(3):
        for rank in range(world):  # rank order, then row order
            keys, ptr, size = brute.enqueue(keys, ptr, size, *_batch(rank, step))
    for state in states:
        torch.testing.assert_close(state["keys"].double(), keys, rtol=0, atol=0)
        assert torch.equal(state["ptr"], ptr) and torch.equal(state["size"], size)
