"""The Accelerate context manager: local steps really send nothing, and the round is the oracle's round."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dist_utils import count_collectives, gather_workers, run_distributed

from hf_dppf import DPPF, DPPFConfig
from hf_dppf.engine import FINGERPRINT_BYTES
from hf_dppf.simulate import simulate_round

TAU, ACCUM = 3, 2


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )


def micro_batches(rank: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(50 + rank)  # every worker reads its own data
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def reference_run(rank: int, steps: int) -> torch.nn.Module:
    """Single-process training on this worker's own micro-batches: what a local phase must reproduce."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(micro_batches(rank, steps * ACCUM)):
        (F.mse_loss(model(x), y) / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            opt.step()
            opt.zero_grad()
    return model


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _local_phase_and_round(rank: int, world_size: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel) and accelerator.num_processes == world_size
    cfg = DPPFConfig(tau=TAU, alpha=0.5, lam=0.05)
    batches = micro_batches(rank, TAU * ACCUM)

    def train(batch_slice: slice) -> list[bool]:
        ran = []
        for x, y in batches[batch_slice]:
            with accelerator.accumulate(model):
                accelerator.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            ran.append(dppf.step())
        return ran

    with DPPF(accelerator, model, optimizer, cfg) as dppf:
        with count_collectives() as local_log:
            ran = train(slice(0, (TAU - 1) * ACCUM))
        assert local_log.count == 0 and local_log.bytes == 0, f"local steps communicated: {local_log.calls}"
        assert not any(ran) and dppf.stats.steps == TAU - 1
        assert dppf.stats.bytes_communicated == FINGERPRINT_BYTES, "only the start-up check was sent"
        reference = reference_run(rank, TAU - 1)
        for got, want in zip(model.module.parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

        with count_collectives() as round_log:
            ran = train(slice((TAU - 1) * ACCUM, TAU * ACCUM))
        assert ran == [False, True] and dppf.stats.rounds == 1, "the round follows the tau-th optimizer step"
        assert round_log.bytes == dppf.stats.bytes_communicated - FINGERPRINT_BYTES, "every byte belongs to the round"
        expected = simulate_round(gather_workers(params(reference_run(rank, TAU)), world_size), cfg)[rank]
        for got, want in zip(model.module.parameters(), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        before_exit = params(model.module)
    # on exit every worker holds the average of the workers
    mean = [torch.stack(ts).mean(0) for ts in zip(*gather_workers(before_exit, world_size))]
    for got, want in zip(model.module.parameters(), mean):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    assert model.require_backward_grad_sync, "DDP's gradient sync is restored after the block"


@pytest.mark.parametrize("world_size", [2, 4])
def test_local_steps_send_nothing_and_round_matches_oracle(world_size: int) -> None:
    run_distributed(_local_phase_and_round, world_size, init=False)


def _accelerate_without_cpu_flag(rank: int, world_size: int) -> str:
    from accelerate import Accelerator

    os.environ.pop("ACCELERATE_USE_CPU")
    accelerator = Accelerator()  # on a CPU machine this reports ONE process while torch.distributed has two
    model = accelerator.prepare(make_model())
    with pytest.raises(RuntimeError, match="cpu=True") as err:
        with DPPF(accelerator, model, None, DPPFConfig()):
            pass
    return str(err.value)


def test_accelerate_without_cpu_is_refused() -> None:
    messages = run_distributed(_accelerate_without_cpu_flag, 2, init=False)
    assert all("reports 1 process(es) but torch.distributed has 2" in m for m in messages)


def _disabled(rank: int, world_size: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with DPPF(accelerator, model, optimizer, DPPFConfig(), enabled=False) as dppf:
        x, y = micro_batches(rank, 1)[0]
        with count_collectives() as log:
            accelerator.backward(F.mse_loss(model(x), y))
        assert not dppf.step() and dppf.stats.rounds == 0
    grad_bytes = 4 * sum(p.numel() for p in model.parameters())
    reduced = sum(b for name, b in log.calls if name == "gloo:all_reduce")
    broadcast = sum(b for name, b in log.calls if name == "gloo:broadcast")
    # the stock DDP step that DPPF switches off: the gradient all-reduce and the BatchNorm buffer broadcast
    assert reduced == grad_bytes and broadcast == 4 * 2 * 16 + 8, log.calls


def test_disabled_is_stock_ddp() -> None:
    run_distributed(_disabled, 2, init=False)


def test_steps_skipped_by_the_grad_scaler_do_not_count() -> None:
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ran = []
    with DPPF(None, model, optimizer, DPPFConfig(tau=2)) as dppf:
        for value in (1.0, float("inf"), 1.0, 1.0):  # the inf batch overflows: the scaler skips optimizer.step()
            scaler.scale(model(torch.full((2, 3), value)).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            ran.append(dppf.step())
    assert dppf.stats.steps == 3 and ran == [False, False, True, False]
