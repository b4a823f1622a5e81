"""
The reference: M workers held in one process, one consensus round written as plainly as the math.

`DPPFConsensus` (buckets, asynchronous all-reduce, chunked norms, fused updates) must produce what this module
produces; the tests compare the two to 1e-6. Computed in float64 and cast back to each tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DPPFConfig
from .strategies import STRATEGIES


def _average(workers: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([w[j].double() for w in workers]).mean(0) for j in range(len(workers[0]))]


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


def simulate_round(
    workers: Sequence[Sequence[torch.Tensor]], config: DPPFConfig, push_scale: float = 1.0
) -> list[list[torch.Tensor]]:
    """
    Apply one consensus round to M workers held in memory, with no communication.

    Args:
        workers (`Sequence[Sequence[torch.Tensor]]`):
            `workers[i][j]` is worker i's j-th trainable parameter; every worker has the same shapes.
        config (`DPPFConfig`): the rule (`strategy`, `alpha`, `lam` or `width`, `eps`).
        push_scale (`float`, defaults to 1.0): multiplies the push, as the engine's `round(push_scale=...)`.

    Returns:
        `list[list[torch.Tensor]]`: the workers after the round (new tensors; the inputs are not modified).

    Example:
        ```python
        >>> cfg = DPPFConfig(alpha=0.5, lam=0.5)
        >>> simulate_round([[torch.tensor([0.0])], [torch.tensor([4.0])]], cfg)
        [[tensor([0.5000])], [tensor([3.5000])]]
        ```
    """
    _check(workers)
    strategy = STRATEGIES[config.strategy]
    avg = _average(workers)
    average_norm = torch.sqrt(sum((a**2).sum() for a in avg)).item()
    lam = config.push_strength(average_norm, push_scale)
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
    return out
