"""
Health of the workers: do the ranks agree (config, step counter, tensors), are a worker's weights finite, and what
happens when one is not (`DPPFConfig.nonfinite_policy`). Timeouts live with the waits (`collectives.py`).

Everything here is a collective whose answer every rank shares, so every rank takes the same branch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from .buckets import BucketLayout
from .collectives import Collectives

logger = logging.getLogger(__name__)

# `verify_ranks` sends one 16-byte digest per engine (at construction and after a checkpoint is loaded).
FINGERPRINT_BYTES = 16


def local_bad(layout: BucketLayout, comm: Collectives) -> torch.Tensor:
    """
    1.0 if any of this worker's weights (every shard of it) is NaN/Inf, else 0.0: a float64 device scalar, not read.
    One fused L2 norm per tensor: it is NaN/Inf when a value is (and when a weight beyond ~1e19 overflows it, which is
    as good as diverged). The max-abs norm would say the same, but on CPU it is 20x slower.
    """
    params, buffers = layout.collect()
    tensors = params + buffers
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    finite = torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()
    return comm.over_shards(torch.logical_not(finite).double().reshape(1))[0]


def healthy_workers(layout: BucketLayout, comm: Collectives) -> list[int]:
    """Group ranks whose weights are all finite: one all-reduce of M flags and one host read."""
    flags = torch.zeros(comm.world_size, dtype=torch.float64, device=layout.device())
    flags[comm.rank] = 1.0 - local_bad(layout, comm).clamp(max=1.0)
    comm.all_reduce(flags)
    return [i for i, ok in enumerate(flags.tolist()) if ok]


def apply_policy(policy: str, healthy: list[int], world_size: int, when: str, comm_dtype: str) -> None:
    """`DPPFConfig.nonfinite_policy` for a round where some workers are not finite (the same on every rank)."""
    bad = [i for i in range(world_size) if i not in healthy]
    if not bad:
        raise RuntimeError(
            f"{when}: every worker's weights are finite but their average is not (overflow on the wire? "
            f"comm_dtype={comm_dtype!r}); use comm_dtype='fp32' or lower the learning rate."
        )
    what = f"{when}: worker(s) {bad} of {world_size} hold NaN/Inf weights"
    if policy == "raise" or not healthy:
        hint = "no healthy worker is left" if not healthy else "nonfinite_policy='raise'"
        raise RuntimeError(f"{what}; stopping every worker ({hint}). Lower the learning rate or resume earlier.")
    logger.warning("%s; they take the average of the %d healthy worker(s).", what, len(healthy))


def fingerprint(layout: BucketLayout, config: dict[str, Any], steps: int) -> dict[str, Any]:
    """What every rank must agree on: the config, the step counter and each tensor's name, shape and dtype."""
    params, buffers = layout.named()
    tensors = [[kind, n, list(t.shape), str(t.dtype)] for kind, ts in (("p", params), ("b", buffers)) for n, t in ts]
    return {"config": {k: v for k, v in config.items() if k != "timeout_s"}, "steps": steps, "tensors": tensors}


def verify_ranks(layout: BucketLayout, comm: Collectives, config: dict[str, Any], steps: int) -> None:
    """
    Check that every rank has the same config, step counter and tensors: one all-gather of a 16-byte digest. A
    mismatch raises `RuntimeError` on every rank, naming the first difference.
    """
    if comm.world_size == 1:
        return
    mine = fingerprint(layout, config, steps)
    digest = hashlib.blake2b(json.dumps(mine, sort_keys=True, default=str).encode(), digest_size=FINGERPRINT_BYTES)
    local = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).to(layout.device())
    gathered = [local.clone() for _ in range(comm.world_size)]  # (a backend that sends nothing leaves them equal)
    comm.all_gather(gathered, local)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: list[Any] = [None] * comm.world_size  # every rank takes this path: the digests are shared
    device = layout.device()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(everyone, mine, group=comm.group)  # (under nccl: on the tensors' GPU)
    raise RuntimeError(f"DPPF workers disagree, so no round can run: {first_difference(everyone)}")


def first_difference(fingerprints: list[dict[str, Any]]) -> str:
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
