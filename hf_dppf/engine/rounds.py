"""
The round's tensor math on the bucket layout: reduce, norms, write-back. No host reads and no policy here: every
function issues a fixed number of ops per bucket (a `torch._foreach_*` over the bucket's tensors, or one op on its
flat buffer), returns norms as device tensors, and leaves the decisions (coefficients, non-finite workers) to the
engine, which reads the host twice per round.

Every strategy moves a worker along the line through a centre and its own weights (`hf_dppf.strategies`). After the
reduction a bucket's wire buffer holds `k * centre` (`k = M` for the plain sum of M workers, `k = 1` when it already
holds the centre: lsgd's broadcast, grawa's weighted sum). From there two ways lead on:

- *difference* (a push or a partial pull): `comm <- comm - k * x_i = k * (centre - x_i)`, whose norm is `k * r_i`;
  the write-back is one fused `x_i += (1 - c_i) / k * comm`.
- *exact* (the worker becomes the centre: `avg`, `averaged()`, buffers, re-seeded workers): `comm <- comm / k`; the
  write-back is a copy, so every worker holds the same bits.

With a half-precision wire the buffer holds the sum in bf16/fp16: the difference is formed in a float32 scratch
buffer (one per layout, as large as the largest bucket) and formed again at write-back, so no full-size float32
copy of the model is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import DPPFConfig
from ..strategies import Strategy
from .buckets import Bucket, BucketLayout
from .collectives import Collectives
from .health import apply_policy, healthy_workers

F32 = torch.float32


@dataclass
class Outcome:
    """What a round leaves to be read (once) and recorded."""

    reading: torch.Tensor  # on the device: [sum_i r_i, sum_i |c_i| r_i] (+ ||centre||^2 when not yet known)
    count: int  # the workers that took part (the healthy ones)
    mine: bool  # whether this worker took part (else it was re-seeded)
    lam: float = 0.0
    average_norm: float | None = None  # known from host read 1, else read with the distances
    leader: int = -1  # lsgd's leader


def norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a flat buffer, accumulated in at least float32 (float64 stays float64): one op."""
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, F32))


def sum_of_squares(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """`sum n^2` over partial norms, in float64 on the device (a constant number of ops, whatever the count)."""
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(norms).double().square().sum()


def start(buckets: list[Bucket], comm: Collectives, contribute: bool = True) -> None:
    """Copy every bucket onto the wire (zeros for a worker that does not contribute) and start its all-reduce."""
    for b in buckets:
        if contribute:
            b.copy_in()
        else:
            b.comm.zero_()
        b.work = comm.all_reduce(b.comm, async_op=True)


def difference(b: Bucket, k: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """
    Form `k * (centre - x_i)` from a bucket whose wire buffer holds `k * centre`: in place on the wire buffer, or in
    the scratch buffer for a half-precision wire. Returns the flat difference and its views.
    """
    if b.same_dtype:
        torch._foreach_sub_(b.views, b.tensors, alpha=k)
        return b.comm, b.views
    b.scratch.copy_(b.comm)
    torch._foreach_sub_(b.scratch_views, b.tensors, alpha=k)
    return b.scratch, b.scratch_views


def reduce(
    buckets: list[Bucket], comm: Collectives, k: float, *, exact: bool, contribute: bool = True
) -> torch.Tensor:
    """
    All-reduce every bucket and measure, bucket by bucket while the later ones are still in flight.

    Args:
        buckets: the layout.
        comm: the collectives.
        k (`float`): what the sum is divided by to give the centre (the number of contributing workers).
        exact (`bool`): parameter buckets end holding the centre (else `k * (centre - x_i)`, or the sum for a
            half-precision wire). Buffer buckets always end holding the average.
        contribute (`bool`): `False` sends zeros (a worker with NaN/Inf weights).

    Returns:
        `torch.Tensor`: on the device, float64, summed over this worker's shards:
        `[||k centre||^2, ||k (centre - x_i)||^2 (0 when exact), sum of the buffers' squares]`; a NaN/Inf in any
        worker shows in the first or the last.
    """
    start(buckets, comm, contribute)
    centre, diff, buffers = [], [], []
    for b in buckets:
        comm.wait(b.work)
        b.work = None
        if not b.is_param:
            buffers.append(norm(b.comm))
            b.comm.div_(k)
            continue
        centre.append(norm(b.comm))
        if exact:
            b.comm.div_(k)
        else:
            diff.append(norm(difference(b, k)[0]))
    device = buckets[0].comm.device if buckets else torch.device("cpu")
    squares = [sum_of_squares(n, device) for n in (centre, diff, buffers)]
    return comm.over_shards(torch.stack(squares))


def write_difference(b: Bucket, k: float, weight: float) -> None:
    """`x_i += weight * k * (centre - x_i)` for a parameter bucket left by `reduce(exact=False)`."""
    views = b.views if b.same_dtype else difference(b, k)[1]
    torch._foreach_add_(b.tensors, views, alpha=weight)


def settle(buckets: list[Bucket], measure: bool) -> list[torch.Tensor]:
    """
    Every worker takes the centre its buckets hold (`reduce(exact=True)`), bit for bit the same on every rank. With
    `measure`, first measure `||x_i - centre||` per tensor (the round's statistics; `x_i` is overwritten anyway).

    Returns:
        `list[torch.Tensor]`: the per-tensor distances (empty without `measure`).
    """
    norms: list[torch.Tensor] = []
    for b in buckets:
        if b.is_param and measure:
            torch._foreach_sub_(b.tensors, b.views)
            norms += torch._foreach_norm(b.tensors)
        torch._foreach_copy_(b.tensors, b.views)
    return norms


def distances(r: torch.Tensor, c: float, comm: Collectives) -> torch.Tensor:
    """
    `[sum_i r_i, sum_i |c_i| r_i]` over the workers (one all-reduce of 16 bytes), from this worker's `r_i` (a device
    scalar; zero for a re-seeded worker). Not read here.
    """
    dists = torch.stack([r, r * abs(c)]).double()
    comm.all_reduce(dists)
    return dists


def squares(norms: list[torch.Tensor], device: torch.device, comm: Collectives) -> torch.Tensor:
    """`sum n^2` of partial norms, over this worker's shards: a 1-element float64 device tensor, not read."""
    return comm.over_shards(sum_of_squares(norms, device).reshape(1))


def average_round(
    layout: BucketLayout,
    comm: Collectives,
    config: DPPFConfig,
    rule: Strategy,
    where: Callable[[], str],
    push_scale: float,
    anchors: dict[str, torch.Tensor] | None = None,
) -> Outcome:
    """
    dppf and avg: pull toward (and push from) the plain average. The norms are read once (host read 1): they give
    `c_i` and reveal a NaN/Inf worker. A round whose `c_i` is 0 for sure (avg; dppf with alpha = 1 and no push at the
    round) leaves every worker on the exact average. Under `push_mode="step"` the round only pulls and, given
    `anchors`, keeps this round's average in the centre buffers (by name in `anchors`) for the steps until the next.
    """
    alpha = config.alpha
    round_push = rule.pushes and config.push_mode == "round"
    zero_push = not round_push or config.push_strength(1.0, push_scale) == 0.0
    exact = not rule.pushes or (alpha == 1.0 and zero_push)
    (sq_sum, sq_diff, _), count, mine, exact = reduce_healthy(layout, comm, config, where(), exact)
    average_norm = math.sqrt(sq_sum) / count
    lam = config.push_strength(average_norm, push_scale) if rule.pushes else 0.0
    if exact:  # every worker takes the average, bit for bit the same on every rank
        r, c = squares(settle(layout.buckets, measure=mine), layout.device(), comm)[0].sqrt(), 0.0
    else:
        r_host = math.sqrt(sq_diff) / count
        c = rule.coefficient(r_host, alpha, lam if round_push else 0.0, config.eps)
        for b in layout.buckets:
            if b.is_param:
                write_difference(b, count, (1.0 - c) / count)
            else:
                torch._foreach_copy_(b.tensors, b.views)
        r = torch.tensor(r_host, dtype=torch.float64, device=layout.device())
    if anchors is not None:
        keep_average(layout.buckets, anchors, count, c, exact)
    return Outcome(distances(r, c, comm), count, mine, lam, average_norm)


def keep_average(buckets: list[Bucket], anchors: dict[str, torch.Tensor], k: int, c: float, exact: bool) -> None:
    """
    After a round's write-back, each parameter bucket's centre buffer takes the round's average `x_A` (2 ops per
    bucket at most): the wire buffer holds it (`exact`), or the sum (a half-precision wire), or `k (x_A - x_old)`
    with `x_new = x_old + (1 - c) (x_A - x_old)`, so that `x_A = x_new + c / k * buffer`.
    """
    for b in buckets:
        if not b.is_param:
            continue
        if b.ensure_centre():  # views are recorded by name once per buffer, not every round
            anchors.update(zip(b.keys, b.centre_views))
        if exact:
            b.centre.copy_(b.comm)
        elif b.same_dtype:
            torch._foreach_copy_(b.centre_views, b.tensors)
            b.centre.add_(b.comm, alpha=c / k)
        else:
            b.centre.copy_(b.comm).div_(k)


def reduce_healthy(
    layout: BucketLayout, comm: Collectives, config: DPPFConfig, where: str, exact: bool
) -> tuple[list[float], int, bool, bool]:
    """
    `rounds.reduce` that never averages a NaN in: when the shared sum is not finite, find the bad workers (one
    small all-reduce), apply the policy, and reduce again over the healthy ones, the bad ones sending zeros and
    taking the average. Returns the squares (host read 1), the number of healthy workers, whether this one is, and
    whether its buckets hold the exact average.
    """
    buckets = layout.ensure()
    squares = reduce(buckets, comm, comm.world_size, exact=exact).tolist()
    if math.isfinite(squares[0]) and math.isfinite(squares[2]):
        return squares, comm.world_size, True, exact
    healthy = healthy_workers(layout, comm)
    apply_policy(config.nonfinite_policy, healthy, comm.world_size, where, config.comm_dtype)
    mine = comm.rank in healthy
    exact = exact or not mine
    squares = reduce(buckets, comm, len(healthy), exact=exact, contribute=mine).tolist()
    return squares, len(healthy), mine, exact


def reseed(layout: BucketLayout, comm: Collectives, config: DPPFConfig, where: str) -> tuple[int, bool] | None:
    """
    Give the workers with NaN/Inf weights the healthy workers' average (`DPPFConsensus.ensure_finite`): one
    all-reduce of M flags and one host read, and only if a worker is bad one reduction. Returns `None` when all are
    finite, else the number of healthy workers and whether this one is.
    """
    healthy = healthy_workers(layout, comm)
    if len(healthy) == comm.world_size:
        return None
    apply_policy(config.nonfinite_policy, healthy, comm.world_size, where, config.comm_dtype)
    mine = comm.rank in healthy
    buckets = layout.ensure()
    reduce(buckets, comm, len(healthy), exact=True, contribute=mine)
    if not mine:
        settle(buckets, measure=False)
    return len(healthy), mine
