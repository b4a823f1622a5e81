"""
The reference: M workers held in one process, one consensus round written as plainly as the math.

`DPPFConsensus` (buckets, asynchronous all-reduce, chunked norms, fused updates) must produce what this module
produces; the tests compare the two to 1e-6. Computed in float64 and cast back to each tensor's dtype. The baselines
take what the engine gets from `observe()` and its own state as explicit inputs: every worker's loss (lsgd), gradient
norm (grawa) and the centre variable (easgd).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import DPPFConfig
from .strategies import STRATEGIES, grawa_weight, leader_rank


def _average(workers: Sequence[Sequence[torch.Tensor]], wire: torch.dtype | None = None) -> list[torch.Tensor]:
    """
    The workers' average in float64. With a half-precision `wire` dtype, as the engine forms it there: each worker's
    tensors rounded to the wire dtype, summed in the wire dtype in rank order (a two-worker all-reduce sums exactly
    so), then divided by M in float64.
    """
    if wire is None or wire in (torch.float32, torch.float64):
        return [torch.stack([w[j].double() for w in workers]).mean(0) for j in range(len(workers[0]))]
    out = []
    for j in range(len(workers[0])):
        total = workers[0][j].to(wire)
        for w in workers[1:]:
            total = total + w[j].to(wire)
        out.append(total.double() / len(workers))
    return out


def _check(workers: Sequence[Sequence[torch.Tensor]]) -> None:
    if not workers:
        raise ValueError("simulate_round needs at least one worker, got an empty list.")
    shapes = [tuple(t.shape) for t in workers[0]]
    for i, w in enumerate(workers):
        if [tuple(t.shape) for t in w] != shapes:
            raise ValueError(f"worker {i} has parameter shapes {[tuple(t.shape) for t in w]}, worker 0 has {shapes}.")


def distances_to_average(workers: Sequence[Sequence[torch.Tensor]]) -> list[float]:
    """`r_i = ||x_i - x_A||`, one global L2 norm over all of a worker's tensors, for every worker."""
    _check(workers)
    avg = _average(workers)
    return [torch.sqrt(sum(((t.double() - a) ** 2).sum() for t, a in zip(w, avg))).item() for w in workers]


@dataclass
class SimulatedRound:
    """
    One simulated round.

    Attributes:
        workers (`list[list[torch.Tensor]]`): the workers after the round, in their own dtypes.
        centre (`list[torch.Tensor] | None`): easgd's centre variable after the round (float64), else `None`.
        leader (`int`): lsgd's leader, else -1.
    """

    workers: list[list[torch.Tensor]]
    centre: list[torch.Tensor] | None = None
    leader: int = -1


def simulate_round(
    workers: Sequence[Sequence[torch.Tensor]],
    config: DPPFConfig,
    push_scale: float = 1.0,
    *,
    losses: Sequence[float] | None = None,
    grad_norms: Sequence[float] | None = None,
    centre: Sequence[torch.Tensor] | None = None,
    wire_dtype: torch.dtype | None = None,
) -> list[list[torch.Tensor]]:
    """
    Apply one consensus round to M workers held in memory, with no communication.

    Args:
        workers (`Sequence[Sequence[torch.Tensor]]`):
            `workers[i][j]` is worker i's j-th trainable parameter; every worker has the same shapes.
        config (`DPPFConfig`): the rule (`strategy`, `alpha`, `lam` or `width`, `beta`, `eps`).
        push_scale (`float`, defaults to 1.0): multiplies the push, as the engine's `round(push_scale=...)`.
        losses (`Sequence[float]`, *optional*): every worker's loss since the last round (`strategy="lsgd"`).
        grad_norms (`Sequence[float]`, *optional*): every worker's gradient norm (`strategy="grawa"`).
        centre (`Sequence[torch.Tensor]`, *optional*):
            easgd's centre variable before the round; `None` on the first round (it starts at the average).
        wire_dtype (`torch.dtype`, *optional*): the engine's wire dtype (`DPPFConfig.comm_dtype`) when it is bf16 or
            fp16: the average is then rounded as on that wire (exact for two workers; `dppf` and `avg`).

    Returns:
        `list[list[torch.Tensor]]`: the workers after the round (new tensors; the inputs are not modified). Use
        `simulate_consensus` for easgd's new centre and lsgd's leader as well.

    Example:
        ```python
        >>> cfg = DPPFConfig(alpha=0.5, lam=0.5)
        >>> simulate_round([[torch.tensor([0.0])], [torch.tensor([4.0])]], cfg)
        [[tensor([0.5000])], [tensor([3.5000])]]
        ```
    """
    return simulate_consensus(
        workers, config, push_scale, losses=losses, grad_norms=grad_norms, centre=centre, wire_dtype=wire_dtype
    ).workers


def simulate_consensus(
    workers: Sequence[Sequence[torch.Tensor]],
    config: DPPFConfig,
    push_scale: float = 1.0,
    *,
    losses: Sequence[float] | None = None,
    grad_norms: Sequence[float] | None = None,
    centre: Sequence[torch.Tensor] | None = None,
    wire_dtype: torch.dtype | None = None,
) -> SimulatedRound:
    """`simulate_round` that also returns easgd's centre after the round and lsgd's leader (`SimulatedRound`)."""
    _check(workers)
    strategy = STRATEGIES[config.strategy]
    avg = _average(workers, wire_dtype)
    m, alpha = len(workers), config.alpha
    for name, given in (("loss", losses), ("grad_norm", grad_norms)):
        if name in strategy.needs and (given is None or len(given) != m):
            raise ValueError(f"strategy={config.strategy!r} needs one {name} per worker ({m}), got {given!r}.")
    if strategy.centre == "elastic":
        z = avg if centre is None else [c.double() for c in centre]
        if m == 1:  # the engine runs no round with one worker (plain local training)
            return SimulatedRound([[t.clone() for t in w] for w in workers], z)
        # EASGD (Zhang et al. 2015), synchronous: both moves use the values from before the round.
        new_z = [zj + config.moving_rate * (aj - zj) for zj, aj in zip(z, avg)]
        out = [[(t.double() - alpha * (t.double() - zj)).to(t.dtype) for t, zj in zip(w, z)] for w in workers]
        return SimulatedRound(out, new_z)
    if strategy.centre == "leader":
        leader = leader_rank(list(losses))
        x_l = [t.double() for t in workers[leader]]
        out = [
            [t.clone() for t in w]
            if i == leader
            else [(t.double() - alpha * (t.double() - c)).to(t.dtype) for t, c in zip(w, x_l)]
            for i, w in enumerate(workers)
        ]
        return SimulatedRound(out, leader=leader)
    if strategy.centre == "weighted":
        weights = [grawa_weight(g, config.eps) for g in grad_norms]
        total = sum(weights)
        c = [sum(wi * w[j].double() for wi, w in zip(weights, workers)) / total for j in range(len(avg))]
        out = [[(t.double() - alpha * (t.double() - cj)).to(t.dtype) for t, cj in zip(w, c)] for w in workers]
        return SimulatedRound(out)
    average_norm = torch.sqrt(sum((a**2).sum() for a in avg)).item()
    # push_mode="step": the round only pulls; the push comes at every local step (`simulate_step_push`)
    lam = config.push_strength(average_norm, push_scale) if config.push_mode == "round" else 0.0
    out = []
    for w in workers:
        d = [t.double() - a for t, a in zip(w, avg)]
        r = torch.sqrt(sum((di**2).sum() for di in d)).item()
        # written from the rule, x_i - alpha * d_i + lam * d_i / r_i, for dppf; other rules through their coefficient
        if config.strategy == "dppf":
            push = lam / r if r > config.eps else 0.0
            new = [t.double() - config.alpha * di + push * di for t, di in zip(w, d)]
        else:
            c = strategy.coefficient(r, config.alpha, lam, config.eps)
            new = [a + c * di for a, di in zip(avg, d)]
        out.append([n.to(t.dtype) for n, t in zip(new, w)])
    return SimulatedRound(out)


def simulate_delayed_round(
    snapshots: Sequence[Sequence[torch.Tensor]],
    currents: Sequence[Sequence[torch.Tensor]],
    config: DPPFConfig,
    push_scale: float = 1.0,
    wire_dtype: torch.dtype | None = None,
) -> list[list[torch.Tensor]]:
    """
    An overlapped round (`config.overlap_steps > 0`): the round is computed from the weights the workers had at its
    launch and its correction is added to the weights they have when it lands, so the progress made meanwhile is
    kept: `current_i + (simulate_round(snapshots)_i - snapshot_i)`.

    Args:
        snapshots (`Sequence[Sequence[torch.Tensor]]`): every worker's tensors when the round was launched.
        currents (`Sequence[Sequence[torch.Tensor]]`): every worker's tensors when it lands (same shapes).
        config (`DPPFConfig`): the rule (`dppf` or `avg`: the strategies with an overlapped form).
        push_scale (`float`, defaults to 1.0): the push's schedule factor at launch.
        wire_dtype (`torch.dtype`, *optional*): a half-precision wire's dtype (see `simulate_round`).

    Returns:
        `list[list[torch.Tensor]]`: the workers after the round lands, in their own dtypes.

    Example:
        ```python
        >>> cfg = DPPFConfig(strategy="avg", tau=2, overlap_steps=1)
        >>> simulate_delayed_round([[torch.tensor([0.0])], [torch.tensor([4.0])]],
        ...                        [[torch.tensor([1.0])], [torch.tensor([4.5])]], cfg)
        [[tensor([3.])], [tensor([2.5000])]]
        ```
    """
    _check(snapshots)
    if len(currents) != len(snapshots):
        raise ValueError(f"got {len(snapshots)} snapshots but {len(currents)} current workers.")
    if STRATEGIES[config.strategy].centre != "average":
        raise ValueError(f"strategy={config.strategy!r} has no overlapped form (only 'dppf' and 'avg').")
    rounded = simulate_round(snapshots, config, push_scale, wire_dtype=wire_dtype)
    return [
        [(c.double() + (r.double() - s.double())).to(c.dtype) for c, r, s in zip(cur, rnd, snap)]
        for cur, rnd, snap in zip(currents, rounded, snapshots)
    ]


def simulate_step_push(
    workers: Sequence[Sequence[torch.Tensor]],
    average: Sequence[torch.Tensor],
    config: DPPFConfig,
    push_scale: float = 1.0,
) -> list[list[torch.Tensor]]:
    """
    One local step's push under `push_mode="step"`: the gradient step of the relaxed Inverse-Mean-Valley regulariser
    against the average of the last round, `x_i + push_scale * (lam / tau) * (x_i - x_A) / ||x_i - x_A||` (no push
    where `||x_i - x_A|| <= eps`), with `lam` the round's: the explicit `lam`, or `alpha * width * ||x_A||`.

    Args:
        workers (`Sequence[Sequence[torch.Tensor]]`): every worker's tensors after its optimizer step.
        average (`Sequence[torch.Tensor]`): `x_A`, the workers' average at the last round.
        config (`DPPFConfig`): the rule (`lam` or `width`, `alpha`, `tau`, `eps`).
        push_scale (`float`, defaults to 1.0): the schedule's factor at this step (`lr_t / lr_0`).

    Returns:
        `list[list[torch.Tensor]]`: the workers after the push, in their own dtypes.
    """
    _check(workers)
    x_a = [a.double() for a in average]
    lam = config.push_strength(torch.sqrt(sum((a**2).sum() for a in x_a)).item())
    strength = push_scale * lam / config.tau
    out = []
    for w in workers:
        d = [t.double() - a for t, a in zip(w, x_a)]
        r = torch.sqrt(sum((di**2).sum() for di in d)).item()
        push = strength / r if r > config.eps else 0.0
        out.append([(t.double() + push * di).to(t.dtype) for t, di in zip(w, d)])
    return out
