#!/usr/bin/env python
"""
Run a training script with every gradient all-reduce of `DistributedDataParallel` counted, byte by byte.

    torchrun --nproc_per_node 4 scripts/count_ddp_bytes.py recipes/text_classification.py --max_steps 20 ...

Every DDP module the script builds gets a communication hook that adds the size of each gradient bucket it hands to
all-reduce to a counter and then all-reduces the bucket as DDP does by default (mean over the ranks). At exit every
rank writes `{"rank", "ddp_allreduce_bytes", "ddp_allreduce_calls"}` to `$COUNT_DDP_BYTES_DIR/rank<RANK>.json` (the
current directory when unset). Steps that skip the all-reduce (`no_sync`, DPPF's local steps) count nothing. Not
counted: DDP's one parameter broadcast at construction and its per-forward buffer broadcast (`broadcast_buffers`).
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

COUNTER = {"ddp_allreduce_bytes": 0, "ddp_allreduce_calls": 0}


def counting_allreduce_hook(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default all-reduce of one gradient bucket, counted (real annotations: DDP checks the hook's)."""
    buffer = bucket.buffer()
    COUNTER["ddp_allreduce_bytes"] += buffer.numel() * buffer.element_size()
    COUNTER["ddp_allreduce_calls"] += 1
    return default_hooks.allreduce_hook(process_group, bucket)


def install() -> None:
    """Register the counting hook on every `DistributedDataParallel` built from now on."""
    original_init = DistributedDataParallel.__init__

    def init(self: DistributedDataParallel, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        self.register_comm_hook(None, counting_allreduce_hook)

    DistributedDataParallel.__init__ = init


def write_counts() -> None:
    folder = Path(os.environ.get("COUNT_DDP_BYTES_DIR", "."))
    folder.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **COUNTER}))


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: count_ddp_bytes.py SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    install()
    atexit.register(write_counts)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
