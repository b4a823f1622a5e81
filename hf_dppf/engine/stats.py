"""
What the engine reports and what it checkpoints: `DPPFStats` (the counters the integrations log) and the state dict
that lets a restarted run continue exactly (step counter, statistics, what `observe()` was fed, easgd's centre).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# What `observe()` takes: the inputs of lsgd (`loss`) and grawa (`grad_norm`).
OBSERVABLES = ("loss", "grad_norm")
STATE_FORMAT = 1


@dataclass
class DPPFStats:
    """
    What the engine has done so far. Distances are means over the workers of `||x_i - x_A||` in the last round.

    Attributes:
        steps: optimizer steps counted by `step()`.
        rounds: consensus rounds run (including averaging rounds from `average()`).
        bytes_communicated: payload bytes handed to collectives by this rank (counted per call, not estimated).
        collective_calls: number of collective calls issued by this rank.
        replica_bytes: the part of `bytes_communicated` sent inside this worker's own ranks (its shard group: under
            ZeRO or hierarchical DPPF a worker is a replica of several processes, whose round all-gathers its shards
            and adds up its norms there, on the fast links); the rest crossed between workers.
        distance_before: mean distance of the workers to their average before the last round (to the strategy's
            centre, the point each worker is pulled toward, for easgd, lsgd and grawa).
        mean_distance: mean distance to that point after the last round: the valley width.
        average_norm: `||x_A||` in the last round (the norm of the strategy's centre for easgd, lsgd and grawa).
        lam: the push strength used in the last round (after `width` and the schedule).
        last_round_ms: wall time of the last round, milliseconds.
        total_round_ms: wall time of all rounds, milliseconds.
        leader: the lsgd leader's group rank in the last round (-1 for the other strategies).
        reseeded_workers: workers re-seeded from the healthy average because their weights were not finite (summed
            over rounds; the same count on every rank).
    """

    steps: int = 0
    rounds: int = 0
    bytes_communicated: int = 0
    collective_calls: int = 0
    replica_bytes: int = 0
    distance_before: float = 0.0
    mean_distance: float = 0.0
    average_norm: float = 0.0
    lam: float = 0.0
    last_round_ms: float = 0.0
    total_round_ms: float = 0.0
    leader: int = -1
    reseeded_workers: int = 0

    def to_logs(self, prefix: str = "dppf/") -> dict[str, float]:
        """The statistics under the names the integrations log (`dppf/valley_width`, `dppf/bytes`, ...)."""
        return {
            f"{prefix}valley_width": self.mean_distance,
            f"{prefix}distance_before": self.distance_before,
            f"{prefix}average_norm": self.average_norm,
            f"{prefix}lam": self.lam,
            f"{prefix}rounds": self.rounds,
            f"{prefix}bytes": self.bytes_communicated,
            f"{prefix}replica_bytes": self.replica_bytes,
            f"{prefix}round_ms": self.last_round_ms,
            f"{prefix}reseeded_workers": self.reseeded_workers,
        }

    def record_round(self, before: float, after: float, average_norm: float, lam: float, elapsed_ms: float) -> None:
        """Count one round and keep its distances, norm, push and wall time."""
        self.rounds += 1
        self.distance_before, self.mean_distance, self.average_norm, self.lam = before, after, average_norm, lam
        self.last_round_ms, self.total_round_ms = elapsed_ms, self.total_round_ms + elapsed_ms


class Observations:
    """
    What each worker feeds between rounds for lsgd (`loss`) and grawa (`grad_norm`): a running sum per kind, kept
    on the device when tensors are fed (no sync per step), and the mean of the last round.
    """

    def __init__(self) -> None:
        self.window: dict[str, list] = {kind: [0.0, 0] for kind in OBSERVABLES}
        self.last: dict[str, float | torch.Tensor | None] = dict.fromkeys(OBSERVABLES)

    def add(self, kind: str, value: float | torch.Tensor) -> None:
        window = self.window[kind]
        window[0] = window[0] + (value.detach().double() if isinstance(value, torch.Tensor) else float(value))
        window[1] += 1

    def mean(self, kind: str, strategy: str) -> float | torch.Tensor:
        """The mean fed since the last round (the window is then emptied), else the last round's; not read."""
        total, count = self.window[kind]
        if count:
            self.last[kind] = total / count
            self.window[kind] = [0.0, 0]
        if self.last[kind] is None:
            raise RuntimeError(
                f"strategy={strategy!r} needs each worker's {kind} but none was observed: call "
                f"engine.observe({kind}=...) every step before the round (Accelerate: dppf.observe({kind}=...) before "
                "optimizer.step(); DPPFTrainer feeds it itself)."
            )
        return self.last[kind]

    def state(self) -> dict[str, dict]:
        """JSON-able (the host reads happen here, at checkpoint time, not per round)."""
        last = {k: None if v is None else float(v) for k, v in self.last.items()}
        return {kind: {"sum": float(t), "count": n, "last": last[kind]} for kind, (t, n) in self.window.items()}

    def load(self, state: dict[str, dict]) -> None:
        for kind in OBSERVABLES:
            entry = state.get(kind, {"sum": 0.0, "count": 0, "last": None})
            self.window[kind], self.last[kind] = [entry["sum"], entry["count"]], entry["last"]


def build_state(
    config: dict[str, Any], stats: DPPFStats, observations: Observations, centre: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The engine's state dict (see `DPPFConsensus.state_dict`)."""
    return {
        "format": STATE_FORMAT,
        "config": config,
        "stats": asdict(stats),
        "observed": observations.state(),
        "centre": {k: v.detach().clone() for k, v in centre.items()},
    }


def parse_state(state: dict[str, Any], config_now: dict[str, Any]) -> tuple[DPPFStats, Observations, dict]:
    """
    Check and unpack a state dict: `(stats, observations, centre)`. States written before `"observed"` and
    `"centre"` existed load too; a changed config is logged, not refused (a resumed run may change, e.g., `tau`).
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "stats" not in state:
        raise ValueError("Not a DPPFConsensus state dict (expected keys 'format'=1, 'config', 'stats').")
    changed = {k: (v, config_now.get(k)) for k, v in state.get("config", {}).items() if config_now.get(k) != v}
    if changed:
        logger.warning("DPPF: resuming with a changed config (saved -> now): %s", changed)
    observations = Observations()
    observations.load(state.get("observed", {}))
    centre = {k: v.detach().clone() for k, v in state.get("centre", {}).items()}
    return DPPFStats(**state["stats"]), observations, centre
