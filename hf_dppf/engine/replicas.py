"""
Hierarchical DPPF: a worker is a replica of G processes that hold the same weights (the integrations average the
gradients inside it at every step), and the round between replicas is sharded over the replica's processes.

`ReplicaLayout` stands in for `BucketLayout`. Each module bucket is packed into one flat buffer in the tensors' own
dtype (padded to a multiple of G) and cut into G equal shards; process `j` of a replica runs the round on shard `j`
only, as a bucket of one flat tensor, with the processes that hold shard `j` in the other replicas (the engine's
process group). So the rounds' code is the same as for whole workers: each process sends about P/G bytes across
replicas, the norms are added up over the replica (the engine's `norm_group` is the replica), and `publish()`
all-gathers the moved shards inside the replica and copies them into the module. Per round this adds, per bucket,
one copy in (`ensure()`), one all-gather and one copy out, and G shards of 1/G each of the engine's own buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .buckets import COMM_DTYPES, Bucket, BucketLayout, _share_scratch
from .collectives import Collectives


class ReplicaLayout:
    """
    The sharded bucket layout of a worker replicated over `replica_group`: `buckets` are this process's shards.

    Args:
        params_or_module (`torch.nn.Module` or list of `torch.Tensor`): what the engine moves (the same on every
            process of the replica).
        bucket_mb (`float`): the target size of a whole bucket, MiB (its shards are 1/G of it).
        comm_dtype (`str`): the wire dtype between replicas, a key of `COMM_DTYPES`.
        fallback_device (`torch.device`): where small tensors go when there is no tensor at all.
        replica_group (`ProcessGroup`): the processes of this replica, neighbours on the fast links.
    """

    def __init__(
        self,
        params_or_module: torch.nn.Module | list[torch.Tensor],
        bucket_mb: float,
        comm_dtype: str,
        fallback_device: torch.device,
        replica_group: dist.ProcessGroup,
    ) -> None:
        self.size, self.index = dist.get_world_size(replica_group), dist.get_rank(replica_group)
        self.full = BucketLayout(params_or_module, bucket_mb, None, fallback_device, pad_to=self.size)
        self.wire = COMM_DTYPES[comm_dtype]
        self.buckets: list[Bucket] = []
        self._source: list[Bucket] | None = None

    # what is the same as for a whole worker: the module's tensors (fingerprints, finiteness, the device)
    def collect(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.full.collect()

    def named(self) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
        return self.full.named()

    def device(self) -> torch.device:
        return self.full.device()

    def ensure(self) -> list[Bucket]:
        """This process's shards, (re)built when the module's tensors changed, holding the module's current weights."""
        full = self.full.ensure()
        if full is not self._source:
            self.buckets = [self._shard(b, i) for i, b in enumerate(full)]
            _share_scratch(self.buckets)
            self._source = full
        self.load()
        return self.buckets

    def _shard(self, whole: Bucket, index: int) -> Bucket:
        n = whole.numel // self.size
        mine = whole.comm[self.index * n : (self.index + 1) * n]
        wire = torch.float64 if mine.dtype == torch.float64 else self.wire
        key = f"bucket{index}.shard{self.index}of{self.size}"
        return Bucket(whole.is_param, [mine], [key], torch.zeros(n, dtype=wire, device=mine.device))

    def load(self) -> None:
        """The module's current weights into the flat buffers, so the shards hold them (one op per bucket)."""
        for b in self.full.buckets:
            b.copy_in()

    def publish(self, comm: Collectives) -> None:
        """Every process's shard to the whole replica, then into the module: the replica holds identical weights."""
        works = [
            comm.gather_shards(whole.comm, shard.tensors[0]) for whole, shard in zip(self.full.buckets, self.buckets)
        ]
        for whole, work in zip(self.full.buckets, works):
            comm.wait(work)
            torch._foreach_copy_(whole.tensors, whole.views)
