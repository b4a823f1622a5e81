"""
Overlapped (delayed) rounds, `DPPFConfig.overlap_steps = k > 0`, for the strategies that pull toward the plain
average (`dppf`, `avg`).

`launch()` copies every bucket's weights into its snapshot buffer and its wire buffer and starts the all-reduce;
training goes on. `k` optimizer steps later the engine lands the round: the round is formed from the snapshots
`s_i` (the average `x_A`, `r_i = ||s_i - x_A||`, the strategy's `c_i`) and its correction
`x_i += (1 - c_i) (x_A - s_i)` (buffers: `x += x_A - s`) is added to the current weights, so what each worker learnt
meanwhile is kept. With no training in between this is exactly the blocking round. The snapshot costs one extra copy
of the weights (kept for the layout's lifetime). Ops per bucket: 3 at launch, 4 at landing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import DPPFConfig
from ..strategies import STRATEGIES
from .buckets import Bucket, BucketLayout
from .collectives import Collectives
from .rounds import distances, norm, sum_of_squares


@dataclass
class InFlight:
    """An overlapped round between its launch and its landing."""

    due: int  # the optimizer step at which it lands
    push_scale: float
    blocked_ms: float  # time the launch held the worker


def launch(buckets: list[Bucket], comm: Collectives) -> None:
    """Snapshot every bucket and start its all-reduce (asynchronously)."""
    for b in buckets:
        snapshot = b.ensure_snapshot()
        torch._foreach_copy_(b.snapshot_views, b.tensors)
        b.comm.copy_(snapshot)
        b.work = comm.all_reduce(b.comm, async_op=True)


def measure(buckets: list[Bucket], comm: Collectives, m: int) -> torch.Tensor:
    """
    Wait for the launched all-reduces; turn every snapshot into `s_i - x_A` (in the snapshot's precision, whatever
    the wire's). Returns, on the device and summed over this worker's shards,
    `[||sum||^2, ||s_i - x_A||^2, sum of the buffers' squares]` (as `rounds.reduce`).
    """
    centre, diff, buffers = [], [], []
    for b in buckets:  # bucket k's math runs while buckets k+1, ... may still be in flight
        comm.wait(b.work)
        b.work = None
        (centre if b.is_param else buffers).append(norm(b.comm))
        b.snapshot.sub_(b.comm, alpha=1.0 / m)
        if b.is_param:
            diff.append(norm(b.snapshot))
    device = buckets[0].comm.device if buckets else torch.device("cpu")
    return comm.over_shards(torch.stack([sum_of_squares(n, device) for n in (centre, diff, buffers)]))


def land(buckets: list[Bucket], c: float) -> None:
    """Add the round's correction to the current weights: `x_i -= (1 - c) (s_i - x_A)`, buffers `x -= s - x_A`."""
    for b in buckets:
        weight = 1.0 - c if b.is_param else 1.0
        if weight != 0.0:
            torch._foreach_add_(b.tensors, b.snapshot_views, alpha=-weight)


def land_round(
    layout: BucketLayout, comm: Collectives, config: DPPFConfig, push_scale: float
) -> tuple[float, float, float, float] | None:
    """
    Land the launched round (two host reads): `(distance before, distance after, ||x_A||, lam)`, or `None` without
    touching the weights when a snapshot held NaN/Inf (the shared sum shows it on every rank).
    """
    m, buckets = comm.world_size, layout.buckets
    sq_sum, sq_diff, sq_buffers = measure(buckets, comm, m).tolist()  # host read 1
    if not (math.isfinite(sq_sum) and math.isfinite(sq_buffers)):
        return None
    rule = STRATEGIES[config.strategy]
    r, average_norm = math.sqrt(sq_diff), math.sqrt(sq_sum) / m
    lam = config.push_strength(average_norm, push_scale) if rule.pushes else 0.0
    c = rule.coefficient(r, config.alpha, lam, config.eps)
    land(buckets, c)
    r_dev = torch.tensor(r, dtype=torch.float64, device=layout.device())
    before, after = (distances(r_dev, c, comm) / m).tolist()  # host read 2
    return before, after, average_norm, lam
