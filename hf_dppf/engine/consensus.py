"""
`DPPFConsensus`: counts optimizer steps and runs the consensus rounds of `hf_dppf.strategies` over torch.distributed.

The parts it composes: `buckets` (the layout and the copies), `rounds` (the tensor math), `overlap` (delayed
rounds), `health` (agreeing ranks, non-finite workers), `collectives` (counted calls and timeouts) and `stats`
(statistics and checkpoint state). A round issues a fixed number of ops per bucket and reads the host twice: once
for the norms (which decide the coefficient and reveal a NaN/Inf worker), once for the distance statistics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..config import DPPFConfig
from ..strategies import CENTRES, STRATEGIES
from . import centres, health, overlap, rounds
from .buckets import BucketLayout
from .collectives import Collectives
from .replicas import ReplicaLayout
from .stats import DPPFStats, Observations, build_state, parse_state

logger = logging.getLogger(__name__)


class DPPFConsensus:
    """
    The consensus engine: counts optimizer steps and runs DPPF rounds over a process group.

    Args:
        params_or_module (`torch.nn.Module` or iterable of `torch.Tensor`):
            A module (its trainable parameters are pulled and pushed, its floating buffers averaged; the lists are
            re-read every round, so unfreezing a layer or `model.to()` is picked up) or an explicit list of tensors.
        config (`DPPFConfig`, *optional*): the round's rule; defaults to `DPPFConfig()`.
        process_group (`torch.distributed.ProcessGroup`, *optional*):
            Restrict the round to this group (e.g. one cross-replica group). Defaults to the whole world; without an
            initialised process group the engine runs with M = 1 (plain local training).
        norm_group (`torch.distributed.ProcessGroup`, *optional*):
            The ranks that hold the other shards of this worker (e.g. one ZeRO replica group), when the tensors are
            only this rank's shard of the worker's weights. The sums of squares behind `r_i` and `||x_A||`, and the
            finiteness checks, are added up over this group (one all-reduce of three numbers per round), so every
            shard of a worker is scaled by the same global `r_i` and a worker is healthy only if all its shards are.
            Defaults to none: the tensors are the whole worker.
        replica_group (`torch.distributed.ProcessGroup`, *optional*):
            Hierarchical DPPF: the processes that hold the same weights as this one (one replica, whose gradients the
            integrations average at every step), with `process_group` the processes of the same rank in the other
            replicas. The round is sharded over the replica: each process moves 1/G of every bucket across replicas
            and the replica all-gathers the result (`hf_dppf.engine.replicas`). Not with `norm_group`.

    Example:
        ```python
        engine = DPPFConsensus(model, DPPFConfig(tau=4, alpha=0.5, width=0.01))
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            engine.step()  # a round after every 4th step
        ```
    """

    def __init__(
        self,
        params_or_module: torch.nn.Module | Iterable[torch.Tensor],
        config: DPPFConfig | None = None,
        process_group: dist.ProcessGroup | None = None,
        norm_group: dist.ProcessGroup | None = None,
        replica_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.config = config if config is not None else DPPFConfig()
        if not isinstance(self.config, DPPFConfig):
            raise TypeError(f"config must be a DPPFConfig, got {type(self.config).__name__}.")
        if not isinstance(params_or_module, torch.nn.Module):
            params_or_module = list(params_or_module)
            if not all(isinstance(t, torch.Tensor) for t in params_or_module):
                raise TypeError("params_or_module must be a torch.nn.Module or an iterable of tensors.")
        self.module = params_or_module if isinstance(params_or_module, torch.nn.Module) else None
        self.stats = DPPFStats()
        replicated = _check_replica_group(replica_group, process_group, norm_group, self.config)
        shards = replica_group if replicated else norm_group
        self.comm = Collectives(process_group, shards, lambda: self.stats, self.config.timeout_s, self._where)
        cfg, device = self.config, self.comm.fallback_device()
        self.layout: BucketLayout | ReplicaLayout = (
            ReplicaLayout(params_or_module, cfg.bucket_mb, cfg.comm_dtype, device, replica_group)
            if replicated
            else BucketLayout(params_or_module, cfg.bucket_mb, cfg.comm_dtype, device)
        )
        self.group, self.norm_group, self.replica_group = process_group, shards, replica_group if replicated else None
        # this worker's processes (a replica of several, or this one) and this process's index among them
        self.replica_size = dist.get_world_size(replica_group) if replicated else 1
        self.replica_rank = dist.get_rank(replica_group) if replicated else 0
        self.world_size, self.rank = self.comm.world_size, self.comm.rank
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no torch.distributed process group is initialised, so "
                "every worker would train alone. Initialise it first (Accelerate: build the Accelerator before DPPF;"
                " on CPU pass Accelerator(cpu=True) or set ACCELERATE_USE_CPU=true)."
            )
        # easgd's centre variable, one tensor per parameter name (views of the buckets' centre buffers once built):
        # it outlives layout rebuilds and is checkpointed.
        self._centre: dict[str, torch.Tensor] = {}
        # lsgd / grawa: what `observe()` was fed since the last round ([sum, count]) and the last round's mean.
        self._observations = Observations()
        self.last_reseeded = False  # whether the last round (or `ensure_finite`) re-seeded this worker
        self._in_flight: overlap.InFlight | None = None  # an overlapped round launched and not yet applied
        self.verify_ranks()

    @property
    def _buckets(self) -> list:
        return self.layout.buckets

    def _where(self, kind: str = "round") -> str:
        return f"DPPF {kind} {self.stats.rounds + 1} (after optimizer step {self.stats.steps})"

    def verify_ranks(self) -> None:
        """
        Check that every rank of the group has the same config, step counter and tensors (names, shapes, dtypes):
        one all-gather of a 16-byte digest. A mismatch raises `RuntimeError` on every rank, naming the first
        difference, instead of a hang or an average of unrelated tensors later. Run at construction; the integrations
        run it again after loading a checkpoint. A collective: every rank must call it.
        """
        health.verify_ranks(self.layout, self.comm, self.config.to_dict(), self.stats.steps)

    # ------------------------------------------------------------------ rounds
    @torch.no_grad()
    def round(self, push_scale: float = 1.0, *, strategy: str | None = None) -> DPPFStats:
        """
        Run one consensus round now, on every rank of the group (a collective: all ranks must call it).

        A worker whose weights hold NaN/Inf is handled by `config.nonfinite_policy` (re-seeded from the healthy
        workers' average, or a `RuntimeError` on every rank); `last_reseeded` tells whether this worker was.

        Args:
            push_scale (`float`, defaults to 1.0): multiplies the push (the integrations pass `lr_t / lr_0`).
            strategy (`str`, *optional*): override the configured rule for this round (e.g. `"avg"`).

        Returns:
            `DPPFStats`: the updated statistics.
        """
        _check_push_scale(push_scale)
        rule = STRATEGIES[strategy or self.config.strategy]
        observed = {
            kind: self._observations.mean(kind, rule.name) for kind in rule.needs
        }  # raises before any collective
        self.finish()  # an overlapped round in flight lands first
        start = time.perf_counter()
        self.last_reseeded = False
        self.stats.leader = self.rank if rule.centre == "leader" else -1
        if self.world_size == 1:  # the average is the worker itself: nothing moves and nothing is sent
            params, _ = self.layout.collect()  # (the whole worker on each of a replica's processes: / replica_size)
            sq = self._squares(torch._foreach_norm(params) if params else []).tolist()[0] / self.replica_size
            if not math.isfinite(sq):
                self.ensure_finite()  # raises: nothing to re-seed from
            lam = self.config.push_strength(math.sqrt(sq), push_scale) if rule.pushes else 0.0
            self.stats.record_round(0.0, 0.0, math.sqrt(sq), lam, (time.perf_counter() - start) * 1e3)
            return self.stats
        args = (self.layout, self.comm, self.config, rule, self._where)
        if rule.centre == "average":
            anchors = self._centre if rule.pushes and self.config.push_mode == "step" else None
            outcome = rounds.average_round(*args, push_scale, anchors)
        elif rule.centre == "elastic":
            outcome = centres.elastic_round(*args, self._centre)
        elif rule.centre in ("leader", "weighted"):
            outcome = centres.centre_round(*args, observed)
            self.stats.leader = outcome.leader
        else:
            raise ValueError(f"strategy {rule.name!r} has centre {rule.centre!r}, expected one of {CENTRES}.")
        self.layout.publish(self.comm)
        reading = outcome.reading.tolist()  # host read 2
        average_norm = outcome.average_norm if outcome.average_norm is not None else math.sqrt(reading[2])
        self.stats.reseeded_workers += self.world_size - outcome.count
        self.last_reseeded = not outcome.mine
        before, after = reading[0] / outcome.count, reading[1] / outcome.count
        self.stats.record_round(before, after, average_norm, outcome.lam, (time.perf_counter() - start) * 1e3)
        return self.stats

    def _squares(self, norms: list[torch.Tensor]) -> torch.Tensor:
        """`sum n^2` of partial norms, over this worker's shards: a 1-element float64 device tensor, not read."""
        return rounds.squares(norms, self.layout.device(), self.comm)

    # ------------------------------------------------------------------ what lsgd and grawa need from each worker
    def observe(
        self, *, loss: float | torch.Tensor | None = None, grad_norm: float | torch.Tensor | None = None
    ) -> None:
        """
        Feed this worker's training loss and/or gradient norm of one (micro-)step. A round uses the mean of what was
        fed since the previous round (or, if nothing was, the previous round's value). Values the configured strategy
        does not use are dropped, so integrations may always feed both. Tensors are summed without a device sync.

        Args:
            loss (`float` or `torch.Tensor`, *optional*): the training loss (a scalar); used by `strategy="lsgd"`.
            grad_norm (`float` or `torch.Tensor`, *optional*): the global L2 norm of the gradient the optimizer
                step receives; used by `strategy="grawa"`.
        """
        needs = STRATEGIES[self.config.strategy].needs
        for kind, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is None or kind not in needs:
                continue
            self._observations.add(kind, value)

    def average(self) -> DPPFStats:
        """Set every worker to the average (one averaging round, whatever the strategy)."""
        return self.round(strategy="avg")

    def step(self, push_scale: float = 1.0) -> bool:
        """
        Count one optimizer step; run a round if one is due (every step during warmup, then every `tau` steps). With
        `overlap_steps = k > 0` a round due after warmup is launched in the background and lands k steps later. No
        tensor op and no host read on the steps between rounds.

        Returns:
            `bool`: whether a round was applied to the weights at this step (a blocking round, or an overlapped one
            landing).
        """
        self.stats.steps += 1
        if self.config.push_mode == "step" and self.world_size > 1 and self._centre:
            # the regulariser's gradient, against the last round's average (none before the first round)
            strength = push_scale * self.config.push_strength(self.stats.average_norm) / self.config.tau
            with torch.no_grad():
                params = [b for b in self.layout.ensure() if b.is_param]
                centres.step_push(params, self._centre, self.comm, strength, self.config.eps)
        landed = self._in_flight is not None and self.stats.steps >= self._in_flight.due
        if landed:
            self.finish()
        if self.config.round_due(self.stats.steps):
            if self.world_size > 1 and self.config.overlapped(self.stats.steps):
                self.launch(push_scale)
                return landed
            self.round(push_scale)
            return True
        return landed

    # ------------------------------------------------------------------ overlapped (delayed) rounds
    @property
    def in_flight(self) -> bool:
        """Whether an overlapped round has been launched and not yet applied (`finish()` applies it)."""
        return self._in_flight is not None

    @torch.no_grad()
    def launch(self, push_scale: float = 1.0) -> None:
        """
        Start an overlapped round and return at once (`hf_dppf.engine.overlap`). `step()` calls it at a round
        boundary when `config.overlap_steps > 0`; the round lands (`finish()`) `overlap_steps` optimizer steps later.
        A collective: every rank must call it. A round still in flight lands first.

        Args:
            push_scale (`float`, defaults to 1.0): multiplies the push of this round (the schedule at launch time).
        """
        _check_push_scale(push_scale)
        if STRATEGIES[self.config.strategy].centre != "average":
            raise ValueError(f"strategy={self.config.strategy!r} has no overlapped form (only 'dppf' and 'avg').")
        self.finish()
        start = time.perf_counter()
        overlap.launch(self.layout.ensure(), self.comm)
        blocked = (time.perf_counter() - start) * 1e3
        self._in_flight = overlap.InFlight(self.stats.steps + self.config.overlap_steps, push_scale, blocked)

    @torch.no_grad()
    def finish(self) -> DPPFStats | None:
        """
        Apply the overlapped round in flight now (a no-op when none is): wait for its all-reduce (with
        `config.timeout_s`), form the round from the snapshots and add its correction to the current weights. A
        collective: every rank must call it (the integrations do so before anything that needs consistent weights:
        averaging, evaluating, saving).

        If a worker's snapshot held NaN/Inf (the shared sum is not finite, so every rank sees it), the in-flight
        round is dropped and a blocking round runs on the current weights instead: a worker still NaN is re-seeded
        with the healthy workers' average (`config.nonfinite_policy`), as in a blocking round.

        Returns:
            `DPPFStats` or `None`: the updated statistics, `None` when no round was in flight.
        """
        pending, self._in_flight = self._in_flight, None
        if pending is None:
            return None
        start = time.perf_counter()
        self.layout.load()  # (a replica's shards take the current weights)
        landed = overlap.land_round(self.layout, self.comm, self.config, pending.push_scale)
        if landed is None:
            logger.warning(
                "DPPF: the overlapped round launched after optimizer step %d holds NaN/Inf (a worker's snapshot was "
                "not finite); it is dropped and a blocking round runs on the current weights.",
                pending.due - self.config.overlap_steps,
            )
            return self.round(pending.push_scale)
        self.layout.publish(self.comm)
        self.last_reseeded = False
        self.stats.record_round(*landed, pending.blocked_ms + (time.perf_counter() - start) * 1e3)
        return self.stats

    # ------------------------------------------------------------------ consistent weights on demand
    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """
        Temporarily give every worker the average (to evaluate or save the consensus model), then restore each
        worker's own weights exactly. A collective: every rank must enter it. Costs one all-reduce and a copy of the
        weights (into the snapshot buffers); optimizer states are untouched. A worker with NaN/Inf weights is left
        out of the average (or, with `nonfinite_policy="raise"`, every rank raises). With M = 1 the worker is the
        average: nothing to do.
        """
        if self.world_size == 1:
            yield
            return
        self.finish()
        with torch.no_grad():
            buckets = self.layout.ensure()
            for b in buckets:
                b.ensure_snapshot()
                torch._foreach_copy_(b.snapshot_views, b.tensors)
            rounds.reduce_healthy(
                self.layout, self.comm, self.config, self._where("average for evaluation/saving before round"), True
            )
            rounds.settle(buckets, measure=False)
            self.layout.publish(self.comm)
        try:
            yield
        finally:
            with torch.no_grad():
                for b in buckets:
                    torch._foreach_copy_(b.tensors, b.snapshot_views)
                self.layout.publish(self.comm)

    @torch.no_grad()
    def broadcast_parameters(self, src: int = 0) -> None:
        """Copy rank `src`'s (group rank) parameters and floating buffers to every rank, e.g. before training."""
        if self.world_size == 1:
            return
        self.finish()
        for b in self.layout.ensure():
            b.copy_in()
            self.comm.broadcast(b.comm, src)
            torch._foreach_copy_(b.tensors, b.views)
        self.layout.publish(self.comm)

    @torch.no_grad()
    def ensure_finite(self) -> bool:
        """
        Make sure no worker holds NaN/Inf weights, e.g. before writing a checkpoint: one all-reduce of M flags and
        one host read, and, only if a worker is bad, one reduction that gives the bad workers the average of the
        healthy ones (healthy workers do not move). Follows `config.nonfinite_policy`. A collective: every rank must
        call it.

        Returns:
            `bool`: whether this worker was re-seeded (its optimizer state is stale: the integrations reset it).
        """
        self.finish()
        self.last_reseeded = False
        if self.world_size == 1:
            if health.local_bad(self.layout, self.comm).item():
                raise RuntimeError("DPPF: the only worker's weights hold NaN/Inf; there is nothing to re-seed from.")
            return False
        reseeded = rounds.reseed(self.layout, self.comm, self.config, self._where("check before round"))
        if reseeded is None:
            return False
        self.layout.publish(self.comm)
        count, mine = reseeded
        self.stats.reseeded_workers += self.world_size - count
        self.last_reseeded = not mine
        return not mine

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """
        Everything needed to continue exactly after a restart: the step counter, statistics and config, what
        `observe()` was fed since the last round (`"observed"`, JSON-able), and easgd's centre variable (`"centre"`,
        parameter name -> tensor, empty for the other strategies; save it with safetensors, not JSON).
        """
        if self._in_flight is not None:
            raise RuntimeError(
                f"DPPF: an overlapped round is in flight (it lands after optimizer step {self._in_flight.due}); call "
                "finish() on every rank before state_dict() so that the saved weights and state agree."
            )
        return build_state(self.config.to_dict(), self.stats, self._observations, self._centre)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (states written before `"observed"` and `"centre"` existed load too)."""
        self.stats, self._observations, self._centre = parse_state(state, self.config.to_dict())
        for b in self.layout.buckets:  # the centre buffers are made again from the loaded centre at the next round
            b.centre = None


def _check_replica_group(
    replica_group: dist.ProcessGroup | None,
    process_group: dist.ProcessGroup | None,
    norm_group: dist.ProcessGroup | None,
    config: DPPFConfig,
) -> bool:
    """Whether the engine runs sharded over a replica of several processes; raises on a combination that cannot."""
    if replica_group is None or dist.get_world_size(replica_group) == 1:
        return False
    if norm_group is not None:
        raise ValueError(
            "DPPFConsensus takes norm_group (sharded tensors) or replica_group (replicated ones), not both."
        )
    if process_group is None:
        raise ValueError(
            "DPPFConsensus with a replica_group needs process_group: the processes of the same rank in every replica "
            "(the default group would mix the replica's own processes into the round)."
        )
    if config.push_mode == "step":
        raise ValueError(
            "push_mode='step' is not available with replicas of several processes (replica_size > 1): the per-step "
            "push would need an all-gather inside the replica at every step. Use push_mode='round'."
        )
    return True


def _check_push_scale(push_scale: float) -> None:
    if not (isinstance(push_scale, (int, float)) and math.isfinite(push_scale) and push_scale >= 0):
        raise ValueError(f"push_scale={push_scale!r} is invalid: it must be a finite number >= 0.")
