"""
The bucket layout: which tensors a round moves, packed into flat communication buffers, and the copies in and out.

Trainable parameters and floating buffers (BatchNorm statistics) are grouped by device, dtype and wire dtype and
packed, in order, into buckets of about `bucket_mb` MiB. Each bucket owns one flat buffer on the wire (`comm`) and
views of it shaped like its tensors, made once per layout, so that a copy in or out of a whole bucket is one
`torch._foreach_copy_` and the math runs on the flat buffer: a round costs a handful of ops per bucket, however many
tensors it holds. The tensors stay ordinary tensors owned by the module (read and written, never re-pointed); the
layout is rebuilt when their set, shapes or storage change (a layer unfrozen, `model.to()`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def views_of(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of `flat`, one per tensor and shaped like it."""
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


@dataclass(eq=False)
class Bucket:
    """
    Tensors of one device and dtype, and their flat buffers.

    Attributes:
        is_param: trainable parameters (pulled and pushed) or floating buffers (averaged).
        tensors: the module's tensors (detached aliases: writing them writes the module).
        keys: the tensors' names (engine state such as easgd's centre is kept by name).
        comm: the flat buffer on the wire, in the wire dtype.
        views: `comm` cut into the tensors' shapes.
        scratch, scratch_views: a float32 (float64) working copy of `comm` when the wire dtype is not the tensors'
            dtype (half-precision wires); one buffer shared by every bucket of the layout.
        snapshot, snapshot_views: the weights at an overlapped round's launch (and `averaged()`'s backup), in the
            tensors' dtype promoted to at least float32; made on first use.
        centre, centre_views: easgd's centre variable, in the tensors' dtype; made on first use.
    """

    is_param: bool
    tensors: list[torch.Tensor]
    keys: list[str]
    comm: torch.Tensor
    views: list[torch.Tensor] = field(default_factory=list)
    scratch: torch.Tensor | None = None
    scratch_views: list[torch.Tensor] = field(default_factory=list)
    snapshot: torch.Tensor | None = None
    snapshot_views: list[torch.Tensor] = field(default_factory=list)
    centre: torch.Tensor | None = None
    centre_views: list[torch.Tensor] = field(default_factory=list)
    work: Any = None

    def __post_init__(self) -> None:
        self.views = views_of(self.comm, self.tensors)

    @property
    def same_dtype(self) -> bool:
        """Whether the wire carries the tensors' own dtype (the math then runs on `comm` itself)."""
        return self.tensors[0].dtype == self.comm.dtype

    @property
    def numel(self) -> int:
        return self.comm.numel()

    def copy_in(self) -> None:
        """The tensors into the wire buffer (cast to the wire dtype): one op."""
        torch._foreach_copy_(self.views, self.tensors)

    def ensure_centre(self) -> bool:
        """
        Allocate the centre buffer (in the tensors' dtype) and its views if there is none. Returns whether it was newly
        made (its contents are then undefined: the caller fills it and records its views by name).
        """
        if self.centre is not None:
            return False
        self.centre = torch.empty(self.numel, dtype=self.tensors[0].dtype, device=self.comm.device)
        self.centre_views = views_of(self.centre, self.tensors)
        return True

    def ensure_snapshot(self) -> torch.Tensor:
        """The snapshot buffer (allocated once per layout), in the tensors' dtype promoted to at least float32."""
        dtype = torch.promote_types(self.tensors[0].dtype, torch.float32)
        if self.snapshot is None or self.snapshot.dtype != dtype or self.snapshot.device != self.comm.device:
            self.snapshot = torch.empty(self.numel, dtype=dtype, device=self.comm.device)
            self.snapshot_views = views_of(self.snapshot, self.tensors)
        return self.snapshot


class BucketLayout:
    """
    The buckets of one module (or explicit tensor list), rebuilt when the tensors change.

    Args:
        params_or_module (`torch.nn.Module` or list of `torch.Tensor`): what the engine moves.
        bucket_mb (`float`): the target size of a bucket on the wire, MiB.
        comm_dtype (`str`, *optional*): the wire dtype, a key of `COMM_DTYPES` (float64 tensors always travel as
            float64); `None` keeps every tensor's own dtype.
        fallback_device (`torch.device`, *optional*): where small tensors go when there is no tensor at all.
        pad_to (`int`, defaults to 1): every flat buffer's length is rounded up to a multiple of this (zeros at the
            end), so that it splits into `pad_to` equal shards.
    """

    def __init__(
        self,
        params_or_module: torch.nn.Module | list[torch.Tensor],
        bucket_mb: float,
        comm_dtype: str | None,
        fallback_device: torch.device | None = None,
        pad_to: int = 1,
    ) -> None:
        self.module = params_or_module if isinstance(params_or_module, torch.nn.Module) else None
        self.explicit = None if self.module is not None else list(params_or_module)
        self.bucket_mb, self.pad_to = bucket_mb, pad_to
        self.comm_dtype = COMM_DTYPES[comm_dtype] if comm_dtype is not None else None
        self.fallback_device = fallback_device or torch.device(
            "cpu"
        )  # with no tensor at all (the current GPU under nccl)
        self.buckets: list[Bucket] = []
        self._signature: tuple = ()

    def collect(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The trainable parameters and the floating buffers, in module order (re-read every call)."""
        if self.module is None:
            return [t for t in self.explicit if t.requires_grad or not isinstance(t, torch.nn.Parameter)], []
        params = [p for p in self.module.parameters() if p.requires_grad]
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        return params, buffers

    def named(self) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
        """`collect()` with a stable name per tensor: its qualified name in the module, or its index in the list."""
        if self.module is None:
            return [(str(i), t) for i, t in enumerate(self.collect()[0])], []
        params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        buffers = [(n, b) for n, b in self.module.named_buffers() if b.is_floating_point()]
        return params, buffers

    def device(self) -> torch.device:
        """Where the engine's small tensors live: the tensors' device (a GPU under nccl), else `fallback_device`."""
        params, buffers = self.collect()
        return (params + buffers)[0].device if params + buffers else self.fallback_device

    def wire_dtype(self, t: torch.Tensor) -> torch.dtype:
        return t.dtype if t.dtype == torch.float64 or self.comm_dtype is None else self.comm_dtype

    def ensure(self) -> list[Bucket]:
        """The buckets, (re)built when the set, shapes or storage of the tensors changed since the last call."""
        params, buffers = self.collect()
        signature = tuple(
            (kind, id(t), t.data_ptr(), t.shape, t.dtype, t.device)
            for kind, ts in ((1, params), (0, buffers))
            for t in ts
        )
        if signature != self._signature:
            self._build(params, buffers)
            self._signature = signature
        return self.buckets

    def _build(self, params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        for t in params + buffers:
            if not t.is_floating_point():
                raise TypeError(f"DPPF can only average floating-point tensors, got one of dtype {t.dtype}.")
        cap = max(1, int(self.bucket_mb * 2**20))
        names = {id(t): n for n, t in (*self.named()[0], *self.named()[1])}
        old = self.buckets
        buckets: list[Bucket] = []
        for is_param, tensors in ((True, params), (False, buffers)):
            groups: dict[tuple, list[list[torch.Tensor]]] = {}
            for t in tensors:
                key = (t.device, t.dtype, self.wire_dtype(t))
                lists = groups.setdefault(key, [[]])
                size = sum(x.numel() for x in lists[-1]) * key[2].itemsize
                if lists[-1] and size + t.numel() * key[2].itemsize > cap:
                    lists.append([])
                lists[-1].append(t)
            for (device, _, wire), lists in groups.items():
                for ts in lists:
                    numel = -(-sum(t.numel() for t in ts) // self.pad_to) * self.pad_to
                    comm = _reuse(old, len(buckets), numel, wire, device)
                    buckets.append(Bucket(is_param, [t.detach() for t in ts], [names[id(t)] for t in ts], comm))
        _share_scratch(buckets)
        self.buckets = buckets
        logger.debug("DPPF: %d buckets over %d tensors", len(buckets), len(params) + len(buffers))

    def load(self) -> None:
        """Nothing to do: the buckets read the module's tensors themselves (`ReplicaLayout` copies them in)."""

    def publish(self, comm: Any) -> None:
        """Nothing to do: the rounds wrote the module's tensors themselves (`ReplicaLayout` gathers its shards)."""

    def all_tensors(self) -> list[torch.Tensor]:
        return [t for b in self.buckets for t in b.tensors]


def _reuse(old: list[Bucket], index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """
    Bucket `index`'s flat buffer. When only the tensors' storage moved (e.g. `param.data = ...`) and the layout did
    not, the old buffer is kept: its pages are already mapped, a new one would fault them in again.
    """
    if index < len(old):
        buf = old[index].comm
        if (buf.numel(), buf.dtype, buf.device) == (numel, dtype, device):
            return buf
    return torch.zeros(numel, dtype=dtype, device=device)  # defined contents, also under a backend that sends nothing


def _share_scratch(buckets: Iterable[Bucket]) -> None:
    """One float32 working buffer per device, as large as the largest half-precision bucket, shared by all of them."""
    wanted: dict[tuple, int] = {}
    for b in buckets:
        if not b.same_dtype:
            key = (b.comm.device, torch.promote_types(b.tensors[0].dtype, torch.float32))
            wanted[key] = max(wanted.get(key, 0), b.numel)
    shared = {key: torch.empty(n, dtype=key[1], device=key[0]) for key, n in wanted.items()}
    for b in buckets:
        if not b.same_dtype:
            flat = shared[(b.comm.device, torch.promote_types(b.tensors[0].dtype, torch.float32))][: b.numel]
            b.scratch, b.scratch_views = flat, views_of(flat, b.tensors)
