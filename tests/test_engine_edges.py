"""
The engine at its edges, against the oracle: identical workers (r <= eps: no push, nothing moves), a layer unfrozen
between rounds, `model.to()` between rounds (the layout is rebuilt), and `push_scale` scaling the push alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import gather_workers, run_distributed
from test_engine import OddModel, trainable

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.simulate import simulate_round


def _worst(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g.double() - w.double()).abs().max().item() for g, w in zip(got, want))


def _identical(rank: int, world_size: int) -> dict:
    model = OddModel()
    model.randomise(seed=5)  # the same weights on every rank
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for name, config in {"width": DPPFConfig(alpha=0.3, width=0.05), "lam": DPPFConfig(alpha=0.3, lam=1.0)}.items():
        stats = DPPFConsensus(model, config).round()
        out[name] = {
            "unchanged": all(torch.equal(v, before[k]) for k, v in model.state_dict().items()),
            "distances": (stats.distance_before, stats.mean_distance),
        }
    return out


def test_identical_workers_are_not_pushed() -> None:
    for r in run_distributed(_identical, 2):
        for name, got in r.items():
            assert got["unchanged"], f"{name}: r = 0 <= eps, so there is no direction to push in"
            assert got["distances"] == (0.0, 0.0), (name, got)


def _unfrozen_and_moved(rank: int, world_size: int) -> dict:
    model = OddModel()
    model.randomise(seed=40 + rank)
    config = DPPFConfig(alpha=0.4, lam=0.5, bucket_mb=0.5)
    engine = DPPFConsensus(model, config)
    frozen_before = model.frozen.detach().clone()
    out = {}
    engine.round(push_scale=0.5)
    out["frozen_kept"] = torch.equal(model.frozen, frozen_before)
    # a layer unfrozen mid-run joins the next round
    model.frozen.requires_grad_(True)
    workers = gather_workers(trainable(model), world_size)
    engine.round(push_scale=0.5)
    out["unfrozen"] = _worst(trainable(model), simulate_round(workers, config, push_scale=0.5)[rank])
    out["frozen_moved"] = not torch.equal(model.frozen, frozen_before)
    # model.to() mid-run: new storage and dtype, the layout is rebuilt
    buckets_before = engine._buckets
    model.to(torch.float64)
    workers = gather_workers(trainable(model), world_size)
    engine.round(push_scale=0.5)
    out["moved"] = _worst(trainable(model), simulate_round(workers, config, push_scale=0.5)[rank])
    out["rebuilt"] = engine._buckets is not buckets_before and all(
        b.comm.dtype == torch.float64 for b in engine._buckets
    )
    return out


def test_a_layer_unfrozen_and_a_model_moved_mid_run_join_the_next_round() -> None:
    for r in run_distributed(_unfrozen_and_moved, 2):
        assert r["frozen_kept"] and r["frozen_moved"], r
        assert r["unfrozen"] <= 1e-6 and r["moved"] <= 1e-12, r
        assert r["rebuilt"], r


def _push_scale(rank: int, world_size: int) -> dict:
    start = OddModel()
    start.randomise(seed=60 + rank)
    config = DPPFConfig(alpha=0.3, lam=20.0)
    results, lams = {}, {}
    for scale in (0.0, 1.0, 2.5):
        model = OddModel()
        model.load_state_dict(start.state_dict())
        stats = DPPFConsensus(model, config).round(push_scale=scale)
        results[scale], lams[scale] = trainable(model), stats.lam
    workers = gather_workers(trainable(start), world_size)
    pull_only = simulate_round(workers, DPPFConfig(alpha=0.3, lam=0.0))[rank]
    push = [a.double() - b.double() for a, b in zip(results[1.0], results[0.0])]
    return {
        "zero_is_pull_only": _worst(results[0.0], pull_only),
        "linear": _worst(
            [b.double() - a.double() for a, b in zip(results[0.0], results[2.5])], [2.5 * p for p in push]
        ),
        "push_size": math.sqrt(sum(float((p**2).sum()) for p in push)),
        "lams": lams,
    }


def test_push_scale_scales_the_push_and_nothing_else() -> None:
    for r in run_distributed(_push_scale, 2):
        assert r["zero_is_pull_only"] <= 1e-5, r  # the pull does not depend on the schedule
        assert r["linear"] <= 1e-4, r  # twice and a half the schedule: two and a half times the push
        assert r["push_size"] == pytest.approx(20.0, rel=1e-4), r  # a push moves a worker by lam along d_i / r_i
        assert r["lams"] == {0.0: 0.0, 1.0: 20.0, 2.5: 50.0}, r
