"""The test helpers themselves: `count_collectives` is the byte oracle, so it must count exactly on every torch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import count_collectives, run_distributed


class _Missing:
    """`FunctionEvent.input_dtypes` as on torch 2.11: assigning it is ignored, reading it is an AttributeError."""

    def __set__(self, obj, value) -> None:
        pass

    def __get__(self, obj, owner=None):
        raise AttributeError("'FunctionEvent' object has no attribute 'input_dtypes'")


def _count(rank: int, world_size: int) -> list[tuple[int, int]]:
    from torch.autograd import profiler_util

    profiler_util.FunctionEvent.input_dtypes = _Missing()
    counts = []
    for dtype, numel in ((torch.float32, 10), (torch.bfloat16, 6), (torch.float16, 3), (torch.float64, 2)):
        with count_collectives() as log:
            dist.all_reduce(torch.ones(numel, dtype=dtype))
            dist.barrier()  # synchronises, sends no payload: not counted
        counts.append((log.count, log.bytes))
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(5, 3))
    with count_collectives() as log:  # DDP's C++ reducer: one bucket of fp32 gradients
        model(torch.ones(2, 5)).sum().backward()
    counts.append((log.count, log.bytes))
    return counts


def test_count_collectives_counts_exact_bytes_without_function_event_dtypes() -> None:
    for counts in run_distributed(_count, 2):
        assert counts == [(1, 40), (1, 12), (1, 6), (1, 16), (1, 4 * (5 * 3 + 3))]
