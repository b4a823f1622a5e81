"""
Consensus rules as pure math: no communication, no buffers.

Every rule in this module moves a worker along the line through a *centre* and its own weights,

    x_i  <-  centre + c_i * (x_i - centre),

so a rule is a centre and one scalar per worker, `c_i`, computed from that worker's distance `r_i = ||x_i - centre||`.
The centres:

- `"average"`: the workers' average `x_A` (`dppf`, `avg`);
- `"elastic"`: a centre variable `z` that every worker keeps identically and that moves toward `x_A` by `beta` each
  round (`easgd`);
- `"leader"`: the weights of the worker with the lowest recent training loss (`lsgd`);
- `"weighted"`: the average weighted by `1 / (||g_i|| + eps)`, `g_i` the worker's recent gradient (`grawa`).

The engine (`hf_dppf.engine`) and the oracle (`simulate.py`) both take `c_i` from `Strategy.coefficient` and the scalar
choices (`leader_rank`, `grawa_weight`) from here, so they cannot disagree on them; the closed-form tests check the
rules themselves. What each round communicates is listed in `Strategy.communication`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CENTRES = ("average", "elastic", "leader", "weighted")


def dppf_coefficient(r: float, alpha: float, lam: float, eps: float) -> float:
    """
    DPPF's pull-push: `x_i - alpha * d_i + lam * d_i / r_i` is `x_A + (1 - alpha + lam / r_i) * d_i`.

    The push is only applied where `r_i > eps`. A worker at distance `r` lands at `|1 - alpha + lam / r| * r`, which
    is `(1 - alpha) * r + lam` whenever the push does not overshoot, so the distance settles at `lam / alpha`.
    """
    push = lam / r if r > eps else 0.0
    return 1.0 - alpha + push


def avg_coefficient(r: float, alpha: float, lam: float, eps: float) -> float:
    """Local SGD (parameter averaging): every worker is replaced by the average."""
    return 0.0


def pull_coefficient(r: float, alpha: float, lam: float, eps: float) -> float:
    """A pure pull toward the centre by `alpha`: `x_i - alpha * (x_i - centre)` is `centre + (1 - alpha) * d_i`."""
    return 1.0 - alpha


def leader_rank(losses: Sequence[float]) -> int:
    """
    The LSGD leader: the rank with the lowest loss; ties go to the lowest rank, and a non-finite loss (NaN, inf) never
    leads unless every loss is non-finite (then rank 0).
    """
    if not losses:
        raise ValueError("leader_rank needs one loss per worker, got an empty sequence.")
    keyed = [(v if math.isfinite(v) else math.inf, i) for i, v in enumerate(losses)]
    return min(keyed)[1]


def grawa_weight(grad_norm: float | torch.Tensor, eps: float) -> float | torch.Tensor:
    """
    GRAWA's weight of a worker, `1 / (||g_i|| + eps)`; 0 for a non-finite or negative gradient norm (that worker has no
    say). A tensor gives a tensor, computed on its device without a host read (the engine's form).
    """
    if isinstance(grad_norm, torch.Tensor):
        ok = torch.isfinite(grad_norm) & (grad_norm >= 0)
        return torch.where(ok, 1.0 / (grad_norm.clamp(min=0) + eps), 0.0)
    if not math.isfinite(grad_norm) or grad_norm < 0:
        return 0.0
    return 1.0 / (grad_norm + eps)  # DPPFConfig requires eps > 0 for grawa


@dataclass(frozen=True)
class Strategy:
    """
    A consensus rule.

    Args:
        name (`str`): the value of `DPPFConfig.strategy`.
        coefficient (`Callable[[float, float, float, float], float]`): `(r_i, alpha, lam, eps) -> c_i`.
        pushes (`bool`): whether `lam` / `width` mean anything for this rule.
        description (`str`): one line for `--help` and the README.
        centre (`str`, defaults to `"average"`): what the worker moves toward, one of `CENTRES`.
        needs (`tuple[str, ...]`, defaults to `()`):
            What each worker must feed the engine between rounds (`engine.observe(loss=..., grad_norm=...)`).
        communication (`str`): what one round sends, in terms of P (the trainable parameters' bytes on the wire)
            and B (the floating buffers' bytes); M is the number of workers.
    """

    name: str
    coefficient: Callable[[float, float, float, float], float]
    pushes: bool
    description: str
    centre: str = "average"
    needs: tuple[str, ...] = ()
    communication: str = "all-reduce of P + B, all-reduce of 16 bytes (distance statistics)"


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("dppf", dppf_coefficient, True, "pull toward the average by alpha, push out by lam (DPPF)"),
        Strategy("avg", avg_coefficient, False, "replace every worker by the average (Local SGD)"),
        Strategy(
            "easgd",
            pull_coefficient,
            False,
            "elastic averaging: pull toward a shared centre variable by alpha, move the centre toward the average "
            "by beta (EASGD)",
            centre="elastic",
        ),
        Strategy(
            "lsgd",
            pull_coefficient,
            False,
            "pull every worker toward the worker with the lowest recent training loss by alpha (Leader SGD)",
            centre="leader",
            needs=("loss",),
            communication="all-reduce of 8M bytes (losses), broadcast of P from the leader, all-reduce of B, "
            "all-reduce of 16 bytes",
        ),
        Strategy(
            "grawa",
            pull_coefficient,
            False,
            "pull toward the average weighted by 1 / ||gradient|| of each worker by alpha (GRAWA)",
            centre="weighted",
            needs=("grad_norm",),
            communication="all-reduce of 8M bytes (weights), all-reduce of P + B, all-reduce of 16 bytes",
        ),
    )
}
