"""
Consensus rules as pure math: no communication, no buffers.

Every rule in this module moves a worker along the line through the average and its own weights,

    x_i  <-  x_A + c_i * (x_i - x_A),

so a rule is one scalar per worker, `c_i`, computed from that worker's distance `r_i = ||x_i - x_A||`. The engine
(`consensus.py`) and the oracle (`simulate.py`) both call `Strategy.coefficient`, so they cannot disagree on the
rule; the closed-form tests check the rule itself.

Communication per round: one all-reduce of the parameters (and floating buffers) plus one of two scalars (the
distance statistics), for every strategy here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Strategy:
    """
    A consensus rule.

    Args:
        name (`str`): the value of `DPPFConfig.strategy`.
        coefficient (`Callable[[float, float, float, float], float]`): `(r_i, alpha, lam, eps) -> c_i`.
        pushes (`bool`): whether `lam` / `width` mean anything for this rule.
        description (`str`): one line for `--help` and the README.
    """

    name: str
    coefficient: Callable[[float, float, float, float], float]
    pushes: bool
    description: str


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("dppf", dppf_coefficient, True, "pull toward the average by alpha, push out by lam (DPPF)"),
        Strategy("avg", avg_coefficient, False, "replace every worker by the average (Local SGD)"),
    )
}
