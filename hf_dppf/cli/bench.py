"""
`hf-dppf bench`: how long one DPPF consensus round takes next to what it cannot avoid, how many tensor ops it
dispatches and how often it reads the host.

On a randomly initialised model built from a config (no download; BERT-base by default), in interleaved order so
that machine noise hits all methods alike, with `--collectives`:

- `gloo` (default): `--nproc` processes; the floor is one `all_reduce` of a single contiguous fp32 tensor as large as
  all the parameters. Rows: each strategy's `DPPFConsensus.round()`, `copy + bucketed all-reduce` (what any method
  keeping each worker's own weights pays), `copy + all-reduce + read sum and weights + write-back (bound)` (the
  memory passes no round with module-owned weights can skip: the distance reads the sum and the weights, the
  write-back reads both and writes the weights; not a round) and accelerate's `LocalSGD` parameter averaging (one
  all-reduce per tensor).
- `fake`: one process of a "fake" group of `--nproc` ranks whose collectives return at once, so only the engine's
  own work is timed (on a GPU: its kernels and their launches). The floor is 5 passes over the weights at the
  copy bandwidth measured in the same run (a copy is 2 passes).

Every round row also gives the ops dispatched (counted with a `TorchDispatchMode`, collectives included), the host
reads (`.item()`, `.tolist()`) and the extra memory (communication buffers, snapshots, scratch and centre buffers as
a multiple of the parameter bytes). `--overlapped` adds an overlapped dppf round (launch + finish).

Run it directly (gloo spawns `--nproc` processes on this machine) or under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import DPPFConfig
from ..engine import DPPFConsensus, rounds
from ..strategies import STRATEGIES
from .arg_types import POSITIVE_INT, config_field

SCHEMA = "hf_dppf.bench/2"
FLOOR = "flat all-reduce (floor)"
MEMORY_FLOOR = "5 passes over the weights (floor)"
OVERLAPPED = "overlapped dppf (launch + finish)"
LOWER_BOUND = "copy + all-reduce + read sum and weights + write-back (bound)"

MODELS = {
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="bert-base",
        help="model size, built from its config (default: %(default)s)",
    )
    parser.add_argument(
        "--collectives",
        choices=["gloo", "fake"],
        default="gloo",
        help="gloo: real all-reduces between --nproc processes; fake: one process, collectives that return at once "
        "(the engine's own cost; the floor is then the memory floor) (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model and buffers live: cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument(
        "--nproc",
        type=POSITIVE_INT,
        default=2,
        help="processes (gloo) or ranks of the fake group (fake) (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=POSITIVE_INT,
        default=7,
        help="timed repetitions of each method; medians are reported (default: %(default)s)",
    )
    parser.add_argument(
        "--bucket_mb",
        type=config_field("bucket_mb"),
        default=25.0,
        help="DPPFConfig.bucket_mb of the engine (default: %(default)s)",
    )
    parser.add_argument(
        "--comm_dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="DPPFConfig.comm_dtype of the engine (default: %(default)s)",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["dppf"],
        choices=sorted(STRATEGIES),
        help="strategies whose round is timed, one row each (default: %(default)s)",
    )
    parser.add_argument(
        "--overlapped", action="store_true", help="also time an overlapped dppf round (launch + finish)"
    )
    parser.add_argument("--skip_localsgd", action="store_true", help="do not time accelerate's LocalSGD (gloo only)")
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    parser.add_argument(
        "--output_json",
        default=None,
        help=f"also write the measurements to this JSON file (schema {SCHEMA!r}: the settings, `floor_ms`, each "
        "method's median and min ms and its ratio to the floor, and per round `ops`, `host_reads`, `extra_memory`)",
    )


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The `hf-dppf bench` flags that reproduce `args`' measurement settings (not `--nproc` or the outputs)."""
    argv = ["--model", args.model, "--repeats", str(args.repeats), "--bucket_mb", str(args.bucket_mb)]
    argv += ["--collectives", args.collectives, "--device", args.device]
    argv += ["--comm_dtype", args.comm_dtype, "--strategies", *args.strategies]
    return argv + (["--skip_localsgd"] if args.skip_localsgd else []) + (["--overlapped"] if args.overlapped else [])


class _OpCounter(TorchDispatchMode):
    """Every op dispatched inside the block, and the host reads among them (`_local_scalar_dense`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops() -> Iterator[_OpCounter]:
    """Count dispatched ops and host reads (`_local_scalar_dense` and `Tensor.tolist`) inside the block."""
    counter, tolist = _OpCounter(), torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor, *args, **kwargs):
        counter.reads += 1
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted_tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    fn()
    _sync(device)
    dist.barrier()
    return (time.perf_counter() - start) * 1e3


def extra_memory(engine: DPPFConsensus) -> float:
    """The engine's buffers (wire, snapshots, scratch, centres) as a multiple of the parameter and buffer bytes."""
    buckets = engine.layout.ensure()
    weights = sum(t.numel() * t.element_size() for b in buckets for t in b.tensors)
    held = {}
    for b in buckets:
        for buf in (b.comm, b.snapshot, b.scratch, b.centre):
            if buf is not None:
                held[buf.untyped_storage().data_ptr()] = buf.untyped_storage().nbytes()
    return sum(held.values()) / max(weights, 1)


def _device(spec: str) -> torch.device:
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _bench(args: argparse.Namespace) -> dict | None:
    from transformers import BertConfig, BertModel

    torch.set_num_threads(1)
    device = _device(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    model = BertModel(BertConfig(**MODELS[args.model])).requires_grad_(True).to(device)
    numel = sum(p.numel() for p in model.parameters())
    flat = torch.randn(numel, device=device)
    common = dict(bucket_mb=args.bucket_mb, comm_dtype=args.comm_dtype)
    engines = {
        name: DPPFConsensus(model, DPPFConfig(strategy=name, **common)) for name in dict.fromkeys(args.strategies)
    }

    def fed_round(e: DPPFConsensus) -> Callable[[], object]:
        def run() -> object:
            e.observe(loss=1.0 + rank, grad_norm=1.0 + rank)  # what the integrations feed lsgd and grawa
            return e.round()

        return run

    rows: dict[str, tuple[DPPFConsensus, Callable[[], object]]] = {
        name: (e, fed_round(e)) for name, e in engines.items()
    }
    if args.overlapped:
        e = DPPFConsensus(model, DPPFConfig(tau=2, overlap_steps=1, **common))
        rows[OVERLAPPED] = (e, lambda e=e: (e.launch(), e.finish()))
    methods: dict[str, Callable[[], object]] = {}
    if args.collectives == "fake":
        target = torch.empty_like(flat)
        floor_name = MEMORY_FLOOR
        copy_ms: list[float] = []
        methods["flat copy of the weights"] = lambda: target.copy_(flat)
    else:
        floor_name = FLOOR
        methods[FLOOR] = lambda: dist.all_reduce(flat)
    for name, (_, fn) in rows.items():
        methods[_row_name(name)] = fn
    if args.collectives == "gloo":
        engine = next(iter(engines.values()))
        methods["copy + bucketed all-reduce (no pull-push)"] = lambda: _copy_and_reduce(engine)
        methods[LOWER_BOUND] = lambda: _copy_and_reduce(engine, passes=True)
        if not args.skip_localsgd:
            from accelerate import Accelerator
            from accelerate.local_sgd import LocalSGD

            accelerator = Accelerator(cpu=device.type == "cpu")
            # its own copy: LocalSGD re-points `param.data` to new tensors at every call
            twin = BertModel(BertConfig(**MODELS[args.model])).to(device)
            local_sgd = LocalSGD(accelerator, twin, local_sgd_steps=1, enabled=True)
            methods["accelerate LocalSGD averaging"] = local_sgd._sync_and_avg_model_params
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: allocations, connections, layouts
        _time(fn, device)
    for i in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(_time(fn, device))
        if rank == 0:
            print(
                f"[bench] repeat {i + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items())
            )
    counts = {}
    for name, (e, fn) in rows.items():
        with count_ops() as c:
            fn()
        _sync(device)
        counts[name] = {"ops": c.ops, "host_reads": c.reads, "extra_memory": extra_memory(e)}
    if rank != 0:
        return None
    if args.collectives == "fake":  # a copy reads and writes the weights once: 2 passes
        copy_ms = times.pop("flat copy of the weights")
        times = {floor_name: [2.5 * t for t in copy_ms], **times}
    floor = statistics.median(times[floor_name])
    methods_out = {
        name: {"median_ms": statistics.median(t), "min_ms": min(t), "ratio": statistics.median(t) / floor}
        for name, t in times.items()
    }
    rounds_out = {
        name: {
            "median_ms": methods_out[_row_name(name)]["median_ms"],
            "floor_multiple": methods_out[_row_name(name)]["ratio"],
            "buckets": len(e.layout.buckets),
            **counts[name],
        }
        for name, (e, _) in rows.items()
    }
    return {
        "schema": SCHEMA,
        "model": args.model,
        "parameters": numel,
        "mib": numel * 4 / 2**20,
        "processes": world,
        "collectives": args.collectives,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "comm_dtype": args.comm_dtype,
        "bucket_mb": args.bucket_mb,
        "floor": floor_name,
        "floor_ms": floor,
        "methods": methods_out,
        "rounds": rounds_out,
    }


def _row_name(name: str) -> str:
    if name == OVERLAPPED:
        return name
    return "DPPFConsensus.round()" + ("" if name == "dppf" else f" [{name}]")


def _copy_and_reduce(engine: DPPFConsensus, passes: bool = False) -> None:
    """
    What any round that keeps each worker's own weights pays: copy every bucket in, all-reduce, wait. With `passes`,
    also the memory traffic no such round can avoid (not a round: no coefficient is formed and the weights do not
    change): as each bucket arrives, one read of the sum and one of the weights (the distance needs both), then the
    write-back, one `x += w * buffer` per bucket (here with `w = 0`, which reads and writes as much).
    """
    buckets = engine.layout.ensure()
    rounds.start(buckets, engine.comm)
    for b in buckets:
        engine.comm.wait(b.work)
        if passes:
            rounds.norm(b.comm)
            torch._foreach_norm(b.tensors)
    if passes:
        for b in buckets:
            torch._foreach_add_(b.tensors, b.views, alpha=0.0)


def settings_line(result: dict) -> str:
    """One line naming the model, its size and the settings of a `_bench` result."""
    if result.get("collectives") == "fake":
        where = f"one process of a fake group of {result['processes']} (collectives taken out)"
    else:
        where = f"{result['processes']} gloo processes"
    device = result.get("device_name", "cpu")
    return (
        f"{result['model']}: {result['parameters'] / 1e6:.1f}M parameters, {result['mib']:.0f} MiB fp32; {where} on "
        f"{device}, torch {result.get('torch', '?')}, {result['repeats']} repeats, comm_dtype={result['comm_dtype']}, "
        f"bucket_mb={result['bucket_mb']}"
    )


def table(result: dict) -> str:
    """The markdown table of a `_bench` result: times, ratios to the floor, and per round ops, reads and memory."""
    counted = {_row_name(name): r for name, r in result.get("rounds", {}).items()}
    lines = [
        settings_line(result),
        "",
        "| method | median ms | min ms | x floor | ops | host reads | extra memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["methods"].items():
        c = counted.get(name)
        tail = f"{c['ops']} | {c['host_reads']} | {c['extra_memory']:.2f}x" if c else " |  | "
        lines.append(f"| {name} | {m['median_ms']:.2f} | {m['min_ms']:.2f} | {m['ratio']:.2f}x | {tail} |")
    return "\n".join(lines)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    _run_rank(args)


def _run_rank(args: argparse.Namespace) -> None:
    if not dist.is_initialized():
        if args.collectives == "fake":
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.nproc)
        else:
            dist.init_process_group("gloo")
    try:
        result = _bench(args)
        if result is not None:
            text = table(result)
            print(text, flush=True)
            if args.output:
                Path(args.output).write_text(text + "\n")
            if args.output_json:
                Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    if args.nproc < 2:
        print(f"--nproc={args.nproc} is invalid: a consensus round needs at least 2 processes.", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device={args.device} is invalid: no CUDA device is available here (use cpu).", file=sys.stderr)
        return 2
    if args.collectives == "fake" or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # fake, or torchrun / accelerate
        _run_rank(args)
        return 0
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args.nproc, port, args), nprocs=args.nproc, start_method="spawn")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
