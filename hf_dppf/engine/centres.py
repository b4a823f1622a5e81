"""
The rounds of the baselines that pull toward a centre other than the plain average (`hf_dppf.strategies`):

- `easgd`: a centre variable `z`, kept by every worker identically (engine state, checkpointed by parameter name):
  `x_i <- z + c (x_i - z)`, then `z <- z + beta (x_A - z)`; it rides in one flat buffer per bucket.
- `lsgd` and `grawa`: the parameter buckets are filled with the centre itself (`fill`): lsgd broadcasts the leader's
  weights, grawa all-reduces `(w_i / W) x_i`; then every worker moves by `c = 1 - alpha` toward it (`pull`).

Their pull does not depend on `r_i`, so no host read is needed between the communication and the write-back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..config import DPPFConfig
from ..strategies import Strategy, grawa_weight, leader_rank
from . import health
from .buckets import Bucket, BucketLayout
from .collectives import Collectives
from .rounds import Outcome, difference, distances, norm, reduce_healthy, squares, sum_of_squares


def ensure_centre(params: list[Bucket], saved: dict[str, torch.Tensor], initial: str = "average") -> None:
    """
    The centre buffers, one per parameter bucket: easgd's centre variable, or the last round's average under
    `push_mode="step"`. A new buffer is filled from `saved` (by name) or, for a tensor seen the first time, from the
    average `x_A` (`initial="average"`: the bucket's views after the reduction) or from the tensor itself
    (`initial="tensor"`); `saved` then holds views of the buffers. Per-tensor work, but only when the layout changes
    or a checkpoint was loaded.
    """
    for b in params:
        if not b.ensure_centre():
            continue
        starts = b.views if initial == "average" else b.tensors
        for key, x, start, z in zip(b.keys, b.tensors, starts, b.centre_views):
            old = saved.get(key)
            if old is not None and old.shape != x.shape:
                raise ValueError(
                    f"centre variable {key!r} has shape {tuple(old.shape)} but the parameter has {tuple(x.shape)}: "
                    "the checkpoint belongs to another model."
                )
            z.copy_(old if old is not None else start)
            saved[key] = z


def step_push(params: list[Bucket], saved: dict[str, torch.Tensor], comm: Collectives, strength: float, eps: float):
    """
    `push_mode="step"`: `x_i <- x_i + strength * (x_i - x_A) / ||x_i - x_A||` against the last round's average
    (the centre buffers), only where the global `||x_i - x_A|| > eps`. Four ops per bucket and no host read: the
    difference is formed in the weights themselves, its norm and the factor stay on the device.
    """
    ensure_centre(params, saved, initial="tensor")
    norms: list[torch.Tensor] = []
    for b in params:
        torch._foreach_sub_(b.tensors, b.centre_views)  # x_i - x_A, in place
        norms += torch._foreach_norm(b.tensors)
    if not norms:
        return
    r = squares(norms, params[0].comm.device, comm)[0].sqrt()
    factor = 1.0 + torch.where(r > eps, strength / r, 0.0)
    for b in params:
        torch._foreach_mul_(b.tensors, factor.to(b.tensors[0].dtype))
        torch._foreach_add_(b.tensors, b.centre_views)


def elastic(buckets: list[Bucket], c: float, beta: float, measure: bool) -> tuple[list, list]:
    """
    easgd's move, on buckets that hold the exact average `x_A` (`rounds.reduce(exact=True)`); buffers take `x_A`.

    Returns:
        `(distances, centre norms)`: per-tensor `||x_i - z||` (empty without `measure`) and per-bucket `||z||`, both
        before the move, as device tensors.
    """
    params = [b for b in buckets if b.is_param]
    z_norms = torch._foreach_norm([b.centre for b in params]) if params else []
    distances: list[torch.Tensor] = []
    for b in buckets:
        if not b.is_param:
            torch._foreach_copy_(b.tensors, b.views)
            continue
        if measure:
            torch._foreach_sub_(b.tensors, b.centre_views)  # x_i - z (x_i is rewritten below)
            distances += torch._foreach_norm(b.tensors)
        if c == 0.0:  # alpha = 1, or a re-seeded worker (0 * NaN would keep the NaN)
            torch._foreach_copy_(b.tensors, b.centre_views)
        else:
            torch._foreach_mul_(b.tensors, c)
            torch._foreach_add_(b.tensors, b.centre_views)
        if b.same_dtype:
            b.centre.lerp_(b.comm, beta)
        else:
            b.centre.mul_(1.0 - beta).add_(b.comm, alpha=beta)
    return distances, list(z_norms)


def fill(buckets: list[Bucket], comm: Collectives, leader: int, scale: float, contribute: bool) -> None:
    """
    Start filling the parameter buckets with the centre: the leader's weights (`leader >= 0`, a broadcast) or the
    weighted sum `sum_i scale_i x_i` (an all-reduce); buffer buckets get the plain sum. A worker that does not
    `contribute` sends zeros.
    """
    for b in buckets:
        if b.is_param and leader >= 0:
            if comm.rank == leader:
                b.copy_in()
            b.work = comm.broadcast(b.comm, leader, async_op=True)
            continue
        if not contribute:
            b.comm.zero_()
        else:
            b.copy_in()
            if b.is_param:
                b.comm.mul_(scale)
        b.work = comm.all_reduce(b.comm, async_op=True)


def pull(buckets: list[Bucket], comm: Collectives, c: float, moves: bool, healthy: int) -> torch.Tensor:
    """
    Wait for `fill` and move: `x_i += (1 - c) (centre - x_i)` when the worker `moves`; a worker that does not move
    stays (the leader) or, with `c = 0`, takes the centre (a re-seeded worker). Buffers take the average of the
    `healthy` workers.

    Returns:
        `torch.Tensor`: on the device, float64, `[||centre||^2, ||x_i - centre||^2]` over this worker's shards.
    """
    centre, diff = [], []
    for b in buckets:
        comm.wait(b.work)
        b.work = None
        if not b.is_param:
            b.comm.div_(healthy)
            torch._foreach_copy_(b.tensors, b.views)
            continue
        centre.append(norm(b.comm))
        if moves:
            flat, views = difference(b, 1.0)
            diff.append(norm(flat))
            torch._foreach_add_(b.tensors, views, alpha=1.0 - c)
        elif c == 0.0:
            torch._foreach_copy_(b.tensors, b.views)
    device = buckets[0].comm.device if buckets else torch.device("cpu")
    return comm.over_shards(torch.stack([sum_of_squares(n, device) for n in (centre, diff)]))


def elastic_round(
    layout: BucketLayout,
    comm: Collectives,
    config: DPPFConfig,
    rule: Strategy,
    where: Callable[[], str],
    saved: dict[str, torch.Tensor],
) -> Outcome:
    """easgd: the plain all-reduce (host read 1: the norms, for a NaN/Inf worker), then the move toward `z`."""
    _, count, mine, _ = reduce_healthy(layout, comm, config, where(), True)
    ensure_centre([b for b in layout.buckets if b.is_param], saved, initial="average")
    c = rule.coefficient(0.0, config.alpha, 0.0, config.eps) if mine else 0.0
    dist_norms, z_norms = elastic(layout.buckets, c, config.moving_rate, measure=mine)
    device = layout.device()
    dists = distances(squares(dist_norms, device, comm)[0].sqrt(), c, comm)
    return Outcome(torch.cat([dists, squares(z_norms, device, comm)]), count, mine)


def centre_round(
    layout: BucketLayout,
    comm: Collectives,
    config: DPPFConfig,
    rule: Strategy,
    where: Callable[[], str],
    observed: dict[str, float | torch.Tensor],
) -> Outcome:
    """
    lsgd and grawa: one all-reduce of every worker's loss (lsgd) or weight `1 / (||g_i|| + eps)` (grawa) elects the
    leader or sets the weights (host read 1), then the parameter buckets are filled with the centre and every worker
    is pulled toward it. A worker whose weights are not finite sends NaN instead of its value: it never leads, has no
    weight, and takes the centre (`config.nonfinite_policy`).
    """
    buckets = layout.ensure()
    device = layout.device()
    value_t = torch.as_tensor(observed[rule.needs[0]], dtype=torch.float64, device=device).reshape(1)
    if comm.sharded:  # a worker of several ranks: the mean of its ranks' losses (or gradient norms) is its value
        value_t = comm.over_shards(value_t) / dist.get_world_size(comm.norm_group)
    if rule.centre == "leader":  # a NaN loss never leads
        value_t = torch.where(torch.isfinite(value_t), value_t, math.inf)
    else:
        value_t = grawa_weight(value_t, config.eps)
    shared = torch.zeros(comm.world_size, dtype=torch.float64, device=device)
    shared[comm.rank] = torch.where(health.local_bad(layout, comm) == 0, value_t[0], math.nan)
    comm.all_reduce(shared)
    values = shared.tolist()  # host read 1
    healthy = [i for i, v in enumerate(values) if not math.isnan(v)]
    if len(healthy) < comm.world_size:
        health.apply_policy(config.nonfinite_policy, healthy, comm.world_size, where(), config.comm_dtype)
    mine, leader, scale = comm.rank in healthy, -1, 0.0
    if rule.centre == "leader":
        leader = healthy[leader_rank([values[i] for i in healthy])]
    else:
        total = sum(values[i] for i in healthy)
        if not total > 0:
            raise RuntimeError(
                f"grawa: the workers' weights 1/(||g||+eps) sum to {total}: every healthy worker fed a non-finite "
                "gradient norm, so there is no centre to pull toward."
            )
        scale = values[comm.rank] / total if mine else 0.0
    fill(buckets, comm, leader, scale, contribute=mine)
    moves = mine and comm.rank != leader
    # the leader stays (c = 1), a re-seeded worker takes the centre (c = 0)
    c = rule.coefficient(0.0, config.alpha, 0.0, config.eps) if moves else float(mine)
    sq = pull(buckets, comm, c, moves, len(healthy))
    dists = distances(sq[1].sqrt(), c, comm)
    return Outcome(torch.cat([dists, sq[:1]]), len(healthy), mine, leader=leader)
