"""
The DPPF engine: one consensus round over torch.distributed, as few passes over the weights as the math allows.

A round, per bucket of ~`bucket_mb` MiB (parameters of one dtype and device, packed contiguously):

1. copy the tensors into the bucket's flat communication buffer and start an asynchronous all-reduce (SUM);
2. as each bucket arrives (the next ones are still in flight), divide by M to get `x_A` and accumulate, chunk by
   cache-sized chunk, `||x_i - x_A||^2` and `||x_A||^2` for the global norms;
3. once the global `r_i` is known, move every tensor with one fused `torch._foreach_lerp_` per bucket:
   `x_i <- x_i + (1 - c_i) * (x_A - x_i)`, i.e. `x_A + c_i * d_i` with `c_i` from `hf_dppf.strategies`.

The baseline strategies pull toward another centre (`hf_dppf.strategies`): `easgd` all-reduces like `avg` and pulls
toward its centre variable `z` (engine state, one tensor per parameter name, checkpointed), which then moves toward
`x_A`; `lsgd` elects the lowest-loss worker with one tiny all-reduce and broadcasts its weights into the buffers;
`grawa` all-reduces `w_i / W * x_i` after one all-reduce of every worker's `w_i`. The write-back is the same lerp.
The loss and gradient norm those two need are fed between rounds with `observe()`.

Overlapped rounds (`overlap_steps = k > 0`, `dppf` and `avg`): `launch()` copies the weights into a per-bucket snapshot
buffer and the communication buffer and starts the all-reduce; training goes on; `finish()`, k optimizer steps later,
forms the round from the snapshots and adds its correction, `x_i += (1 - c_i) (x_A - s_i)`, to the current weights.

Floating buffers (BatchNorm statistics) ride in their own buckets and are set to the average; integer buffers and
frozen parameters are not touched. Parameters stay ordinary tensors owned by the module (they are read and written,
never re-pointed), so `save_pretrained`, safetensors, `model.to()` and optimizers see nothing unusual.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import DPPFConfig
from ..strategies import CENTRES, STRATEGIES, Strategy, grawa_weight, leader_rank

logger = logging.getLogger(__name__)

_COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Norms are accumulated chunk by chunk so that the average and the difference stay in cache: 256K elements = 1 MiB.
_CHUNK = 1 << 18
# What `observe()` takes: the inputs of lsgd (`loss`) and grawa (`grad_norm`).
_OBSERVABLES = ("loss", "grad_norm")
# `verify_ranks` sends one 16-byte digest per engine (at construction and after a checkpoint is loaded).
FINGERPRINT_BYTES = 16


@dataclass
class DPPFStats:
    """
    What the engine has done so far. Distances are means over the workers of `||x_i - x_A||` in the last round.

    Attributes:
        steps: optimizer steps counted by `step()`.
        rounds: consensus rounds run (including averaging rounds from `average()`).
        bytes_communicated: payload bytes handed to collectives by this rank (counted per call, not estimated).
        collective_calls: number of collective calls issued by this rank.
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
            f"{prefix}round_ms": self.last_round_ms,
            f"{prefix}reseeded_workers": self.reseeded_workers,
        }


def _chunk_pairs(t: torch.Tensor, other: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(t, other)` (same shape, `other` contiguous) cut into cache-sized chunk pairs; one pair if `t` is strided."""
    if not t.is_contiguous():
        return [(t, other)]
    flat_t, flat_o = t.view(-1), other.view(-1)
    return [(flat_t[i : i + _CHUNK], flat_o[i : i + _CHUNK]) for i in range(0, t.numel(), _CHUNK)]


@dataclass
class _Bucket:
    is_param: bool
    tensors: list[torch.Tensor]
    comm: torch.Tensor
    keys: list[str] = field(default_factory=list)  # the tensors' names (engine state such as easgd's centre)
    views: list[torch.Tensor] = field(default_factory=list)
    segments: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    work: Any = None
    holds_average: bool = True
    # overlapped rounds: the weights at launch, kept apart from `comm` (the all-reduce works in place), same layout
    snapshot: torch.Tensor | None = None
    snapshot_views: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        offset = 0
        for t in self.tensors:
            view = self.comm[offset : offset + t.numel()].view(t.shape)
            self.views.append(view)
            self.segments += _chunk_pairs(t, view)
            offset += t.numel()

    @property
    def same_dtype(self) -> bool:
        return self.tensors[0].dtype == self.comm.dtype

    def ensure_snapshot(self) -> torch.Tensor:
        """The snapshot buffer (allocated once per bucket layout), in the tensors' dtype promoted to at least fp32."""
        dtype = torch.promote_types(self.tensors[0].dtype, torch.float32)
        if self.snapshot is None or self.snapshot.dtype != dtype or self.snapshot.device != self.comm.device:
            self.snapshot = torch.empty(self.comm.numel(), dtype=dtype, device=self.comm.device)
            self.snapshot_views, offset = [], 0
            for t in self.tensors:
                self.snapshot_views.append(self.snapshot[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
        return self.snapshot


@dataclass
class _InFlight:
    """An overlapped round between its launch and its landing."""

    due: int  # the optimizer step at which it lands
    push_scale: float
    blocked_ms: float  # time the launch held the worker


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
    ) -> None:
        self.config = config if config is not None else DPPFConfig()
        if not isinstance(self.config, DPPFConfig):
            raise TypeError(f"config must be a DPPFConfig, got {type(self.config).__name__}.")
        self.module = params_or_module if isinstance(params_or_module, torch.nn.Module) else None
        self._explicit = None if self.module is not None else list(params_or_module)
        if self._explicit is not None and not all(isinstance(t, torch.Tensor) for t in self._explicit):
            raise TypeError("params_or_module must be a torch.nn.Module or an iterable of tensors.")
        self.group = process_group
        self.norm_group = norm_group
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no torch.distributed process group is initialised, so "
                "every worker would train alone. Initialise it first (Accelerate: build the Accelerator before DPPF;"
                " on CPU pass Accelerator(cpu=True) or set ACCELERATE_USE_CPU=true)."
            )
        self.stats = DPPFStats()
        self._buckets: list[_Bucket] = []
        self._signature: tuple = ()
        self._scratch: torch.Tensor | None = None
        # easgd's centre variable, one tensor per parameter name: it outlives bucket rebuilds and is checkpointed.
        self._centre: dict[str, torch.Tensor] = {}
        # lsgd / grawa: what `observe()` was fed since the last round ([sum, count]) and the last round's mean.
        self._window: dict[str, list] = {kind: [0.0, 0] for kind in _OBSERVABLES}
        self._last_observed: dict[str, float | None] = dict.fromkeys(_OBSERVABLES)
        self.last_reseeded = False  # whether the last round (or `ensure_finite`) re-seeded this worker
        self._in_flight: _InFlight | None = None  # an overlapped round launched and not yet applied
        self.verify_ranks()

    # ------------------------------------------------------------------ tensors and buckets
    def _names(self) -> dict[int, str]:
        """A stable name per tensor, keyed by `id`: its qualified name in the module, or its index in the list."""
        if self.module is None:
            return {id(t): str(i) for i, t in enumerate(self._explicit)}
        return {id(t): name for name, t in (*self.module.named_parameters(), *self.module.named_buffers())}

    def _collect(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.module is None:
            return [t for t in self._explicit if t.requires_grad or not isinstance(t, torch.nn.Parameter)], []
        params = [p for p in self.module.parameters() if p.requires_grad]
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        return params, buffers

    def _comm_dtype(self, t: torch.Tensor) -> torch.dtype:
        if t.dtype == torch.float64:
            return torch.float64
        return _COMM_DTYPES[self.config.comm_dtype]

    def _ensure_buckets(self) -> list[_Bucket]:
        """(Re)build the buckets when the set, shapes or storage of the tensors changed since the last round."""
        params, buffers = self._collect()
        signature = tuple(
            (kind, id(t), t.data_ptr(), t.shape, t.dtype, t.device)
            for kind, ts in ((1, params), (0, buffers))
            for t in ts
        )
        if signature == self._signature:
            return self._buckets
        for t in params + buffers:
            if not t.is_floating_point():
                raise TypeError(f"DPPF can only average floating-point tensors, got one of dtype {t.dtype}.")
        cap = max(1, int(self.config.bucket_mb * 2**20))
        names = self._names()
        buckets: list[_Bucket] = []
        for is_param, tensors in ((True, params), (False, buffers)):
            groups: dict[tuple, list[list[torch.Tensor]]] = {}
            for t in tensors:
                key = (t.device, t.dtype, self._comm_dtype(t))
                lists = groups.setdefault(key, [[]])
                size = sum(x.numel() for x in lists[-1]) * key[2].itemsize
                if lists[-1] and size + t.numel() * key[2].itemsize > cap:
                    lists.append([])
                lists[-1].append(t)
            for (device, _, comm_dtype), lists in groups.items():
                for ts in lists:
                    comm = self._comm_buffer(len(buckets), sum(t.numel() for t in ts), comm_dtype, device)
                    keys = [names[id(t)] for t in ts]
                    buckets.append(_Bucket(is_param, [t.detach() for t in ts], comm, keys=keys))
        self._buckets, self._signature = buckets, signature
        self._scratch = None
        logger.debug("DPPF: %d buckets over %d tensors", len(buckets), len(params) + len(buffers))
        return buckets

    def _comm_buffer(self, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """
        Bucket `index`'s flat buffer. When only the tensors' storage moved (e.g. `param.data = ...`) and the layout did
        not, the old buffer is kept: its pages are already mapped, a new one would fault them in again.
        """
        if index < len(self._buckets):
            old = self._buckets[index].comm
            if (old.numel(), old.dtype, old.device) == (numel, dtype, device):
                return old
        return torch.empty(numel, dtype=dtype, device=device)

    # ------------------------------------------------------------------ collectives
    def _count(self, tensor: torch.Tensor) -> None:
        self.stats.bytes_communicated += tensor.numel() * tensor.element_size()
        self.stats.collective_calls += 1

    def _broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = False):
        """Broadcast from group rank `src`; counted. Blocking calls wait with the configured timeout."""
        self._count(tensor)
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        work = dist.broadcast(tensor, src=global_src, group=self.group, async_op=True)
        if async_op:
            return work
        self._wait(work)
        return None

    def _pair_norms(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """
        `sum ||x - c||^2` and `sum ||c||^2` over chunk pairs `(x, c)`, each difference formed in a cache-sized scratch
        buffer (no full-size temporary).
        """
        partial_d: list[torch.Tensor] = []
        partial_c: list[torch.Tensor] = []
        for x, c in pairs:
            dtype = torch.promote_types(torch.promote_types(x.dtype, c.dtype), torch.float32)  # float64 stays float64
            scratch = self._scratch
            if scratch is None or (scratch.device, scratch.dtype) != (x.device, dtype) or scratch.numel() < x.numel():
                scratch = self._scratch = torch.empty(max(_CHUNK, x.numel()), dtype=dtype, device=x.device)
            tmp = scratch[: x.numel()].view(x.shape)
            torch.sub(x, c, out=tmp)
            partial_d.append(torch.linalg.vector_norm(tmp))
            partial_c.append(torch.linalg.vector_norm(c, dtype=torch.promote_types(c.dtype, torch.float32)))
        if not partial_d:
            return 0.0, 0.0
        sq_d = torch.stack(partial_d).double().square().sum().item()
        return sq_d, torch.stack(partial_c).double().square().sum().item()

    def _all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        """SUM all-reduce over the group; counted. Blocking calls wait with the configured timeout."""
        self._count(tensor)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        if async_op:
            return work
        self._wait(work)
        return None

    def _wait(self, work: Any) -> None:
        """
        Wait for an asynchronous collective, at most `config.timeout_s` seconds (the process group's timeout when
        unset). A peer that died or hangs becomes a `RuntimeError` naming the round, on every rank that waits.
        """
        timeout = self.config.timeout_s
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=timeout))
        except Exception as err:  # gloo/nccl raise RuntimeError or DistBackendError subclasses
            limit = f"{timeout:g} s (DPPFConfig.timeout_s)" if timeout is not None else "the process group's timeout"
            raise RuntimeError(
                f"DPPF round {self.stats.rounds + 1} (after optimizer step {self.stats.steps}) failed on rank "
                f"{self.rank} of {self.world_size}: a collective did not complete within {limit} or a peer went "
                f"away ({type(err).__name__}: {err}). Check the other workers' logs: one of them probably crashed, "
                "was killed or is stuck; resume from the last checkpoint."
            ) from err

    def _fingerprint(self) -> dict[str, Any]:
        """What every rank must agree on: the config, the step counter and each tensor's name, shape and dtype."""
        if self.module is not None:
            params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
            buffers = [(n, b) for n, b in self.module.named_buffers() if b.is_floating_point()]
        else:
            params, _ = self._collect()
            params, buffers = [(str(i), t) for i, t in enumerate(params)], []
        tensors = [
            [kind, n, list(t.shape), str(t.dtype)] for kind, ts in (("p", params), ("b", buffers)) for n, t in ts
        ]
        config = {k: v for k, v in self.config.to_dict().items() if k != "timeout_s"}
        return {"config": config, "steps": self.stats.steps, "tensors": tensors}

    def verify_ranks(self) -> None:
        """
        Check that every rank of the group has the same config, step counter and tensors (names, shapes, dtypes):
        one all-gather of a 16-byte digest. A mismatch raises `RuntimeError` on every rank, naming the first
        difference, instead of a hang or an average of unrelated tensors later. Run at construction; the integrations
        run it again after loading a checkpoint. A collective: every rank must call it.
        """
        if self.world_size == 1:
            return
        mine = self._fingerprint()
        text = json.dumps(mine, sort_keys=True, default=str).encode()
        digest = hashlib.blake2b(text, digest_size=FINGERPRINT_BYTES).digest()
        local = torch.frombuffer(bytearray(digest), dtype=torch.int64).to(self._device())
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self._count(local)
        self._wait(dist.all_gather(gathered, local, group=self.group, async_op=True))
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return
        everyone: list[Any] = [None] * self.world_size  # every rank takes this path: the digests are shared
        dist.all_gather_object(everyone, mine, group=self.group)
        raise RuntimeError(f"DPPF workers disagree, so no round can run: {_first_difference(everyone)}")

    def _reduce(
        self, *, keep_average: bool, norms: bool, contribute: bool = True, count: int | None = None
    ) -> tuple[float, float, bool]:
        """
        All-reduce every bucket and return this worker's `r_i^2`, `||x_A||^2` over the parameters (0 if `norms` is
        False) and whether the average is finite (known only when `norms`; every rank gets the same answer, since it
        is read off the shared sum).

        Buffer buckets, and parameter buckets when `keep_average` (or when their dtype differs from the wire's), end
        holding `x_A`. Otherwise a parameter bucket ends holding `m * (x_A - x_i)`: one fused `sub_` per chunk turns
        the sum into the scaled difference, whose norm gives `r_i` while the chunk is still in cache; the write-back
        is then a single `x_i += (1 - c_i) / m * buffer`. `contribute=False` sends zeros instead of this worker's
        weights and `count` is the number of workers that do contribute (`m`, default all): the average of the
        healthy workers when some are not finite.
        """
        buckets = self._ensure_buckets()
        m = count or self.world_size
        for b in buckets:
            if contribute:
                torch._foreach_copy_(b.views, b.tensors)
            else:
                b.comm.zero_()
            b.work = self._all_reduce(b.comm, async_op=True)
            b.holds_average = True
        partial_d: list[torch.Tensor] = []
        partial_a: list[torch.Tensor] = []
        sq_d = sq_a = 0.0
        finite = True
        for b in buckets:  # bucket k's math runs while buckets k+1, ... are still in flight
            self._wait(b.work)
            b.work = None
            if b.is_param and not keep_average and contribute and b.same_dtype:
                b.holds_average = False
                for x, c in b.segments:
                    if norms:
                        partial_a.append(torch.linalg.vector_norm(c))  # ||sum|| = m ||x_A||
                    c.sub_(x, alpha=m)
                    if norms:
                        partial_d.append(torch.linalg.vector_norm(c))  # m r_i
                continue
            b.comm.div_(m)
            if not norms:
                continue
            if not b.is_param:  # buffers are few and small: check them directly
                finite = finite and bool(torch.isfinite(b.comm).all())
                continue
            d, a = self._pair_norms(b.segments)  # (x_i, x_A) chunk pairs, while later buckets are still in flight
            sq_d, sq_a = sq_d + d, sq_a + a
        sq_d += torch.stack(partial_d).double().square().sum().item() / m**2 if partial_d else 0.0
        sq_a += torch.stack(partial_a).double().square().sum().item() / m**2 if partial_a else 0.0
        return sq_d, sq_a, finite and math.isfinite(sq_a)

    # ------------------------------------------------------------------ non-finite workers
    def _device(self) -> torch.device:
        """Where the engine's small tensors live (the collectives' device: a GPU under nccl)."""
        params, buffers = self._collect()
        return (params + buffers)[0].device if params + buffers else torch.device("cpu")

    def _local_finite(self) -> bool:
        params, buffers = self._collect()
        tensors = params + buffers  # the max-abs norm is NaN/Inf exactly when a value is
        return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=math.inf))).all())

    def _healthy_workers(self) -> list[int]:
        """Group ranks whose weights are all finite: one all-reduce of M flags (a collective)."""
        flags = torch.zeros(self.world_size, dtype=torch.float64, device=self._device())
        flags[self.rank] = float(self._worker_finite())
        self._all_reduce(flags)
        return [i for i, ok in enumerate(flags.tolist()) if ok]

    def _nonfinite(self, healthy: list[int], where: str) -> None:
        """Apply `config.nonfinite_policy` when some workers are not finite (the same decision on every rank)."""
        bad = [i for i in range(self.world_size) if i not in healthy]
        when = f"DPPF {where} {self.stats.rounds + 1} (after optimizer step {self.stats.steps})"
        if not bad:
            raise RuntimeError(
                f"{when}: every worker's weights are finite but their average is not (overflow on the wire? "
                f"comm_dtype={self.config.comm_dtype!r}); use comm_dtype='fp32' or lower the learning rate."
            )
        what = f"{when}: worker(s) {bad} of {self.world_size} hold NaN/Inf weights"
        if self.config.nonfinite_policy == "raise" or not healthy:
            hint = "no healthy worker is left" if not healthy else "nonfinite_policy='raise'"
            raise RuntimeError(f"{what}; stopping every worker ({hint}). Lower the learning rate or resume earlier.")
        logger.warning("%s; they take the average of the %d healthy worker(s).", what, len(healthy))

    def _reduce_healthy(self, *, keep_average: bool, where: str) -> tuple[float, float, int, bool]:
        """
        `_reduce` that never averages a NaN in: when the shared sum is not finite, find the bad workers (one small
        all-reduce), apply the policy, and redo the reduction over the healthy ones, the bad ones sending zeros and
        keeping the average. Returns `r_i^2`, `||x_A||^2`, the number of healthy workers and whether this one is.
        """
        sq_d, sq_a, finite = self._reduce(keep_average=keep_average, norms=True)
        sq_d, sq_a, bad_shards = self._over_shards([sq_d, sq_a, float(not finite)])
        if bad_shards == 0 and math.isfinite(sq_a):
            return sq_d, sq_a, self.world_size, True
        healthy = self._healthy_workers()
        self._nonfinite(healthy, where)
        mine = self.rank in healthy
        sq_d, sq_a, _ = self._reduce(
            keep_average=keep_average or not mine, norms=True, contribute=mine, count=len(healthy)
        )
        sq_d, sq_a = self._over_shards([sq_d, sq_a])
        return sq_d, sq_a, len(healthy), mine

    def _over_shards(self, values: list[float]) -> list[float]:
        """A few numbers summed over `norm_group` (this worker's other shards); unchanged when there is none."""
        if self.norm_group is None or dist.get_world_size(self.norm_group) == 1:
            return values
        sums = torch.tensor(values, dtype=torch.float64, device=self._device())
        self._count(sums)
        self._wait(dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.norm_group, async_op=True))
        return sums.tolist()

    def _worker_finite(self) -> bool:
        """Whether all of this worker's weights (every shard of it, under `norm_group`) are finite."""
        return self._over_shards([float(not self._local_finite())])[0] == 0

    @torch.no_grad()
    def ensure_finite(self) -> bool:
        """
        Make sure no worker holds NaN/Inf weights, e.g. before writing a checkpoint: one all-reduce of M flags, and,
        only if a worker is bad, one reduction that gives the bad workers the average of the healthy ones (healthy
        workers do not move). Follows `config.nonfinite_policy`. A collective: every rank must call it.

        Returns:
            `bool`: whether this worker was re-seeded (its optimizer state is stale: the integrations reset it).
        """
        self.finish()
        self.last_reseeded = False
        if self.world_size == 1:
            if not self._worker_finite():
                raise RuntimeError("DPPF: the only worker's weights hold NaN/Inf; there is nothing to re-seed from.")
            return False
        healthy = self._healthy_workers()
        if len(healthy) == self.world_size:
            return False
        self._nonfinite(healthy, "check before round")
        mine = self.rank in healthy
        self._reduce(keep_average=True, norms=False, contribute=mine, count=len(healthy))
        if not mine:
            for b in self._buckets:
                torch._foreach_copy_(b.tensors, b.views)
        self.stats.reseeded_workers += self.world_size - len(healthy)
        self.last_reseeded = not mine
        return not mine

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
        if not (math.isfinite(push_scale) and push_scale >= 0):
            raise ValueError(f"push_scale={push_scale!r} is invalid: it must be a finite number >= 0.")
        rule = STRATEGIES[strategy or self.config.strategy]
        observed = {kind: self._observed(kind, rule.name) for kind in rule.needs}  # raises before any collective
        self.finish()  # an overlapped round in flight lands first
        start = time.perf_counter()
        self.last_reseeded = False
        self.stats.leader = self.rank if rule.centre == "leader" else -1
        if self.world_size == 1:  # the average is the worker itself: nothing moves and nothing is sent
            params, _ = self._collect()
            norms = torch._foreach_norm(params) if params else []
            sq_d, sq_a, m, mine = 0.0, sum(n.double().square().item() for n in norms), 1, True
            (sq_a,) = self._over_shards([sq_a])
            if not math.isfinite(sq_a):
                self.ensure_finite()  # raises: nothing to re-seed from
        elif rule.centre == "average":
            sq_d, sq_a, m, mine = self._reduce_healthy(keep_average=not rule.pushes, where="round")
        else:
            sq_d, sq_a, m, mine = self._gather_centre(rule, observed)
        r, average_norm = math.sqrt(sq_d), math.sqrt(sq_a)
        lam = self.config.push_strength(average_norm, push_scale) if rule.pushes else 0.0
        c = rule.coefficient(r, self.config.alpha, lam, self.config.eps) if mine else 0.0
        if self.stats.leader == self.rank:
            c = 1.0  # lsgd's leader is its own centre: it does not move
        if self.world_size > 1 and rule.centre == "elastic":
            self._elastic_update(c)
        elif self.world_size > 1:
            for b in self._buckets:
                if b.is_param and c == 1.0:  # nothing moves (lsgd's leader)
                    continue
                if not b.holds_average:  # buffer = m * (x_A - x_i)
                    torch._foreach_add_(b.tensors, b.views, alpha=(1.0 - c) / m)
                elif not b.is_param or c == 0.0:
                    torch._foreach_copy_(b.tensors, b.views)
                elif b.same_dtype:
                    torch._foreach_lerp_(b.tensors, b.views, 1.0 - c)
                else:
                    for x, a in b.segments:
                        x.copy_(a.float() + c * (x.float() - a.float()))
        if self.world_size > 1:
            dists = torch.tensor([r, abs(c) * r] if mine else [0.0, 0.0], dtype=torch.float64, device=self._device())
            self._all_reduce(dists)
            before, after = (dists / m).tolist()
            self.stats.reseeded_workers += self.world_size - m
            self.last_reseeded = not mine
        else:
            before = after = 0.0
        elapsed = (time.perf_counter() - start) * 1e3
        s = self.stats
        s.rounds += 1
        s.distance_before, s.mean_distance, s.average_norm, s.lam = before, after, average_norm, lam
        s.last_round_ms, s.total_round_ms = elapsed, s.total_round_ms + elapsed
        return s

    def _gather_centre(self, rule: Strategy, observed: dict[str, float]) -> tuple[float, float, int, bool]:
        """
        The communication of the strategies that pull toward a centre other than the plain average (M > 1). Floating
        buffer buckets end holding the plain average, as with every strategy. Parameter buckets end holding:

        - easgd: `x_A` (the plain all-reduce); the centre `z` is engine state (`_elastic_update` moves both);
        - lsgd: the leader's weights, broadcast from the leader after one all-reduce of every worker's loss;
        - grawa: `sum_i w_i x_i / sum_i w_i`, one all-reduce of `(w_i / W) x_i` after one of every worker's `w_i`.

        Non-finite workers: easgd finds them from the all-reduced sum, as dppf and avg do. For lsgd and grawa every
        worker checks its own weights (one read pass) and sends NaN instead of its loss / weight when they are not
        finite: such a worker is never the leader, has no weight, and takes the centre (`config.nonfinite_policy`).

        Returns this worker's `||x_i - centre||^2`, `||centre||^2` over the parameters, the number of healthy workers
        and whether this one is healthy (as `_reduce_healthy`).
        """
        if rule.centre == "elastic":
            _, _, count, mine = self._reduce_healthy(keep_average=True, where="round")
            pairs = [
                p if mine else (p[1], p[1])  # a re-seeded worker's own distance does not count
                for b in self._buckets
                if b.is_param
                for x, z in zip(b.tensors, self._centre_of(b))
                for p in _chunk_pairs(x, z)
            ]
            sq_d, sq_c = self._over_shards(list(self._pair_norms(pairs)))
            return sq_d, sq_c, count, mine
        if rule.centre not in ("leader", "weighted"):
            raise ValueError(f"strategy {rule.name!r} has centre {rule.centre!r}, expected one of {CENTRES}.")
        buckets = self._ensure_buckets()
        if rule.centre == "leader":
            value = observed["loss"] if math.isfinite(observed["loss"]) else math.inf  # a NaN loss never leads
        else:
            value = grawa_weight(observed["grad_norm"], self.config.eps)
        if self.norm_group is not None:  # a sharded worker: its ranks' losses (or norms) make one value
            value = self._over_shards([value])[0] / dist.get_world_size(self.norm_group)
        shared = torch.zeros(self.world_size, dtype=torch.float64, device=self._device())
        shared[self.rank] = value if self._worker_finite() else math.nan
        self._all_reduce(shared)
        values = shared.tolist()
        healthy = [i for i, v in enumerate(values) if not math.isnan(v)]
        if len(healthy) < self.world_size:
            self._nonfinite(healthy, "round")  # raises under nonfinite_policy="raise" or when none is healthy
        mine, leader, scale = self.rank in healthy, -1, 0.0
        if rule.centre == "leader":
            leader = self.stats.leader = healthy[leader_rank([values[i] for i in healthy])]
        else:
            total = sum(values[i] for i in healthy)
            if not total > 0:
                raise RuntimeError(
                    f"grawa: the workers' weights 1/(||g||+eps) sum to {total}: every healthy worker fed a non-finite "
                    "gradient norm, so there is no centre to pull toward."
                )
            scale = values[self.rank] / total if mine else 0.0
        for b in buckets:
            b.holds_average = True
            if b.is_param and leader >= 0:
                if self.rank == leader:
                    torch._foreach_copy_(b.views, b.tensors)
                b.work = self._broadcast(b.comm, leader, async_op=True)
                continue
            if not mine:  # a worker with NaN/Inf weights sends zeros
                b.comm.zero_()
            elif b.is_param:
                for x, c in b.segments:
                    torch.mul(x, scale, out=c)
            else:
                torch._foreach_copy_(b.views, b.tensors)
            b.work = self._all_reduce(b.comm, async_op=True)
        pairs = []
        for b in buckets:
            self._wait(b.work)
            b.work = None
            if not b.is_param:
                b.comm.div_(len(healthy))
            else:
                pairs += b.segments if mine else [(c, c) for _, c in b.segments]
        sq_d, sq_c = self._over_shards(list(self._pair_norms(pairs)))
        return sq_d, sq_c, len(healthy), mine

    def _centre_of(self, bucket: _Bucket) -> list[torch.Tensor]:
        """
        easgd's centre variable for `bucket`'s tensors, by name: created from the average `x_A` (the bucket's views
        after the all-reduce) the first time a tensor is seen, moved to the tensor's device and dtype if it changed.
        """
        out = []
        for key, x, view in zip(bucket.keys, bucket.tensors, bucket.views):
            z = self._centre.get(key)
            if z is None:
                z = view.to(x.dtype, copy=True)
            elif z.shape != x.shape:
                raise ValueError(
                    f"easgd centre variable {key!r} has shape {tuple(z.shape)} but the parameter has {tuple(x.shape)}:"
                    " the checkpoint belongs to another model."
                )
            elif (z.device, z.dtype) != (x.device, x.dtype):
                z = z.to(device=x.device, dtype=x.dtype)
            self._centre[key] = z
            out.append(z)
        return out

    def _elastic_update(self, c: float) -> None:
        """easgd: `x_i <- z + c (x_i - z)` (c = 1 - alpha), then `z <- z + beta (x_A - z)`; buffers get `x_A`."""
        beta = self.config.moving_rate
        for b in self._buckets:
            if not b.is_param:
                torch._foreach_copy_(b.tensors, b.views)
                continue
            z = self._centre_of(b)
            if c == 0.0:  # alpha = 1, or a re-seeded worker (lerp would keep a NaN: NaN * 0 is NaN)
                torch._foreach_copy_(b.tensors, z)
            else:
                torch._foreach_lerp_(b.tensors, z, 1.0 - c)
            average = b.views if b.same_dtype else [v.to(x.dtype) for v, x in zip(b.views, b.tensors)]
            torch._foreach_lerp_(z, average, beta)

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
            window = self._window[kind]
            window[0] = window[0] + (value.detach().double() if isinstance(value, torch.Tensor) else float(value))
            window[1] += 1

    def _observed(self, kind: str, strategy: str) -> float:
        """The mean fed since the last round (the window is then emptied), else the last round's value."""
        total, count = self._window[kind]
        if count:
            self._last_observed[kind] = float(total) / count
            self._window[kind] = [0.0, 0]
        value = self._last_observed[kind]
        if value is None:
            raise RuntimeError(
                f"strategy={strategy!r} needs each worker's {kind} but none was observed: call "
                f"engine.observe({kind}=...) every step before the round (Accelerate: dppf.observe({kind}=...) before "
                "optimizer.step(); DPPFTrainer feeds it itself)."
            )
        return value

    def average(self) -> DPPFStats:
        """Set every worker to the average (one averaging round, whatever the strategy)."""
        return self.round(strategy="avg")

    def step(self, push_scale: float = 1.0) -> bool:
        """
        Count one optimizer step; run a round if one is due (every step during warmup, then every `tau` steps). With
        `overlap_steps = k > 0` a round due after warmup is launched in the background and lands k steps later.

        Returns:
            `bool`: whether a round was applied to the weights at this step (a blocking round, or an overlapped one
            landing).
        """
        self.stats.steps += 1
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
        Start an overlapped round and return at once: snapshot every bucket's tensors into its snapshot buffer and its
        communication buffer, and start the all-reduce of each bucket asynchronously. `step()` calls it at a round
        boundary when `config.overlap_steps > 0`; the round lands (`finish()`) `overlap_steps` optimizer steps later.
        A collective: every rank must call it. A round still in flight lands first.

        Args:
            push_scale (`float`, defaults to 1.0): multiplies the push of this round (the schedule at launch time).
        """
        if not (math.isfinite(push_scale) and push_scale >= 0):
            raise ValueError(f"push_scale={push_scale!r} is invalid: it must be a finite number >= 0.")
        if STRATEGIES[self.config.strategy].centre != "average":
            raise ValueError(f"strategy={self.config.strategy!r} has no overlapped form (only 'dppf' and 'avg').")
        self.finish()
        start = time.perf_counter()
        for b in self._ensure_buckets():
            snapshot = b.ensure_snapshot()
            torch._foreach_copy_(b.snapshot_views, b.tensors)
            b.comm.copy_(snapshot)
            b.work = self._all_reduce(b.comm, async_op=True)
        blocked = (time.perf_counter() - start) * 1e3
        self._in_flight = _InFlight(self.stats.steps + self.config.overlap_steps, push_scale, blocked)

    @torch.no_grad()
    def finish(self) -> DPPFStats | None:
        """
        Apply the overlapped round in flight now (a no-op when none is): wait for its all-reduce (with
        `config.timeout_s`), compute the round from the snapshots `s_i` (the average `x_A`, `r_i = ||s_i - x_A||`,
        the strategy's `c_i`) and move each worker by the round's correction, keeping what it learnt since the launch:
        `x_i += (1 - c_i) (x_A - s_i)` (buffers: `x += x_A - s`). With no training since the launch this is exactly the
        blocking round. A collective: every rank must call it (the integrations do so before anything that needs
        consistent weights: averaging, evaluating, saving).

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
        m = self.world_size
        partial_d: list[torch.Tensor] = []
        partial_a: list[torch.Tensor] = []
        finite = True
        for b in self._buckets:  # bucket k's math runs while buckets k+1, ... may still be in flight
            self._wait(b.work)
            b.work = None
            b.holds_average = True
            for i in range(0, b.comm.numel(), _CHUNK):
                snap, total = b.snapshot[i : i + _CHUNK], b.comm[i : i + _CHUNK]
                if total.dtype == snap.dtype:
                    average = total.div_(m)
                else:  # a half-precision wire: the average and the correction are formed in the snapshot's dtype
                    if self._scratch is None or self._scratch.device != snap.device:
                        self._scratch = torch.empty(_CHUNK, dtype=torch.float32, device=snap.device)
                    average = self._scratch[: snap.numel()].copy_(total).div_(m)
                if b.is_param:
                    partial_a.append(torch.linalg.vector_norm(average, dtype=torch.float32))
                else:
                    finite = finite and bool(torch.isfinite(average).all())
                torch.sub(average, snap, out=snap)  # the snapshot becomes x_A - s_i
                if b.is_param:
                    partial_d.append(torch.linalg.vector_norm(snap, dtype=torch.float32))
        sq_d = torch.stack(partial_d).double().square().sum().item() if partial_d else 0.0
        sq_a = torch.stack(partial_a).double().square().sum().item() if partial_a else 0.0
        sq_d, sq_a, bad_shards = self._over_shards([sq_d, sq_a, float(not finite)])  # global norms under sharding
        if not (bad_shards == 0 and math.isfinite(sq_a)):
            logger.warning(
                "DPPF: the overlapped round launched after optimizer step %d holds NaN/Inf (a worker's snapshot was "
                "not finite); it is dropped and a blocking round runs on the current weights.",
                pending.due - self.config.overlap_steps,
            )
            return self.round(pending.push_scale)
        rule = STRATEGIES[self.config.strategy]
        r, average_norm = math.sqrt(sq_d), math.sqrt(sq_a)
        lam = self.config.push_strength(average_norm, pending.push_scale) if rule.pushes else 0.0
        c = rule.coefficient(r, self.config.alpha, lam, self.config.eps)
        for b in self._buckets:
            weight = 1.0 - c if b.is_param else 1.0
            if weight == 0.0:
                continue
            if b.snapshot.dtype == b.tensors[0].dtype:
                torch._foreach_add_(b.tensors, b.snapshot_views, alpha=weight)
            else:
                for x, delta in zip(b.tensors, b.snapshot_views):
                    x.copy_(x.to(delta.dtype).add_(delta, alpha=weight))
        dists = torch.tensor([r, abs(c) * r], dtype=torch.float64, device=self._device())
        self._all_reduce(dists)
        before, after = (dists / m).tolist()
        self.last_reseeded = False
        elapsed = pending.blocked_ms + (time.perf_counter() - start) * 1e3
        s = self.stats
        s.rounds += 1
        s.distance_before, s.mean_distance, s.average_norm, s.lam = before, after, average_norm, lam
        s.last_round_ms, s.total_round_ms = elapsed, s.total_round_ms + elapsed
        return s

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """
        Temporarily give every worker the average (to evaluate or save the consensus model), then restore each
        worker's own weights exactly. A collective: every rank must enter it. Costs one all-reduce and a copy of the
        weights; optimizer states are untouched. A worker with NaN/Inf weights is left out of the average (or, with
        `nonfinite_policy="raise"`, every rank raises). With M = 1 the worker is the average: nothing to do.
        """
        if self.world_size == 1:
            yield
            return
        self.finish()
        with torch.no_grad():
            buckets = self._ensure_buckets()
            backup = [[t.clone() for t in b.tensors] for b in buckets]
            self._reduce_healthy(keep_average=True, where="average for evaluation/saving before round")
            for b in buckets:
                torch._foreach_copy_(b.tensors, b.views)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(buckets, backup):
                    torch._foreach_copy_(b.tensors, saved)

    @torch.no_grad()
    def broadcast_parameters(self, src: int = 0) -> None:
        """Copy rank `src`'s (group rank) parameters and floating buffers to every rank, e.g. before training."""
        if self.world_size == 1:
            return
        self.finish()
        for b in self._ensure_buckets():
            torch._foreach_copy_(b.views, b.tensors)
            self._broadcast(b.comm, src)
            torch._foreach_copy_(b.tensors, b.views)

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
        observed = {
            kind: {"sum": float(total), "count": count, "last": self._last_observed[kind]}
            for kind, (total, count) in self._window.items()
        }
        return {
            "format": 1,
            "config": self.config.to_dict(),
            "stats": asdict(self.stats),
            "observed": observed,
            "centre": {k: v.detach().clone() for k, v in self._centre.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (states written before `"observed"` and `"centre"` existed load too)."""
        if not isinstance(state, dict) or state.get("format") != 1 or "stats" not in state:
            raise ValueError("Not a DPPFConsensus state dict (expected keys 'format'=1, 'config', 'stats').")
        saved = state.get("config", {})
        now = self.config.to_dict()
        changed = {k: (v, now.get(k)) for k, v in saved.items() if now.get(k) != v}
        if changed:
            logger.warning("DPPF: resuming with a changed config (saved -> now): %s", changed)
        self.stats = DPPFStats(**state["stats"])
        for kind in _OBSERVABLES:
            entry = state.get("observed", {}).get(kind, {"sum": 0.0, "count": 0, "last": None})
            self._window[kind] = [entry["sum"], entry["count"]]
            self._last_observed[kind] = entry["last"]
        # moved to each parameter's device and dtype at the next round
        self._centre = {k: v.detach().clone() for k, v in state.get("centre", {}).items()}


def _first_difference(fingerprints: list[dict[str, Any]]) -> str:
    """Where the ranks' fingerprints first differ, in words (rank 0 is the reference)."""
    ref = fingerprints[0]
    for rank, fp in enumerate(fingerprints[1:], start=1):
        if fp["config"] != ref["config"]:
            diff = {k: (ref["config"].get(k), v) for k, v in fp["config"].items() if ref["config"].get(k) != v}
            return f"rank {rank}'s DPPFConfig differs from rank 0's (rank 0 -> rank {rank}): {diff}."
        if fp["steps"] != ref["steps"]:
            return (
                f"rank 0 has counted {ref['steps']} optimizer steps, rank {rank} {fp['steps']}: they resumed from "
                "different checkpoints or one loaded none."
            )
        if fp["tensors"] != ref["tensors"]:
            if len(fp["tensors"]) != len(ref["tensors"]):
                return (
                    f"rank 0 has {len(ref['tensors'])} trainable tensors, rank {rank} {len(fp['tensors'])}: the "
                    "ranks built different models or froze different layers."
                )
            a, b = next((a, b) for a, b in zip(ref["tensors"], fp["tensors"]) if a != b)
            return (
                f"tensor {a[1]!r} is {a[2]} {a[3]} on rank 0 but rank {rank} has {b[1]!r} {b[2]} {b[3]}: the ranks "
                "built different models."
            )
    return "the ranks' fingerprints differ (no readable difference)."
