"""
Overlapped (delayed) rounds: the engine against the delayed oracle `simulate_delayed_round`, byte for byte against a
blocking round, and the integrations (Accelerate context manager, Trainer checkpoint/resume) with a round in flight.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import count_collectives, gather_workers, run_distributed
from test_engine import OddModel, drift, trainable
from test_trainer import RESUME, _resume, collected

from hf_dppf import DPPF, DPPFConfig, DPPFConsensus
from hf_dppf.simulate import simulate_delayed_round, simulate_round

PUSH_SCALE = 0.7


def local_step(tensors: list[torch.Tensor], rank: int, step: int) -> None:
    """A deterministic "optimizer step" of worker `rank`: every worker drifts its own way (in place, float32)."""
    drift(tensors, rank, step, scale=0.05)


def _trajectory(rank: int, world_size: int, config: DPPFConfig, steps: int) -> dict:
    """
    Run `steps` engine steps with deterministic local steps in between; replay all M workers in-process with the
    oracle (blocking rounds through `simulate_round`, overlapped ones through `simulate_delayed_round`) and return the
    worst difference, the bytes each round sent (engine counter and profiler) and the steps at which rounds landed.
    """
    model = OddModel()
    model.randomise(seed=100 + rank)
    engine = DPPFConsensus(model, config)
    live = [p for p in model.parameters() if p.requires_grad]
    params = gather_workers(trainable(model), world_size)  # the oracle's copy of every worker
    buffers = gather_workers([model.bn.running_mean.clone(), model.bn.running_var.clone()], world_size)
    avg = DPPFConfig(strategy="avg", tau=config.tau, overlap_steps=config.overlap_steps)
    blocking = None
    if config.overlap_steps == 0:  # the same run with explicit blocking rounds: must be bit-identical
        blocking = OddModel()
        blocking.randomise(seed=100 + rank)
        blocking_engine = DPPFConsensus(blocking, config)
    pending, landed, worst, bit_identical = None, [], 0.0, True
    bytes_before = engine.stats.bytes_communicated
    with count_collectives() as log:
        for step in range(1, steps + 1):
            local_step(live + [model.bn.running_mean], rank, step)
            for i in range(world_size):
                local_step(params[i] + [buffers[i][0]], i, step)
            if engine.step(PUSH_SCALE):
                landed.append(step)
            if pending is not None and step == pending[0]:
                params = simulate_delayed_round(pending[1], params, config, PUSH_SCALE)
                buffers = simulate_delayed_round(pending[2], buffers, avg)
                pending = None
            if config.round_due(step):
                if config.overlapped(step):
                    clone = [[t.clone() for t in w] for w in params]
                    pending = (step + config.overlap_steps, clone, [[t.clone() for t in w] for w in buffers])
                else:
                    params = simulate_round(params, config, PUSH_SCALE)
                    mean = [torch.stack(ts).double().mean(0).float() for ts in zip(*buffers)]
                    buffers = [[t.clone() for t in mean] for _ in range(world_size)]
            got = trainable(model) + [model.bn.running_mean.clone(), model.bn.running_var.clone()]
            want = params[rank] + buffers[rank]
            worst = max(worst, max((g - w).abs().max().item() for g, w in zip(got, want)))
            if blocking is not None:
                local_step(
                    [p for p in blocking.parameters() if p.requires_grad] + [blocking.bn.running_mean], rank, step
                )
                if config.round_due(step):
                    blocking_engine.round(PUSH_SCALE)
                bit_identical = bit_identical and all(
                    torch.equal(a, b) for a, b in zip(model.state_dict().values(), blocking.state_dict().values())
                )
    floats = sum(p.numel() for p in live) + 2 * 9
    return {
        "worst": worst,
        "landed": landed,
        "rounds": engine.stats.rounds,
        "in_flight": engine.in_flight,
        "per_round": 4 * floats + 16,  # parameters + buffers in fp32 + the two fp64 distance statistics
        "engine_bytes": engine.stats.bytes_communicated - bytes_before,
        # the explicit blocking run (overlap 0) communicates inside the profiler's window too
        "profiler": (log.bytes / (1 if blocking is None else 2), log.count, len(engine._buckets)),
        "bit_identical": bit_identical,
        "distance_after": engine.stats.mean_distance,
    }


@pytest.mark.parametrize("overlap", [0, 1, 3])
def test_delayed_rounds_match_the_oracle(overlap: int) -> None:
    # warmup: 2 blocking rounds, then rounds due after steps 6 and 10 (tau 4), each landing `overlap` steps later
    config = DPPFConfig(tau=4, warmup_steps=2, overlap_steps=overlap, alpha=0.5, lam=0.3, bucket_mb=0.5)
    steps = 13  # the last round (due after step 10) lands by step 13 for every delay
    for r in run_distributed(_trajectory, 2, config, steps):
        assert r["worst"] <= 1e-6, r
        assert r["landed"] == [1, 2, 6 + overlap, 10 + overlap], r["landed"]
        assert r["rounds"] == 4 and not r["in_flight"]
        # the same bytes as blocking rounds, and nothing else was sent during the overlapped steps
        assert r["engine_bytes"] == 4 * r["per_round"]
        sent, calls, buckets = r["profiler"]
        engines = 2 if overlap == 0 else 1
        assert sent == 4 * r["per_round"] and calls == engines * 4 * (buckets + 1), r["profiler"]
        if overlap == 0:
            assert r["bit_identical"], "overlap_steps=0 must be today's blocking round, bit for bit"


def _no_training_in_between(rank: int, world_size: int, comm_dtype: str) -> tuple[float, float]:
    """With nothing learnt between launch and landing, an overlapped round is the blocking round."""
    model = OddModel()
    model.randomise(seed=7 + rank)
    # alpha != 0.5 and a push far above bf16's rounding (r is about 390 here: 0.13 per unit of d_i)
    config = DPPFConfig(tau=2, overlap_steps=1, alpha=0.3, lam=50.0, comm_dtype=comm_dtype)
    wire = torch.bfloat16 if comm_dtype == "bf16" else None
    expected = simulate_round(gather_workers(trainable(model), world_size), config, wire_dtype=wire)[rank]
    engine = DPPFConsensus(model, config)
    engine.launch()
    engine.finish()
    worst = max((g - e).abs().max().item() for g, e in zip(trainable(model), expected))
    return worst, engine.stats.bytes_communicated


def test_launch_then_finish_is_the_blocking_round_and_bf16_halves_the_bytes() -> None:
    (fp32, sent32), _ = run_distributed(_no_training_in_between, 2, "fp32")
    assert fp32 <= 1e-6
    (bf16, sent16), _ = run_distributed(_no_training_in_between, 2, "bf16")
    assert bf16 <= 1e-5, bf16  # against the oracle that rounds the average as the bf16 wire does
    floats = sum(p.numel() for p in OddModel().parameters() if p.requires_grad) + 2 * 9
    assert sent32 - sent16 == 2 * floats, "bf16 carries 2 bytes per element instead of 4"


def _consistent_weights_first(rank: int, world_size: int) -> dict:
    """averaged(), state_dict() and a NaN snapshot while a round is in flight."""
    model = OddModel()
    model.randomise(seed=rank)
    config = DPPFConfig(tau=3, overlap_steps=2, strategy="avg")
    engine = DPPFConsensus(model, config)
    live = [p for p in model.parameters() if p.requires_grad]
    snapshots = gather_workers(trainable(model), world_size)
    engine.launch()
    local_step(live, rank, 1)
    with pytest.raises(RuntimeError, match=r"in flight .* call finish\(\)"):
        engine.state_dict()
    currents = gather_workers(trainable(model), world_size)
    landed = simulate_delayed_round(snapshots, currents, config)
    mean = [torch.stack(ts).double().mean(0) for ts in zip(*landed)]
    with engine.averaged():  # lands the round first, then averages
        in_average = max((g - e).abs().max().item() for g, e in zip(trainable(model), mean))
    after = max((g - e).abs().max().item() for g, e in zip(trainable(model), landed[rank]))
    state = engine.state_dict()
    # a NaN snapshot on rank 1: the round is dropped and a blocking round re-seeds rank 1 from rank 0
    if rank == 1:
        with torch.no_grad():
            model.big[3, 4] = math.nan
    engine.launch()
    local_step(live, rank, 2)
    engine.finish()
    return {
        "in_average": in_average,
        "after": after,
        "rounds": state["stats"]["rounds"],
        "weights": [t.numpy() for t in trainable(model)],  # tensors would travel by shared memory
        "reseeded": (engine.stats.reseeded_workers, engine.last_reseeded),
    }


def test_finish_before_averaged_and_state_dict_and_nan_snapshot() -> None:
    a, b = run_distributed(_consistent_weights_first, 2)
    for r in (a, b):
        assert r["in_average"] <= 1e-6 and r["after"] <= 1e-6 and r["rounds"] == 1, r
    assert all(np.array_equal(x, y) for x, y in zip(a["weights"], b["weights"])), "rank 1 takes the healthy average"
    assert all(np.isfinite(x).all() for x in b["weights"])
    assert a["reseeded"] == (1, False) and b["reseeded"] == (1, True)


def _accelerate_loop(rank: int, world_size: int) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(50 + rank)
    config = DPPFConfig(tau=3, overlap_steps=2, alpha=0.5, lam=0.01)
    ran = []
    with DPPF(accelerator, model, optimizer, config) as dppf:
        for _ in range(7):  # rounds launched after steps 3 and 6, landing after 5 and (at exit) 8
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
            accelerator.backward(F.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            ran.append(dppf.step())
        in_flight = dppf.engine.in_flight
        rounds_before_exit = dppf.stats.rounds
    return {
        "ran": ran,
        "in_flight": in_flight,
        "rounds": (rounds_before_exit, dppf.stats.rounds),
        "weights": [p.detach().clone().numpy() for p in model.parameters()],
    }


def test_accelerate_context_manager_lands_rounds_and_averages_at_exit() -> None:
    a, b = run_distributed(_accelerate_loop, 2, init=False)
    for r in (a, b):
        assert r["ran"] == [False, False, False, False, True, False, False]
        assert r["in_flight"] and r["rounds"] == (1, 3), r  # exit: the in-flight round lands, then the average
    assert all(np.array_equal(x, y) for x, y in zip(a["weights"], b["weights"]))


def test_trainer_resume_is_exact_with_a_round_in_flight_at_the_save(tmp_path) -> None:
    # tau 3, overlap 2: the round launched after step 3 is in flight at the save after step 4 (it lands there) and
    # the one launched after step 6 lands after step 8
    overrides = {"dppf_overlap_steps": 2}
    assert RESUME["dppf_tau"] == 3 and RESUME["save_steps"] == 4
    for out in run_distributed(collected, 2, _resume, str(tmp_path), overrides, init=False):
        assert out["weights"] and out["optimizer"] and out["final"]
        straight, resumed = out["engine"]
        assert straight["rounds"] == resumed["rounds"] == 2 and straight["steps"] == resumed["steps"] == 8
        assert out["losses"][0] == out["losses"][1] and sorted(out["losses"][0]) == [5, 6, 7, 8]
