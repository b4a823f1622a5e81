"""
The round at accelerator speed: on a GPU every tensor op is a kernel launch and every host read a stall, so every kind
of round must dispatch at most 10 ops per bucket plus 60 and read the host at most twice, however many tensors or
elements a bucket holds.

Oracle: a `TorchDispatchMode` that sees every op the engine dispatches (the collectives included) and every
`_local_scalar_dense` (`.item()`, `bool()`, `float()` of a tensor), plus a count of `Tensor.tolist()` calls, on
both ranks of a 2-process gloo group.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import pytest
import torch
from dist_utils import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

from hf_dppf import DPPFConfig, DPPFConsensus


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = str(func)
        self.names[name] = self.names.get(name, 0) + 1
        if "_local_scalar_dense" in name:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counted() -> Iterator[_Counter]:
    """Count dispatched ops and host reads (`_local_scalar_dense` and `Tensor.tolist`) inside the block."""
    counter = _Counter()
    tolist = torch.Tensor.tolist

    def counting_tolist(self, *args, **kwargs):
        counter.reads += 1
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counting_tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist


# (name, config, what one "round" is): every kind of round the issue lists
def _round(engine: DPPFConsensus) -> None:
    engine.observe(loss=1.0 + engine.rank, grad_norm=2.0)  # lsgd: rank 0 leads, rank 1 moves
    engine.round(push_scale=0.5)


def _overlapped(engine: DPPFConsensus) -> None:
    engine.launch(0.5)
    engine.finish()


def _averaged(engine: DPPFConsensus) -> None:
    with engine.averaged():
        pass


KINDS: list[tuple[str, dict, Callable[[DPPFConsensus], None]]] = [
    *[(f"{s}-{w}", dict(strategy=s, comm_dtype=w), _round) for s in ("dppf", "avg") for w in ("fp32", "bf16", "fp16")],
    *[
        (f"{s}-{w}", dict(strategy=s, comm_dtype=w), _round)
        for s in ("easgd", "lsgd", "grawa")
        for w in ("fp32", "bf16")
    ],
    ("dppf-alpha1-lam0", dict(alpha=1.0, lam=0.0), _round),
    ("overlapped-dppf-fp32", dict(tau=2, overlap_steps=1), _overlapped),
    ("overlapped-avg-bf16", dict(strategy="avg", tau=2, overlap_steps=1, comm_dtype="bf16"), _overlapped),
    ("nonfinite-check", dict(), lambda e: e.ensure_finite()),
    ("averaged", dict(), _averaged),
]


def _count(model: torch.nn.Module, kinds: list, bucket_mb: float) -> dict[str, tuple[int, int, int]]:
    """`{kind: (ops, host reads, buckets)}` of the second call of each kind (the first builds the layout)."""
    out = {}
    for name, fields, run in kinds:
        engine = DPPFConsensus(model, DPPFConfig(bucket_mb=bucket_mb, **fields))
        run(engine)
        with counted() as c:
            run(engine)
        out[name] = (c.ops, c.reads, len(engine.layout.ensure()))
        del engine
        gc.collect()
    return out


def _bert_counts(rank: int, world_size: int) -> dict:
    """Both ranks build their own BERT-base (109.5M parameters in 199 tensors) and count every kind of round."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(rank)
    model = BertModel(BertConfig()).requires_grad_(True)
    return _count(model, KINDS, bucket_mb=25.0)


def test_every_round_of_a_bert_base_model_is_o_buckets_ops_and_two_host_reads() -> None:
    for counts in run_distributed(_bert_counts, 2):
        for name, (ops, reads, buckets) in counts.items():
            assert buckets >= (8 if "16" in name else 16), (name, buckets)  # 25 MiB on the wire: 8 half buckets
            assert ops <= 10 * buckets + 60, f"{name}: {ops} ops for {buckets} buckets"
            assert reads <= 2, f"{name}: {reads} host reads"


def _growth_counts(rank: int, world_size: int) -> dict:
    def model(tensors: int, numel: int) -> torch.nn.Module:
        return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(numel // tensors)) for _ in range(tensors)])

    kinds = [k for k in KINDS if k[0].endswith(("fp32", "bf16")) or not k[0].startswith(("dppf-", "avg-"))]
    return {size: _count(model(*size), kinds, bucket_mb=256.0) for size in ((4, 1 << 20), (64, 1 << 20), (4, 1 << 24))}


def test_the_op_count_does_not_grow_with_tensors_or_elements_in_a_bucket() -> None:
    for by_size in run_distributed(_growth_counts, 2):
        small, many_tensors, many_elements = by_size.values()
        for name in small:
            assert small[name][2] == many_tensors[name][2] == many_elements[name][2] == 1, name
            assert small[name][:2] == many_tensors[name][:2] == many_elements[name][:2], (
                name,
                small[name],
                many_tensors[name],
                many_elements[name],
            )


def _solo_step_and_round(rank: int, world_size: int) -> dict:
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(50)])  # 100 tensors
    engine = DPPFConsensus(model, DPPFConfig(tau=2))
    engine.step()
    with counted() as between:
        engine.step()  # M = 1: a round
    with counted() as step:
        engine.step()  # no round
    return {"round": (between.ops, between.reads), "step": (step.ops, step.reads)}


@pytest.mark.parametrize("world_size", [1])
def test_one_worker_round_reads_once_and_a_step_between_rounds_costs_nothing(world_size: int) -> None:
    (r,) = run_distributed(_solo_step_and_round, world_size)
    assert r["step"] == (0, 0)
    ops, reads = r["round"]
    assert reads == 1 and ops <= 20, r


def _tiny_counts(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import BertConfig, BertModel

    from hf_dppf.cli.bench import MODELS

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    model = BertModel(BertConfig(**MODELS["bert-tiny"])).requires_grad_(True)
    kinds = [k for k in KINDS if k[0] in ("dppf-fp32", "avg-fp32", "lsgd-fp32", "overlapped-dppf-fp32")]
    return _count(model, kinds, bucket_mb=1.0)


def test_the_bench_counts_what_this_test_counts(tmp_path) -> None:
    """`hf-dppf bench --collectives fake` reports the op and read counts that this file's own counter sees."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "hf_dppf.cli", "bench", "--collectives", "fake", "--model", "bert-tiny"]
    cmd += ["--bucket_mb", "1", "--repeats", "1", "--strategies", "dppf", "avg", "lsgd", "--overlapped"]
    proc = subprocess.run([*cmd, "--output_json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads(out.read_text())
    assert bench["floor"] == "5 passes over the weights (floor)" and bench["floor_ms"] > 0
    (ours,) = run_distributed(_tiny_counts, 1, init=False)
    names = {
        "dppf": "dppf-fp32",
        "avg": "avg-fp32",
        "lsgd": "lsgd-fp32",
        "overlapped dppf (launch + finish)": "overlapped-dppf-fp32",
    }
    for bench_name, our_name in names.items():
        got = bench["rounds"][bench_name]
        assert (got["ops"], got["host_reads"], got["buckets"]) == ours[our_name], (bench_name, got, ours[our_name])
        assert got["extra_memory"] >= 1.0, got  # at least the wire buffers


class _StepCounter:
    """A Trainer callback counting the ops and host reads of every optimizer step (from step begin to step end)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self
        self.steps: list[tuple[int, int]] = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer._ctx = counted()
                outer._counter = outer._ctx.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                outer._ctx.__exit__(None, None, None)
                outer.steps.append((outer._counter.ops, outer._counter.reads))

        self.callback = Callback()


def _trainer_steps(tmp: str, dppf: bool) -> list[tuple[int, int]]:
    from trainer_fixtures import make_args, tiny_bert, toy_data

    from hf_dppf import DPPFTrainer

    counter = _StepCounter()
    extra = dict(dppf=True, dppf_tau=100, dppf_strategy="lsgd") if dppf else {}
    args = make_args(tmp, max_steps=5, logging_steps=100, gradient_accumulation_steps=1, ddp_backend=None, **extra)
    trainer = DPPFTrainer(model=tiny_bert(seed=0), args=args, train_dataset=toy_data(), callbacks=[counter.callback])
    trainer.train()
    return counter.steps


def _accelerate_steps(dppf: bool) -> list[tuple[int, int]]:
    from accelerate import Accelerator

    from hf_dppf import DPPF

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    block = (
        DPPF(accelerator, model, optimizer, DPPFConfig(tau=100, strategy="lsgd")) if dppf else contextlib.nullcontext()
    )
    steps = []
    with block as d:
        for _ in range(5):
            x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
            with counted() as c:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if dppf:
                    d.observe(loss=loss)
                optimizer.step()
                optimizer.zero_grad()
                if dppf:
                    d.step()
            steps.append((c.ops, c.reads))
    return steps


def _integration_steps(rank: int, world_size: int, tmp: str) -> dict:
    import os

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # a plain single-process run: no process group, no DDP wrapper
    return {
        "trainer": (_trainer_steps(tmp + "/a", dppf=False), _trainer_steps(tmp + "/b", dppf=True)),
        "accelerate": (_accelerate_steps(dppf=False), _accelerate_steps(dppf=True)),
    }


def test_a_step_between_rounds_costs_the_integrations_at_most_5_ops_and_no_host_read(tmp_path) -> None:
    """The same training step with and without DPPF (lsgd: the loss is fed every step), one process, no round due."""
    (r,) = run_distributed(_integration_steps, 1, str(tmp_path), init=False)  # no process group: no DDP either
    for name, (stock, dppf) in r.items():
        for i, ((ops0, reads0), (ops1, reads1)) in enumerate(zip(stock[1:], dppf[1:]), start=2):  # step 1 warms up
            assert 0 <= ops1 - ops0 <= 5, (name, i, stock, dppf)
            assert reads1 == reads0, (name, i, stock, dppf)
