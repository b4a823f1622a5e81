"""
The DPPF engine: one consensus round over torch.distributed, as few passes over the weights as the math allows.

A round, per bucket of ~`bucket_mb` MiB (parameters of one dtype and device, packed contiguously):

1. copy the tensors into the bucket's flat communication buffer and start an asynchronous all-reduce (SUM);
2. as each bucket arrives (the next ones are still in flight), divide by M to get `x_A` and accumulate, chunk by
   cache-sized chunk, `||x_i - x_A||^2` and `||x_A||^2` for the global norms;
3. once the global `r_i` is known, move every tensor with one fused `torch._foreach_lerp_` per bucket:
   `x_i <- x_i + (1 - c_i) * (x_A - x_i)`, i.e. `x_A + c_i * d_i` with `c_i` from `hf_dppf.strategies`.

Floating buffers (BatchNorm statistics) ride in their own buckets and are set to the average; integer buffers and
frozen parameters are not touched. Parameters stay ordinary tensors owned by the module (they are read and written,
never re-pointed), so `save_pretrained`, safetensors, `model.to()` and optimizers see nothing unusual.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .config import DPPFConfig
from .strategies import STRATEGIES

logger = logging.getLogger(__name__)

_COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Norms are accumulated chunk by chunk so that the average and the difference stay in cache: 256K elements = 1 MiB.
_CHUNK = 1 << 18


@dataclass
class DPPFStats:
    """
    What the engine has done so far. Distances are means over the workers of `||x_i - x_A||` in the last round.

    Attributes:
        steps: optimizer steps counted by `step()`.
        rounds: consensus rounds run (including averaging rounds from `average()`).
        bytes_communicated: payload bytes handed to collectives by this rank (counted per call, not estimated).
        collective_calls: number of collective calls issued by this rank.
        distance_before: mean distance of the workers to their average before the last round.
        mean_distance: mean distance to that average after the last round: the valley width.
        average_norm: `||x_A||` in the last round.
        lam: the push strength used in the last round (after `width` and the schedule).
        last_round_ms: wall time of the last round, milliseconds.
        total_round_ms: wall time of all rounds, milliseconds.
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
        }


@dataclass
class _Bucket:
    is_param: bool
    tensors: list[torch.Tensor]
    comm: torch.Tensor
    views: list[torch.Tensor] = field(default_factory=list)
    segments: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    work: Any = None
    holds_average: bool = True

    def __post_init__(self) -> None:
        offset = 0
        for t in self.tensors:
            view = self.comm[offset : offset + t.numel()].view(t.shape)
            self.views.append(view)
            if t.is_contiguous():
                flat_t, flat_v = t.view(-1), view.view(-1)
                self.segments += [
                    (flat_t[i : i + _CHUNK], flat_v[i : i + _CHUNK]) for i in range(0, t.numel(), _CHUNK)
                ]
            else:
                self.segments.append((t, view))
            offset += t.numel()

    @property
    def same_dtype(self) -> bool:
        return self.tensors[0].dtype == self.comm.dtype


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
            only this rank's shard of the worker's weights. The sums of squares behind `r_i` and `||x_A||` are added
            up over this group (one all-reduce of two numbers per round), so every shard of a worker is scaled by the
            same global `r_i`. Defaults to none: the tensors are the whole worker.

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
        if self.world_size == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no torch.distributed process group is initialised, so "
                "every worker would train alone. Initialise it first (Accelerate: build the Accelerator before DPPF;"
                " on CPU pass Accelerator(cpu=True) or set ACCELERATE_USE_CPU=true)."
            )
        self.stats = DPPFStats()
        self._buckets: list[_Bucket] = []
        self._signature: tuple = ()
        self._scratch: torch.Tensor | None = None

    # ------------------------------------------------------------------ tensors and buckets
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
                    buckets.append(_Bucket(is_param, [t.detach() for t in ts], comm))
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

    def _all_reduce(self, tensor: torch.Tensor, async_op: bool = False):
        self.stats.bytes_communicated += tensor.numel() * tensor.element_size()
        self.stats.collective_calls += 1
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)

    def _reduce(self, *, keep_average: bool, norms: bool) -> tuple[float, float]:
        """
        All-reduce every bucket and return this worker's `r_i^2` and `||x_A||^2` over the parameters (0 if `norms` is
        False).

        Buffer buckets, and parameter buckets when `keep_average` (or when their dtype differs from the wire's), end
        holding `x_A`. Otherwise a parameter bucket ends holding `M * (x_A - x_i)`: one fused `sub_` per chunk turns
        the sum into the scaled difference, whose norm gives `r_i` while the chunk is still in cache; the write-back
        is then a single `x_i += (1 - c_i) / M * buffer`.
        """
        buckets = self._ensure_buckets()
        m = self.world_size
        for b in buckets:
            torch._foreach_copy_(b.views, b.tensors)
            b.work = self._all_reduce(b.comm, async_op=True)
            b.holds_average = True
        partial_d: list[torch.Tensor] = []
        partial_a: list[torch.Tensor] = []
        for b in buckets:  # bucket k's math runs while buckets k+1, ... are still in flight
            b.work.wait()
            b.work = None
            if b.is_param and not keep_average and b.same_dtype:
                b.holds_average = False
                for x, c in b.segments:
                    if norms:
                        partial_a.append(torch.linalg.vector_norm(c))  # ||sum|| = M ||x_A||
                    c.sub_(x, alpha=m)
                    if norms:
                        partial_d.append(torch.linalg.vector_norm(c))  # M r_i
                continue
            b.comm.div_(m)
            if not (b.is_param and norms):
                continue
            if self._scratch is None or self._scratch.device != b.comm.device:
                self._scratch = torch.empty(_CHUNK, dtype=torch.float32, device=b.comm.device)
            for x, a in b.segments:
                tmp = self._scratch[: x.numel()].view(x.shape)
                torch.sub(x, a, out=tmp)
                partial_d.append(torch.linalg.vector_norm(tmp) * m)
                partial_a.append(torch.linalg.vector_norm(a, dtype=torch.float32) * m)
        sq_d = torch.stack(partial_d).double().square().sum().item() / m**2 if partial_d else 0.0
        sq_a = torch.stack(partial_a).double().square().sum().item() / m**2 if partial_a else 0.0
        return sq_d, sq_a

    def _sum_over_shards(self, sq_d: float, sq_a: float) -> tuple[float, float]:
        """The squared norms of the whole worker: this shard's sums added over `norm_group` (when there is one)."""
        if self.norm_group is None or dist.get_world_size(self.norm_group) == 1:
            return sq_d, sq_a
        params, _ = self._collect()
        device = params[0].device if params else "cpu"
        sums = torch.tensor([sq_d, sq_a], dtype=torch.float64, device=device)
        self.stats.bytes_communicated += sums.numel() * sums.element_size()
        self.stats.collective_calls += 1
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.norm_group)
        return tuple(sums.tolist())

    # ------------------------------------------------------------------ rounds
    @torch.no_grad()
    def round(self, push_scale: float = 1.0, *, strategy: str | None = None) -> DPPFStats:
        """
        Run one consensus round now, on every rank of the group (a collective: all ranks must call it).

        Args:
            push_scale (`float`, defaults to 1.0): multiplies the push (the integrations pass `lr_t / lr_0`).
            strategy (`str`, *optional*): override the configured rule for this round (e.g. `"avg"`).

        Returns:
            `DPPFStats`: the updated statistics.
        """
        if not (math.isfinite(push_scale) and push_scale >= 0):
            raise ValueError(f"push_scale={push_scale!r} is invalid: it must be a finite number >= 0.")
        rule = STRATEGIES[strategy or self.config.strategy]
        start = time.perf_counter()
        if self.world_size == 1:  # the average is the worker itself: nothing moves and nothing is sent
            params, _ = self._collect()
            norms = torch._foreach_norm(params) if params else []
            sq_d, sq_a = 0.0, sum(n.double().square().item() for n in norms)
        else:
            sq_d, sq_a = self._reduce(keep_average=not rule.pushes, norms=True)
        sq_d, sq_a = self._sum_over_shards(sq_d, sq_a)
        r, average_norm = math.sqrt(sq_d), math.sqrt(sq_a)
        lam = self.config.push_strength(average_norm, push_scale) if rule.pushes else 0.0
        c = rule.coefficient(r, self.config.alpha, lam, self.config.eps)
        if self.world_size > 1:
            for b in self._buckets:
                if not b.holds_average:  # buffer = M * (x_A - x_i)
                    torch._foreach_add_(b.tensors, b.views, alpha=(1.0 - c) / self.world_size)
                elif not b.is_param or c == 0.0:
                    torch._foreach_copy_(b.tensors, b.views)
                elif b.same_dtype:
                    torch._foreach_lerp_(b.tensors, b.views, 1.0 - c)
                else:
                    for x, a in b.segments:
                        x.copy_(a.float() + c * (x.float() - a.float()))
            device = self._buckets[0].comm.device if self._buckets else "cpu"
            dists = torch.tensor([r, abs(c) * r], dtype=torch.float64, device=device)
            self._all_reduce(dists)
            before, after = (dists / self.world_size).tolist()
        else:
            before = after = 0.0
        elapsed = (time.perf_counter() - start) * 1e3
        s = self.stats
        s.rounds += 1
        s.distance_before, s.mean_distance, s.average_norm, s.lam = before, after, average_norm, lam
        s.last_round_ms, s.total_round_ms = elapsed, s.total_round_ms + elapsed
        return s

    def average(self) -> DPPFStats:
        """Set every worker to the average (one averaging round, whatever the strategy)."""
        return self.round(strategy="avg")

    def step(self, push_scale: float = 1.0) -> bool:
        """
        Count one optimizer step; run a round if one is due (every step during warmup, then every `tau` steps).

        Returns:
            `bool`: whether a round ran.
        """
        self.stats.steps += 1
        if self.config.round_due(self.stats.steps):
            self.round(push_scale)
            return True
        return False

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """
        Temporarily give every worker the average (to evaluate or save the consensus model), then restore each
        worker's own weights exactly. A collective: every rank must enter it. Costs one all-reduce and a copy of the
        weights; optimizer states are untouched. With M = 1 the worker is the average: nothing to do.
        """
        if self.world_size == 1:
            yield
            return
        with torch.no_grad():
            buckets = self._ensure_buckets()
            backup = [[t.clone() for t in b.tensors] for b in buckets]
            self._reduce(keep_average=True, norms=False)
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
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        for b in self._ensure_buckets():
            torch._foreach_copy_(b.views, b.tensors)
            self.stats.bytes_communicated += b.comm.numel() * b.comm.element_size()
            self.stats.collective_calls += 1
            dist.broadcast(b.comm, src=global_src, group=self.group)
            torch._foreach_copy_(b.tensors, b.views)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The step counter, statistics and config: everything needed to continue exactly after a restart."""
        return {"format": 1, "config": self.config.to_dict(), "stats": asdict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != 1 or "stats" not in state:
            raise ValueError("Not a DPPFConsensus state dict (expected keys 'format'=1, 'config', 'stats').")
        saved = state.get("config", {})
        now = self.config.to_dict()
        changed = {k: (v, now.get(k)) for k, v in saved.items() if now.get(k) != v}
        if changed:
            logger.warning("DPPF: resuming with a changed config (saved -> now): %s", changed)
        self.stats = DPPFStats(**state["stats"])
