"""
Hierarchical DPPF in the engine, without DeepSpeed: 4 CPU processes (gloo) as 2 replicas x 2 processes that hold the
same weights. Each round must equal `simulate_round` applied to the replicas' weights (every strategy, a bf16 wire,
an overlapped round, `averaged()`, a re-seeded replica), leave the ranks of a replica bit for bit equal, and send
exactly 1/2 of the weights per process across replicas (every collective recorded with its group and its bytes).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import gather_workers, record_collective_groups, run_distributed
from test_engine import OddModel, trainable

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.integrations.common import ReplicaGroups
from hf_dppf.simulate import simulate_consensus, simulate_delayed_round

WORLD, G = 4, 2
PUSH_SCALE = 0.8
TOL = 1e-5
# (name, config, round kind); lam is far above the bf16 rounding, alpha != 0.5 so a swapped alpha shows
CASES = [
    ("dppf", DPPFConfig(tau=1000, alpha=0.3, lam=0.6, bucket_mb=0.5), "round"),
    ("dppf-bf16", DPPFConfig(tau=1000, alpha=0.3, lam=0.6, comm_dtype="bf16"), "round"),
    ("avg", DPPFConfig(tau=1000, strategy="avg"), "round"),
    ("easgd", DPPFConfig(tau=1000, strategy="easgd", alpha=0.4, beta=0.3), "round"),
    ("lsgd", DPPFConfig(tau=1000, strategy="lsgd", alpha=0.4), "round"),
    ("grawa", DPPFConfig(tau=1000, strategy="grawa", alpha=0.4), "round"),
    ("overlapped", DPPFConfig(tau=1000, alpha=0.3, lam=0.6, overlap_steps=1), "overlapped"),
]


def _replica_model(groups: ReplicaGroups, seed: int) -> OddModel:
    model = OddModel()
    model.randomise(seed=seed + groups.replica_index)  # the replicas start apart, a replica's ranks together
    return model


def _replicas(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every replica's tensors (from its first rank), after checking that the ranks of each replica agree."""
    everyone = gather_workers(tensors, WORLD)
    for r in range(WORLD):
        first = everyone[r - r % G]
        assert all(torch.equal(a, b) for a, b in zip(everyone[r], first)), f"rank {r} differs from its replica"
    return everyone[::G]


def _buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers() if b.is_floating_point()]


def _strategy_rounds(rank: int, world_size: int) -> dict[str, Any]:
    groups = ReplicaGroups.build(G)
    out: dict[str, Any] = {}
    for seed, (name, config, kind) in enumerate(CASES):
        model = _replica_model(groups, 10 * seed)
        engine = DPPFConsensus(model, config, process_group=groups.shard_group, replica_group=groups.replica_group)
        centre = None
        for k in range(2):  # two rounds: easgd's centre carries over
            # each rank of a replica feeds its own values: the replica's round uses their mean
            loss, grad_norm = 1.0 + 0.3 * ((rank * 7 + k) % 5), 0.5 + 0.2 * ((rank * 3 + k) % 4)
            engine.observe(loss=loss, grad_norm=grad_norm)
            fed = torch.tensor([loss, grad_norm], dtype=torch.float64)
            everyone = [torch.empty_like(fed) for _ in range(WORLD)]
            dist.all_gather(everyone, fed)
            means = [sum(everyone[j * G + s] for s in range(G)) / G for j in range(WORLD // G)]
            workers, buffers = _replicas(trainable(model)), _replicas(_buffers(model))
            wire = torch.bfloat16 if config.comm_dtype == "bf16" else None
            if kind == "overlapped":
                expected = simulate_delayed_round(workers, workers, config, PUSH_SCALE)[groups.replica_index]
            else:
                sim = simulate_consensus(
                    workers,
                    config,
                    PUSH_SCALE,
                    losses=[m[0].item() for m in means],
                    grad_norms=[m[1].item() for m in means],
                    centre=centre,
                    wire_dtype=wire,
                )
                expected, centre = sim.workers[groups.replica_index], sim.centre
            before = engine.stats.bytes_communicated - engine.stats.replica_bytes
            with record_collective_groups() as calls:
                if kind == "overlapped":
                    engine.launch(PUSH_SCALE)
                    engine.finish()
                else:
                    engine.round(PUSH_SCALE)
            got = _replicas(trainable(model))[groups.replica_index]
            worst = max((a.double() - e.double()).abs().max().item() for a, e in zip(got, expected))
            scale = 2e-3 if wire is not None else TOL
            assert worst < scale, (name, k, worst)
            average = [sum(b[j] for b in buffers) / len(buffers) for j in range(len(buffers[0]))]
            rtol = 2**-7 if wire is not None else 1e-6  # the buffers' sum travels in the wire dtype too
            assert all(torch.allclose(b, a, rtol=rtol, atol=1e-6) for b, a in zip(_buffers(model), average)), name
            shard_group = tuple(range(groups.shard_index, WORLD, G))
            replica = tuple(range(groups.replica_index * G, (groups.replica_index + 1) * G))
            assert {ranks for _, ranks in calls} <= {shard_group, replica}, calls
            across = calls.bytes_over(shard_group)
            assert across == engine.stats.bytes_communicated - engine.stats.replica_bytes - before, name
            out.setdefault(name, []).append(across)
        dist.barrier()
    out["numel"] = sum(t.numel() for t in trainable(model)) + sum(b.numel() for b in _buffers(model))
    return out


def test_replica_rounds_match_the_oracle_and_send_half_the_weights_across():
    results = run_distributed(_strategy_rounds, WORLD)
    numel = results[0]["numel"]
    for name, config, _ in CASES:
        wire = 2 if config.comm_dtype == "bf16" else 4
        for rank in range(WORLD):
            for across in results[rank][name]:
                # half of the (padded) weights on the wire, plus a few statistics (distances, lsgd/grawa values)
                assert wire * numel / G <= across <= wire * (numel / G + G * 8) + 64, (name, rank, across)
    # a flat engine sends the whole model: the replica's processes together send it once
    assert results[0]["dppf"][0] < 4 * numel * 0.51 + 64


def _averaged_and_reseed(rank: int, world_size: int) -> dict[str, Any]:
    groups = ReplicaGroups.build(G)
    config = DPPFConfig(tau=1000, alpha=0.3, lam=0.6)
    model = _replica_model(groups, 3)
    engine = DPPFConsensus(model, config, process_group=groups.shard_group, replica_group=groups.replica_group)
    own = trainable(model)
    workers = _replicas(own)
    average = [sum(w[j] for w in workers) / len(workers) for j in range(len(own))]
    with engine.averaged():
        inside = _replicas(trainable(model))[0]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(inside, average))
    assert all(torch.equal(a, b) for a, b in zip(trainable(model), own)), "averaged() did not restore the weights"
    # a NaN in replica 1 (both of its ranks, as they hold the same weights): it takes replica 0's weights
    if groups.replica_index == 1:
        with torch.no_grad():
            model.big[3, 4] = math.nan
    reseeded = engine.ensure_finite()
    after = _replicas(trainable(model))
    assert all(torch.equal(a, b) for a, b in zip(after[0], after[1]))
    assert all(torch.equal(a, b) for a, b in zip(after[0], workers[0]))
    return {"reseeded": reseeded}


def test_replica_averaged_and_reseed():
    results = run_distributed(_averaged_and_reseed, WORLD)
    assert [r["reseeded"] for r in results] == [False, False, True, True]


def _refusals(rank: int, world_size: int) -> None:
    groups = ReplicaGroups.build(G)
    model = OddModel()
    with pytest.raises(ValueError, match="process_group"):
        DPPFConsensus(model, DPPFConfig(), replica_group=groups.replica_group)
    with pytest.raises(ValueError, match="push_mode='step'"):
        DPPFConsensus(
            model, DPPFConfig(push_mode="step"), process_group=groups.shard_group, replica_group=groups.replica_group
        )
    with pytest.raises(ValueError, match="not both"):
        DPPFConsensus(
            model,
            DPPFConfig(),
            process_group=groups.shard_group,
            norm_group=groups.replica_group,
            replica_group=groups.replica_group,
        )
    with pytest.raises(ValueError, match=r"must divide the number of processes \(valid: \[1, 2, 4\]\)"):
        ReplicaGroups.build(3)


def test_replica_refusals():
    run_distributed(_refusals, WORLD)
