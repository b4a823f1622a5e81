"""
The engine's only door to torch.distributed: counted collectives over the worker group (and over the shard group of
a worker under ZeRO), and waits that turn a dead or stuck peer into an error naming the round.

Every call takes tensors on the engine's device (a GPU under nccl); none is specific to one backend.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .stats import DPPFStats

# torch 2.13 renamed `all_gather_into_tensor` (deprecated there) `all_gather_single`; 2.11 has only the old name
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Collectives:
    """
    Collectives over `group` (the workers) and `norm_group` (the other shards of this worker), counted in `stats`.

    Args:
        group (`ProcessGroup`, *optional*): the workers; `None` is the default group.
        norm_group (`ProcessGroup`, *optional*): this worker's shard group, or `None` when the tensors are the whole
            worker.
        stats (`DPPFStats`): where the bytes and calls are counted (read through a callable: the engine replaces its
            statistics when a checkpoint is loaded).
        timeout_s (`float`, *optional*): how long a wait may take; `None` keeps the process group's timeout.
        where (`Callable[[], str]`): names the current round in error messages.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        norm_group: dist.ProcessGroup | None,
        stats: Callable[[], DPPFStats],
        timeout_s: float | None,
        where: Callable[[], str],
    ) -> None:
        self.group, self.norm_group, self._stats, self.timeout_s, self._where = (
            group,
            norm_group,
            stats,
            timeout_s,
            where,
        )
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.sharded = norm_group is not None and dist.get_world_size(norm_group) > 1
        self.nccl = distributed and dist.get_backend(group) == "nccl"

    def fallback_device(self) -> torch.device:
        """Where small tensors go when the engine has no tensor to take it from: the current GPU under nccl."""
        return torch.device("cuda", torch.cuda.current_device()) if self.nccl else torch.device("cpu")

    def _count(self, tensor: torch.Tensor, shards: bool = False) -> None:
        if self.nccl and tensor.device.type != "cuda":
            raise ValueError(
                f"DPPF: the process group's backend is nccl but a tensor to communicate is on {tensor.device}: nccl "
                "only moves GPU tensors. Move the model to its GPU before DPPF sees it, or use gloo for CPU tensors."
            )
        stats = self._stats()
        size = tensor.numel() * tensor.element_size()
        stats.bytes_communicated += size
        stats.collective_calls += 1
        if shards:
            stats.replica_bytes += size

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False, shards: bool = False) -> Any:
        """SUM all-reduce over the workers (over this worker's shards with `shards=True`); counted."""
        self._count(tensor, shards)
        group = self.norm_group if shards else self.group
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
        if async_op:
            return work
        self.wait(work)
        return None

    def broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Any:
        """Broadcast from group rank `src`; counted."""
        self._count(tensor)
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        work = dist.broadcast(tensor, src=global_src, group=self.group, async_op=True)
        if async_op:
            return work
        self.wait(work)
        return None

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        """All-gather `tensor` from every worker into `outputs`; counted."""
        self._count(tensor)
        self.wait(dist.all_gather(outputs, tensor, group=self.group, async_op=True))

    def gather_shards(self, output: torch.Tensor, shard: torch.Tensor) -> Any:
        """
        Start the all-gather of every rank's `shard` of this worker into `output` (`shard` may be this rank's slice of
        it), over the shard group, asynchronously; counted (what this rank sends).
        """
        self._count(shard, shards=True)
        return _ALL_GATHER_SINGLE(output, shard, group=self.norm_group, async_op=True)

    def over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (a few numbers on the device) summed over this worker's shards, in place; no host read."""
        if self.sharded:
            self.all_reduce(tensor, shards=True)
        return tensor

    def wait(self, work: Any) -> None:
        """
        Wait for an asynchronous collective, at most `timeout_s` seconds (the process group's timeout when unset). A
        peer that died or hangs becomes a `RuntimeError` naming the round, on every rank that waits.
        """
        try:
            if self.timeout_s is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as err:  # gloo/nccl raise RuntimeError or DistBackendError subclasses
            limit = "the process group's timeout"
            if self.timeout_s is not None:
                limit = f"{self.timeout_s:g} s (DPPFConfig.timeout_s)"
            raise RuntimeError(
                f"{self._where()} failed on rank {self.rank} of {self.world_size}: a collective did not complete "
                f"within {limit} or a peer went away ({type(err).__name__}: {err}). Check the other workers' logs: "
                "one of them probably crashed, was killed or is stuck; resume from the last checkpoint."
            ) from err
