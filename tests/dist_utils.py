"""
Helpers for multi-process tests on CPU: gloo process groups in spawned workers, and an independent byte counter.

`run_distributed(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size` spawned processes with a
fresh free port, initialises gloo, always ends with `barrier()` + `destroy_process_group()`, and returns every rank's
return value (rank order). An exception on any rank fails the test with that rank's traceback. Ranks listed in
`dying` are expected to end abruptly (a crashed worker): the others then exit without the final barrier.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300
_ITEMSIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The suite tests the CPU path: every process it starts says so, so that on a machine with a GPU two ranks never land
# on a missing cuda:1 or share one GPU under nccl (the GPU paths are `scripts/gpu_check.py`'s).
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment with no GPU visible and one thread per process, plus `extra`: for a CPU-path subprocess."""
    return {**os.environ, **CPU_ONLY, "OMP_NUM_THREADS": "1", **extra}


def launcher_env() -> dict[str, str]:
    """
    This environment for a command that a launcher (torchrun, accelerate launch) starts as in the docs: without the
    rank variables a test process may carry, one thread per process, offline, and with no GPU visible.
    """
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "ACCELERATE_USE_CPU")
    env = {k: v for k, v in cpu_env().items() if k not in drop}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def dist_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun / accelerate launch would give a worker (and OMP_NUM_THREADS=1, no GPU visible)."""
    return {
        **CPU_ONLY,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any, init: bool, teardown: bool
) -> None:
    os.environ.update(dist_env(rank, world_size, port))
    torch.set_num_threads(1)
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        if dist.is_initialized() and teardown:
            dist.barrier()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank's traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if not teardown:  # a peer is gone: no barrier, no teardown (gloo would wait for it)
            os._exit(0)
        gc.collect()  # free DDP wrappers before their process group: gloo's teardown otherwise races at exit
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args: Any, init: bool = True, dying: tuple[int, ...] = ()
) -> list[Any]:
    """
    Run `fn(rank, world_size, *args)` on `world_size` CPU processes (no GPU visible to them); return the ranks'
    results in rank order.

    With `init=False` the process group is left to `fn` (e.g. to an `Accelerator(cpu=True)`). Ranks in `dying` may
    exit or be killed inside `fn`; their result is `None`.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    teardown = not dying
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, init, teardown), daemon=False)
        for r in range(world_size)
    ]
    with _environ(CPU_ONLY):  # a spawned rank inherits it before it imports torch
        for p in procs:
            p.start()
    results: dict[int, Any] = dict.fromkeys(dying)
    errors: list[str] = []
    try:
        pending = set(range(world_size)) - set(dying)
        while pending:
            rank, ok, value = _get(queue, procs, dying)
            pending.discard(rank)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _get(queue: Any, procs: list, dying: tuple[int, ...] = ()) -> tuple:
    import time

    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if not queue.empty():
            return queue.get()
        dead = [p for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in dying]
        if dead:
            time.sleep(0.5)  # its error may still be in the pipe
            if not queue.empty():
                return queue.get()
            return (procs.index(dead[0]), False, f"process exited with code {dead[0].exitcode}")
        time.sleep(0.02)
    return (-1, False, f"timed out after {TIMEOUT_S} s (a hang in a collective?)")


def gather_workers(tensors: list[torch.Tensor], world_size: int) -> list[list[torch.Tensor]]:
    """Every rank's copy of `tensors`: `result[i][j]` is rank i's j-th tensor (what `simulate_round` takes)."""
    out = [[torch.empty_like(t.contiguous()) for t in tensors] for _ in range(world_size)]
    for j, t in enumerate(tensors):
        dist.all_gather([w[j] for w in out], t.detach().contiguous())
    return out


@dataclass
class CollectiveLog:
    """Every collective this process issued inside `count_collectives()`, as the profiler saw it."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.calls)

    @property
    def count(self) -> int:
        return len(self.calls)


@contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """
    Count the gloo collectives run by this process, DDP's C++ reducer included, with the profiler's record of every
    `gloo:*` op and its tensor shapes and dtypes. Independent of hf_dppf's own counters, so it is an oracle for
    "local steps send nothing" and for the engine's byte count.
    """
    from torch.profiler import ProfilerActivity, profile

    log = CollectiveLog()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield log
    for name, shapes, dtypes in _gloo_events(prof):
        size = 0
        for shape, dtype in zip(shapes, dtypes):
            if not shape:
                continue  # not a tensor (an option such as the reduce op)
            if dtype not in _ITEMSIZE:
                raise AssertionError(f"{name}: no byte size known for dtype {dtype!r}: add it to _ITEMSIZE")
            size += math.prod(shape) * _ITEMSIZE[dtype]
        log.calls.append((name, size))


def _gloo_events(prof: Any) -> Iterator[tuple[str, list[list[int]], list[str]]]:
    """
    `(name, input shapes, input dtypes)` of every `gloo:*` op but barriers, read from the profiler's raw (Kineto)
    events, which carry the dtypes on every supported torch; `FunctionEvent.input_dtypes` is newer than torch 2.11.
    """
    results = getattr(prof.profiler, "kineto_results", None)
    if results is not None:
        raw = [(e.name(), e.shapes(), e.dtypes()) for e in results.events()]
    else:  # no Kineto: the function events, whose dtypes are all that may be missing
        raw = [(e.name, e.input_shapes, getattr(e, "input_dtypes", None)) for e in prof.events()]
    for name, shapes, dtypes in raw:
        if name.startswith("gloo:") and name != "gloo:barrier":
            shapes = list(shapes or [])
            if dtypes is None or len(dtypes) != len(shapes):
                raise AssertionError(f"the profiler recorded no dtypes for {name}: cannot count its bytes")
            yield name, shapes, list(dtypes)


# torch.distributed calls that move data between ranks (barriers included: they synchronise replicas too).
_COLLECTIVE_FUNCTIONS = (
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
    "all_gather_single", "_all_gather_base", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "scatter", "all_gather_object",
    "broadcast_object_list", "gather_object", "scatter_object_list", "send", "recv", "isend", "irecv", "barrier",
    "monitored_barrier",
)  # fmt: skip


class CollectiveCalls(list):
    """`(function, global ranks of its group)` per call, and in `sent` the bytes of the tensor each call sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[int] = []

    def bytes_over(self, ranks: tuple[int, ...]) -> int:
        """The bytes sent by the calls whose group is exactly `ranks`."""
        return sum(n for (_, group), n in zip(self, self.sent) if group == ranks)


# the argument that holds what a collective sends (the others are outputs)
_SENT_ARGUMENT = {n: "input_tensor" for n in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base")}


@contextmanager
def record_collective_groups(*captured: tuple[Any, str]) -> Iterator[CollectiveCalls]:
    """
    Record `(function, global ranks of its group)` for every torch.distributed collective called inside the block,
    and the bytes of the tensor it sends (`.sent`, 0 for a call without one).

    Args:
        *captured: `(object, attribute)` pairs holding references to torch.distributed functions taken before the
            block (e.g. DeepSpeed's backend keeps `all_gather_into_tensor`); they are wrapped too.
    """
    import inspect

    calls = CollectiveCalls()
    world = tuple(range(dist.get_world_size()))

    def wrap(fn: Callable, name: str) -> Callable:
        signature = inspect.signature(fn)

        def recorder(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind_partial(*args, **kwargs).arguments
            group = arguments.get("group")
            calls.append((name, world if group is None else tuple(dist.get_process_group_ranks(group))))
            sent = arguments.get(_SENT_ARGUMENT.get(name, "tensor"))
            calls.sent.append(sent.numel() * sent.element_size() if isinstance(sent, torch.Tensor) else 0)
            return fn(*args, **kwargs)

        return recorder

    targets = [(dist, name) for name in _COLLECTIVE_FUNCTIONS if hasattr(dist, name)] + list(captured)
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr in targets]
    for obj, attr, fn in originals:
        setattr(obj, attr, wrap(fn, fn.__name__))
    try:
        yield calls
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)


def load_script(name: str) -> Any:
    """Import `scripts/<name>.py` (the scripts folder is not a package) as module `name`."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
