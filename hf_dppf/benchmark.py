"""
`hf-dppf bench`: how long one DPPF consensus round takes next to the communication it cannot avoid.

On a randomly initialised model built from a config (no download; BERT-base by default), every rank times, in
interleaved order so that machine noise hits all methods alike:

- `flat all-reduce`: one `all_reduce` of a single contiguous fp32 tensor as large as all the parameters (the floor);
- `DPPFConsensus.round()`: the engine's full round (copy-in, bucketed all-reduce, norms, pull-push write-back);
  with `--strategies`, one row per strategy (`DPPFConsensus.round() [easgd]`, ...), each fed a loss and a gradient
  norm per round as the integrations do;
- `copy + bucketed all-reduce`: the part of the round that any method keeping each worker's own weights pays;
- `accelerate LocalSGD`: accelerate's `LocalSGD` parameter averaging (one all-reduce per tensor).

Run it directly (it spawns `--nproc` gloo processes on this machine) or under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from .cli_types import POSITIVE_INT, config_field
from .engine import DPPFConsensus, rounds
from .strategies import STRATEGIES

SCHEMA = "hf_dppf.bench/1"
FLOOR = "flat all-reduce (floor)"

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
        "--nproc",
        type=POSITIVE_INT,
        default=2,
        help="processes to spawn when not launched by torchrun (default: %(default)s)",
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
    parser.add_argument("--skip_localsgd", action="store_true", help="do not time accelerate's LocalSGD")
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    parser.add_argument(
        "--output_json",
        default=None,
        help=f"also write the measurements to this JSON file (schema {SCHEMA!r}: the settings, and each method's "
        "median and min ms and its ratio to the flat all-reduce)",
    )


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The `hf-dppf bench` flags that reproduce `args`' measurement settings (not `--nproc` or the outputs)."""
    argv = ["--model", args.model, "--repeats", str(args.repeats), "--bucket_mb", str(args.bucket_mb)]
    argv += ["--comm_dtype", args.comm_dtype, "--strategies", *args.strategies]
    return argv + (["--skip_localsgd"] if args.skip_localsgd else [])


def _time(fn: Callable[[], object]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return (time.perf_counter() - start) * 1e3


def _bench(args: argparse.Namespace) -> dict | None:
    from transformers import BertConfig, BertModel

    from .config import DPPFConfig

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    model = BertModel(BertConfig(**MODELS[args.model])).requires_grad_(True)
    numel = sum(p.numel() for p in model.parameters())
    flat = torch.randn(numel)
    engines = {
        name: DPPFConsensus(model, DPPFConfig(strategy=name, bucket_mb=args.bucket_mb, comm_dtype=args.comm_dtype))
        for name in dict.fromkeys(args.strategies)
    }
    engine = engines.get("dppf") or DPPFConsensus(
        model, DPPFConfig(bucket_mb=args.bucket_mb, comm_dtype=args.comm_dtype)
    )

    def fed_round(e: DPPFConsensus) -> Callable[[], object]:
        def run() -> object:
            e.observe(loss=1.0 + rank, grad_norm=1.0 + rank)  # what the integrations feed lsgd and grawa
            return e.round()

        return run

    methods: dict[str, Callable[[], object]] = {FLOOR: lambda: dist.all_reduce(flat)}
    for name, e in engines.items():
        methods["DPPFConsensus.round()" + ("" if name == "dppf" else f" [{name}]")] = fed_round(e)
    # what any round that keeps each worker's own weights must pay: copy in, bucketed all-reduce, divide
    methods["copy + bucketed all-reduce (no pull-push)"] = lambda: _copy_and_reduce(engine)
    if not args.skip_localsgd:
        from accelerate import Accelerator
        from accelerate.local_sgd import LocalSGD

        accelerator = Accelerator(cpu=True)
        # its own copy: LocalSGD re-points `param.data` to new tensors at every call
        twin = BertModel(BertConfig(**MODELS[args.model]))
        local_sgd = LocalSGD(accelerator, twin, local_sgd_steps=1, enabled=True)
        methods["accelerate LocalSGD averaging"] = local_sgd._sync_and_avg_model_params
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: allocations, gloo connections
        _time(fn)
    for i in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(_time(fn))
        if rank == 0:
            print(
                f"[bench] repeat {i + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items())
            )
    if rank != 0:
        return None
    floor = statistics.median(times[FLOOR])
    return {
        "schema": SCHEMA,
        "model": args.model,
        "parameters": numel,
        "mib": numel * 4 / 2**20,
        "processes": world,
        "repeats": args.repeats,
        "comm_dtype": args.comm_dtype,
        "bucket_mb": args.bucket_mb,
        "methods": {
            name: {"median_ms": statistics.median(t), "min_ms": min(t), "ratio": statistics.median(t) / floor}
            for name, t in times.items()
        },
    }


def _copy_and_reduce(engine: DPPFConsensus) -> None:
    """What any round that keeps each worker's own weights pays: copy every bucket in, all-reduce, wait."""
    buckets = engine.layout.ensure()
    rounds.start(buckets, engine.comm)
    for b in buckets:
        engine.comm.wait(b.work)


def settings_line(result: dict) -> str:
    """One line naming the model, its size and the settings of a `_bench` result."""
    return (
        f"{result['model']}: {result['parameters'] / 1e6:.1f}M parameters, {result['mib']:.0f} MiB fp32; "
        f"{result['processes']} gloo processes, {result['repeats']} repeats, comm_dtype={result['comm_dtype']}, "
        f"bucket_mb={result['bucket_mb']}"
    )


def table(result: dict) -> str:
    """The markdown table of a `_bench` result."""
    lines = [settings_line(result), "", "| method | median ms | min ms | x flat all-reduce |", "|---|---:|---:|---:|"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['median_ms']:.0f} | {m['min_ms']:.0f} | {m['ratio']:.2f}x |")
    return "\n".join(lines)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    _run_rank(args)


def _run_rank(args: argparse.Namespace) -> None:
    if not dist.is_initialized():
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch
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
