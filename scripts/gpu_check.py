#!/usr/bin/env python
"""
A self-check to run on a GPU machine (under 3 minutes): does hf_dppf compute the right rounds on this device, what does
a round cost, and does training with `--dppf` work with these versions? It prints one table:

- engine: the distributed engine against the in-process oracle (`hf_dppf.simulate`) for every strategy (dppf, avg,
  easgd, lsgd, grawa) and wire dtype (fp32, bf16, fp16), on CUDA tensors. Two processes: nccl when there are at least
  2 GPUs (one each), otherwise gloo with both on cuda:0; on a machine without a GPU (or with `--quick`), gloo on CPU.
  Every worker's weights are gathered before the round, the oracle applies the round to them, and the largest
  difference to what the engine produced must stay within the wire dtype's precision.
- bench: the round's cost against the memory floor, from `hf-dppf bench --collectives fake` (median ms, multiple of
  the floor, tensor ops and host reads per round).
- trainer / accelerate: a short `DPPFTrainer` run (`--dppf`, bf16 where the device supports it) and a short plain
  Accelerate loop with `DPPF`, each against the same run without DPPF: steps per second, the accuracy of the averaged
  model, rounds and bytes sent per worker. Model and data are built in-process (no network).
- versions: torch, CUDA, NCCL, the GPUs, transformers, accelerate, datasets, evaluate, hf_dppf.

    python scripts/gpu_check.py              # on the GPU machine
    python scripts/gpu_check.py --quick      # the reduced CPU form (2 gloo processes on CPU, fewer steps)

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("dppf", "avg", "easgd", "lsgd", "grawa")
WIRE_DTYPES = ("fp32", "bf16", "fp16")
# The largest |engine - oracle| allowed, on N(0, 1) weights: what the wire dtype's rounding of the average can cost
# (bf16 keeps 8 significant bits, fp16 11; weights up to ~5 in magnitude); fp32 is the engine's own arithmetic.
TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 5e-3}
WIRE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SECTIONS = ("engine", "bench", "trainer", "accelerate", "versions")
WORLD = 2
TAU = 4


@dataclass
class Row:
    """One line of the table: `status` is ok, FAIL, warn, pending or skipped."""

    section: str
    check: str
    result: str
    status: str
    values: dict[str, Any] | None = None


@dataclass(frozen=True)
class Platform:
    """Where the two processes run: `kind` cpu or cuda, the backend, and each rank's device."""

    kind: str
    backend: str
    devices: tuple[str, ...]

    @property
    def cpu(self) -> bool:
        return self.kind == "cpu"

    def describe(self) -> str:
        return f"{WORLD} processes, {self.backend}, on {' and '.join(self.devices)}"


def choose_platform(device: str) -> Platform:
    """nccl with one GPU per process where there are >= 2 GPUs, gloo with both on cuda:0 on one, gloo on CPU else."""
    gpus = torch.cuda.device_count() if device != "cpu" else 0
    if device == "cuda" and gpus == 0:
        raise SystemExit("--device cuda: no GPU is visible to torch (torch.cuda.device_count() == 0).")
    if gpus >= WORLD:
        return Platform("cuda", "nccl", tuple(f"cuda:{r}" for r in range(WORLD)))
    if gpus == 1:
        return Platform("cuda", "gloo", ("cuda:0",) * WORLD)
    return Platform("cpu", "gloo", ("cpu",) * WORLD)


# ------------------------------------------------------------------------------------------------ processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, platform: Platform, port: int) -> dict[str, str]:
    """What a launcher would give rank `rank`; with both ranks on one GPU, each is local rank 0 of that GPU."""
    one_gpu = not platform.cpu and platform.backend == "gloo"
    local = 0 if one_gpu else rank
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": "1" if one_gpu else str(WORLD),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if platform.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    return env


def _rank_main(rank: int, platform: Platform, port: int, fn: Callable, args: tuple, init: bool, queue: Any) -> None:
    os.environ.update(rank_env(rank, platform, port))
    try:
        if not platform.cpu:
            torch.cuda.set_device(torch.device(platform.devices[rank]))  # before any collective (nccl, objects)
        if init:
            dist.init_process_group(platform.backend, rank=rank, world_size=WORLD)
        result = fn(rank, platform, *args)
        if dist.is_initialized():
            dist.barrier()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported by the parent with the rank's traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, platform: Platform, *args: Any, init: bool = True, timeout_s: float = 600) -> list[Any]:
    """`fn(rank, platform, *args)` in `WORLD` spawned processes; their results in rank order (an error raises)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if platform.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the children see no GPU from the start
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, platform, port, fn, args, init, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
    finally:
        if platform.cpu:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
    results: dict[int, Any] = {}
    error = None
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < WORLD and error is None:
            if not queue.empty():
                rank, ok, value = queue.get()
                if ok:
                    results[rank] = value
                else:
                    error = f"rank {rank} failed:\n{value}"
            elif time.monotonic() > deadline:
                error = f"timed out after {timeout_s:g} s"
            elif any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(0.5)
                if queue.empty():
                    error = f"a process exited with code {[p.exitcode for p in procs]}"
            else:
                time.sleep(0.02)
    finally:
        for p in procs:
            p.join(timeout=30 if error is None else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if error is not None:
        raise RuntimeError(error)
    return [results[r] for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------ (a) engine
def _fed(rank: int) -> tuple[float, float]:
    """The loss and gradient norm worker `rank` feeds the engine (lsgd elects rank 1, grawa weighs 1/(0.5 + r))."""
    return (2.0 if rank == 0 else 1.0 + 0.5 * (rank - 1), 0.5 + rank)


def _check_model(rank: int, device: str) -> torch.nn.Module:
    """Parameters of a few shapes and BatchNorm buffers, drawn from N(0, 1) with a per-rank seed."""
    model = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 10))
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for t in [*model.parameters(), model[1].running_mean]:
            t.copy_(torch.randn(t.shape, generator=g))
        model[1].running_var.copy_(torch.rand(64, generator=g) + 0.5)
    return model.to(device)


def _gather(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every rank's copy of `tensors` (on the CPU, float64): `result[i][j]` is rank i's j-th tensor."""
    out = [[torch.empty_like(t) for t in tensors] for _ in range(WORLD)]
    for j, t in enumerate(tensors):
        dist.all_gather([w[j] for w in out], t.detach().contiguous())
    return [[t.cpu().double() for t in w] for w in out]


def worst_gap(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between two lists of tensors (NaN anywhere gives inf)."""
    gap = max((g.detach().cpu().double() - w.detach().cpu().double()).abs().max().item() for g, w in zip(got, want))
    return gap if math.isfinite(gap) else math.inf


def _engine_rank(rank: int, platform: Platform, strategies: Sequence[str], wires: Sequence[str]) -> list[dict]:
    from hf_dppf import DPPFConfig, DPPFConsensus
    from hf_dppf.simulate import simulate_consensus

    device = platform.devices[rank]
    out = []
    for strategy in strategies:
        for wire in wires:
            extra = {"dppf": {"lam": 0.3}, "easgd": {"beta": 0.6}}.get(strategy, {})
            alpha = 1.0 if strategy == "avg" else 0.5
            config = DPPFConfig(strategy=strategy, alpha=alpha, comm_dtype=wire, bucket_mb=0.01, **extra)
            model = _check_model(rank, device)
            params = [p for p in model.parameters() if p.requires_grad]
            engine = DPPFConsensus(model, config)
            loss, grad_norm = _fed(rank)
            engine.observe(loss=torch.tensor(loss, device=device), grad_norm=torch.tensor(grad_norm, device=device))
            workers = _gather(params)
            buffers = _gather([model[1].running_mean, model[1].running_var])
            fed = [_fed(r) for r in range(WORLD)]
            expected = simulate_consensus(
                workers, config, losses=[f[0] for f in fed], grad_norms=[f[1] for f in fed]
            ).workers[rank]
            sent = engine.stats.bytes_communicated
            if not platform.cpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.round()
            if not platform.cpu:
                torch.cuda.synchronize()
            ms = 1e3 * (time.perf_counter() - start)
            mean_buffers = [torch.stack([w[b] for w in buffers]).mean(0) for b in range(2)]
            out.append(
                {
                    "strategy": strategy,
                    "wire": wire,
                    "gap": worst_gap(params, expected),
                    "buffer_gap": worst_gap([model[1].running_mean, model[1].running_var], mean_buffers),
                    "bytes": engine.stats.bytes_communicated - sent,
                    "elements": sum(p.numel() for p in params) + 2 * 64,
                    "ms": ms,
                }
            )
    return out


def engine_rows(platform: Platform, strategies: Sequence[str] = STRATEGIES, wires: Sequence[str] = WIRE_DTYPES):
    """Section (a): one row per strategy and wire dtype, the worst gap over both ranks against its tolerance."""
    ranks = run_ranks(_engine_rank, platform, tuple(strategies), tuple(wires))
    rows = []
    for i, first in enumerate(ranks[0]):
        cases = [r[i] for r in ranks]
        gap = max(max(c["gap"], c["buffer_gap"]) for c in cases)
        sent = max(c["bytes"] for c in cases)
        payload = WIRE_BYTES[first["wire"]] * first["elements"]  # parameters and buffers at the wire dtype
        ok = gap <= TOLERANCE[first["wire"]] and sent >= payload
        result = (
            f"max |engine - simulate| {gap:.2e} (tol {TOLERANCE[first['wire']]:.0e}); {sent} B sent "
            f"({payload} B of weights at the wire dtype); {max(c['ms'] for c in cases):.2f} ms"
        )
        values = {"gap": gap, "bytes": sent, "payload_bytes": payload, "ms": max(c["ms"] for c in cases)}
        rows.append(Row("engine", f"{first['strategy']} / {first['wire']}", result, "ok" if ok else "FAIL", values))
    return rows


# ------------------------------------------------------------------------------------------------ (b) bench
PENDING = "pending: bench --collectives fake not available"


def bench_command(device: str, output_json: str, quick: bool) -> list[str]:
    command = [sys.executable, "-m", "hf_dppf.cli", "bench", "--collectives", "fake", "--device", device]
    command += ["--strategies", "dppf", "avg", "--output_json", output_json]
    if quick:
        command += ["--model", "bert-tiny", "--repeats", "2"]
    return command


def bench_rows_from(result: dict[str, Any]) -> list[Row]:
    """Rows from `hf-dppf bench --output_json`: each round's median against the memory floor, ops and host reads."""
    floor = float(result["floor_ms"])
    rows = []
    for name, r in result["rounds"].items():
        text = (
            f"{r['median_ms']:.3f} ms = {r['floor_multiple']:.2f}x the floor ({floor:.3f} ms); "
            f"{r['ops']} ops, {r['host_reads']} host reads"
        )
        status = "ok" if r["host_reads"] <= 2 else "warn"  # DESIGN: at most 2 host reads per round
        values = {k: r[k] for k in ("median_ms", "floor_multiple", "ops", "host_reads")} | {"floor_ms": floor}
        rows.append(Row("bench", f"round: {name}", text, status, values))
    return rows


def bench_rows(device: str, quick: bool, timeout_s: float = 300, run: Callable = subprocess.run) -> list[Row]:
    """Section (b): run the bench as a subprocess and read its JSON; an older bench without the flags is pending."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
        try:
            done = run(bench_command(device, path, quick), capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return [Row("bench", "round vs memory floor", f"timed out after {timeout_s:g} s", "FAIL")]
        if done.returncode != 0:
            if "--collectives" in done.stderr and ("unrecognized" in done.stderr or "invalid choice" in done.stderr):
                return [Row("bench", "round vs memory floor", PENDING, "pending")]
            tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            return [Row("bench", "round vs memory floor", f"bench failed: {tail[0][:200]}", "FAIL")]
        with open(path) as f:
            return bench_rows_from(json.load(f))


# ------------------------------------------------------------------------------------------------ (c) training
def token_task(n: int, seed: int, vocab: int = 32, length: int = 12) -> dict[str, list]:
    """Random token sequences; the label is whether token 0 is in the upper half of the vocabulary (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    return {
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
        "labels": (ids[:, 0] >= (vocab + 2) // 2).long().tolist(),
    }


def blob_task(n: int, seed: int, dim: int = 32, classes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres (separable): features and labels."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def bf16_supported(platform: Platform) -> bool:
    return not platform.cpu and torch.cuda.is_bf16_supported()


def _trainer_rank(rank: int, platform: Platform, steps: int, bf16: bool, tmp: str) -> dict[str, dict]:
    import datasets
    import numpy as np
    from transformers import BertConfig, BertForSequenceClassification

    from hf_dppf import DPPFTrainer, DPPFTrainingArguments

    train = datasets.Dataset.from_dict(token_task(2048, seed=1))
    test = datasets.Dataset.from_dict(token_task(256, seed=2))

    def accuracy(prediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    out = {}
    for dppf in (False, True):
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=2,
        )  # fmt: skip
        model = BertForSequenceClassification(config)
        args = DPPFTrainingArguments(
            output_dir=os.path.join(tmp, f"trainer-{dppf}"), dppf=dppf, dppf_tau=TAU, dppf_alpha=0.5,
            dppf_width=0.005, use_cpu=platform.cpu, ddp_backend=platform.backend, bf16=bf16,
            per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=3e-3, max_steps=steps,
            warmup_steps=0, logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = DPPFTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
        metrics = trainer.train().metrics
        evaluation = trainer.evaluate()
        stats = trainer.dppf_engine.stats if trainer.dppf_engine is not None else None
        out["dppf" if dppf else "ddp"] = {
            "steps_per_s": metrics["train_steps_per_second"],
            "accuracy": evaluation["eval_accuracy"],
            "rounds": stats.rounds if stats else 0,
            "bytes": stats.bytes_communicated if stats else 0,
            "param_bytes": sum(p.numel() * 4 for p in model.parameters()),
        }
        trainer.accelerator.wait_for_everyone()
        trainer.model_wrapped = trainer.model  # free the DDP wrapper before the next run (and the group's end)
        trainer.accelerator.free_memory()
    return out


def _accelerate_rank(rank: int, platform: Platform, steps: int, bf16: bool) -> dict[str, dict]:
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from torch.utils.data import DataLoader, TensorDataset

    from hf_dppf import DPPF, DPPFConfig

    accelerator = Accelerator(  # the backend said outright: Accelerate's default on GPUs is nccl, even on one GPU
        cpu=platform.cpu,
        mixed_precision="bf16" if bf16 else "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend=platform.backend)],
    )
    x, y = blob_task(4096, seed=1)
    x_test, y_test = blob_task(512, seed=2)
    out = {}
    for dppf in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        done = 0
        with DPPF(accelerator, model, optimizer, DPPFConfig(tau=TAU, alpha=0.5, width=0.005), enabled=dppf) as run:
            start = time.perf_counter()  # the loop alone: not the engine's one-off set-up
            while done < steps:
                for xb, yb in loader:
                    loss = F.cross_entropy(model(xb), yb)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                    run.step()
                    done += 1
                    if done == steps:
                        break
        if not platform.cpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        with torch.no_grad():  # after the block every worker holds the average
            device = accelerator.device
            accuracy = (model(x_test.to(device)).argmax(-1).cpu() == y_test).float().mean().item()
        out["dppf" if dppf else "ddp"] = {
            "steps_per_s": steps / seconds,
            "accuracy": accuracy,
            "rounds": run.stats.rounds if dppf else 0,
            "bytes": run.stats.bytes_communicated if dppf else 0,
            "param_bytes": sum(p.numel() * 4 for p in model.parameters()),
        }
        accelerator.free_memory()
    return out


def training_rows(section: str, ranks: list[dict[str, dict]], steps: int, bf16: bool) -> list[Row]:
    """Rows for a DPPF run against its DDP twin; rank 0's numbers (the ranks agree on rounds and accuracy)."""
    ddp, dppf = ranks[0]["ddp"], ranks[0]["dppf"]
    expected_rounds = steps // TAU + 1  # a round every TAU optimizer steps and the final average
    agree = all(r["dppf"]["accuracy"] == dppf["accuracy"] for r in ranks)
    ok = dppf["rounds"] == expected_rounds and dppf["bytes"] >= dppf["rounds"] * dppf["param_bytes"] and agree
    precision = "bf16" if bf16 else "fp32"
    text = (
        f"{dppf['steps_per_s']:.1f} steps/s vs {ddp['steps_per_s']:.1f} without DPPF "
        f"({dppf['steps_per_s'] / ddp['steps_per_s']:.2f}x); accuracy of the average {dppf['accuracy']:.3f} "
        f"(DDP {ddp['accuracy']:.3f}); {dppf['rounds']} rounds (expected {expected_rounds}), "
        f"{dppf['bytes'] / 2**20:.2f} MiB sent per worker"
    )
    values = {"ddp": ddp, "dppf": dppf, "expected_rounds": expected_rounds, "ranks_agree": agree}
    return [Row(section, f"{steps} steps, {precision}, tau {TAU}", text, "ok" if ok else "FAIL", values)]


# ------------------------------------------------------------------------------------------------ (d) versions
def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    found["CUDA"] = str(torch.version.cuda) if torch.cuda.is_available() else "none (no GPU visible)"
    if torch.cuda.is_available():
        found["NCCL"] = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "none"
        found["GPUs"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    for package in ("transformers", "accelerate", "datasets", "evaluate", "hf_dppf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# ------------------------------------------------------------------------------------------------ the table
def table(rows: Sequence[Row]) -> str:
    cells = [("section", "check", "status", "result")] + [(r.section, r.check, r.status, r.result) for r in rows]
    width = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [f"| {a:<{width[0]}} | {b:<{width[1]}} | {c:<{width[2]}} | {d} |" for a, b, c, d in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|---|")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the reduced CPU form: 2 gloo processes on CPU (no GPU used), fewer training steps, a tiny bench model",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where to run: auto takes the GPUs when torch sees any (cpu with --quick)",
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which parts of the check to run"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps of each training run (default: 200, 24 with --quick)"
    )
    parser.add_argument("--timeout_s", type=float, default=600, help="give up on one section after this many seconds")
    parser.add_argument("--output_json", default=None, help="also write the rows (with their numbers) to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = "cpu" if args.quick and args.device == "auto" else args.device
    steps = args.steps or (24 if args.quick else 200)
    if steps < TAU:
        raise SystemExit(f"--steps={steps} is invalid: it must be at least {TAU} (one round).")
    platform = choose_platform(device)
    bf16 = bf16_supported(platform)
    print(f"hf_dppf GPU check: {platform.describe()}", flush=True)
    rows: list[Row] = []

    def guarded(section: str, make: Callable[[], list[Row]]) -> None:
        if section not in args.sections:
            return
        try:
            new = make()
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
            new = [Row(section, "run", f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}", "FAIL")]
        rows.extend(new)
        for row in new:
            print(f"[{row.status}] {row.section} {row.check}: {row.result}", flush=True)

    guarded("engine", lambda: engine_rows(platform))
    guarded("bench", lambda: bench_rows("cpu" if platform.cpu else "cuda", args.quick, args.timeout_s))
    with tempfile.TemporaryDirectory() as tmp:
        guarded(
            "trainer",
            lambda: training_rows(
                "trainer", run_ranks(_trainer_rank, platform, steps, bf16, tmp, init=False), steps, bf16
            ),
        )
    guarded(
        "accelerate",
        lambda: training_rows(
            "accelerate", run_ranks(_accelerate_rank, platform, steps, bf16, init=False), steps, bf16
        ),
    )
    guarded("versions", lambda: [Row("versions", k, v, "ok") for k, v in versions().items()])
    print()
    print(table(rows))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"platform": asdict(platform), "rows": [asdict(r) for r in rows]}, f, indent=2, default=str)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
