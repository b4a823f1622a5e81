"""
The baseline strategies (easgd, lsgd, grawa) in the distributed engine against the in-process oracle, their closed
forms, exact byte counts, easgd's checkpointed centre, and the integrations feeding lsgd's loss and grawa's gradient
norm.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import count_collectives, gather_workers, run_distributed
from safetensors.torch import load_file, save_file
from test_engine import OddModel, trainable

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.simulate import simulate_consensus, simulate_round
from hf_dppf.strategies import STRATEGIES, grawa_weight, leader_rank

# Bytes a round sends on top of the parameters, buffers and the 16-byte distance statistics (M workers).
EXTRA_BYTES = {"easgd": lambda m: 0, "lsgd": lambda m: 8 * m, "grawa": lambda m: 8}
EXTRA_CALLS = {"easgd": 0, "lsgd": 1, "grawa": 1}


def fed_values(rank: int, world_size: int, k: int) -> list[tuple[float, float]]:
    """What worker `rank` feeds `observe()` before round `k`: three (loss, grad_norm) pairs, a function of (rank, k)."""
    if k == 1:  # a tie: every rank but 0 has the lowest loss, so the lowest of them (rank 1) leads
        return [(2.0 if rank == 0 else 1.0, 1.0 + rank)] * 3
    g = torch.Generator().manual_seed(10 * k + rank)
    return [(0.5 + torch.rand((), generator=g).item(), 0.1 + 3 * torch.rand((), generator=g).item()) for _ in range(3)]


def fed_means(world_size: int, k: int) -> tuple[list[float], list[float]]:
    """Every worker's mean loss and gradient norm before round `k` (what the oracle is given)."""
    means = [[sum(v) / len(v) for v in zip(*fed_values(r, world_size, k))] for r in range(world_size)]
    return [m[0] for m in means], [m[1] for m in means]


def _oracle_rounds(rank: int, world_size: int, config: DPPFConfig, rounds: int) -> dict:
    model = OddModel()
    model.randomise(seed=100 + rank)
    engine = DPPFConsensus(model, config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    centre = None  # the oracle's easgd centre variable, carried from round to round
    worst = 0.0
    for k in range(rounds):
        with torch.no_grad():  # a "local phase": every worker drifts its own way
            g = torch.Generator().manual_seed(1000 * k + rank)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        for loss, grad_norm in fed_values(rank, world_size, k):
            engine.observe(loss=torch.tensor(loss), grad_norm=grad_norm)
        losses, grad_norms = fed_means(world_size, k)
        workers = gather_workers(trainable(model), world_size)
        buffers = gather_workers([model.bn.running_mean.clone(), model.bn.running_var.clone()], world_size)
        expected = simulate_consensus(workers, config, losses=losses, grad_norms=grad_norms, centre=centre)
        centre = expected.centre
        bytes_before = engine.stats.bytes_communicated
        with count_collectives() as log:
            stats = engine.round()
        got = trainable(model)
        worst = max(worst, max((g_ - e).abs().max().item() for g_, e in zip(got, expected.workers[rank])))
        for b, name in enumerate(("running_mean", "running_var")):  # buffers: the plain average, every strategy
            mean = torch.stack([w[b] for w in buffers]).mean(0)
            assert torch.allclose(getattr(model.bn, name), mean, atol=1e-6), name
        if expected.centre is not None:
            saved = engine.state_dict()["centre"]
            assert list(saved) == names
            worst = max(worst, max((saved[n] - z).abs().max().item() for n, z in zip(names, expected.centre)))
        assert stats.leader == expected.leader
        floats = sum(p.numel() for p in model.parameters() if p.requires_grad) + 2 * 9
        sent = 4 * floats + 16 + EXTRA_BYTES[config.strategy](world_size)
        assert stats.bytes_communicated - bytes_before == sent
        assert log.bytes == sent and log.count == len(engine._buckets) + 1 + EXTRA_CALLS[config.strategy], log.calls
    return {"worst": worst, "buckets": len(engine._buckets), "rounds": engine.stats.rounds}


ORACLE_CONFIGS = {
    "easgd": DPPFConfig(strategy="easgd", alpha=0.3, beta=0.6, bucket_mb=0.5),
    "lsgd": DPPFConfig(strategy="lsgd", alpha=0.4, bucket_mb=0.01),
    "grawa": DPPFConfig(strategy="grawa", alpha=0.5, bucket_mb=0.5),
}


def _all_strategies(rank: int, world_size: int, rounds: int) -> dict[str, dict]:
    return {name: _oracle_rounds(rank, world_size, config, rounds) for name, config in ORACLE_CONFIGS.items()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda m: f"M{m}")
def oracle_runs(request) -> list[dict[str, dict]]:
    """One set of processes per world size runs every strategy (process start-up dominates on a loaded CPU)."""
    return run_distributed(_all_strategies, request.param, 3)


@pytest.mark.parametrize("strategy", list(ORACLE_CONFIGS))
def test_engine_matches_oracle(oracle_runs: list[dict[str, dict]], strategy: str) -> None:
    for r in (ranks[strategy] for ranks in oracle_runs):
        assert r["worst"] <= 1e-6, r
        assert r["buckets"] >= 3 and r["rounds"] == 3
