"""The distributed engine against the in-process oracle, the closed form of the pull-push, and exact byte counts."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import count_collectives, gather_workers, run_distributed

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.engine import FINGERPRINT_BYTES
from hf_dppf.simulate import distances_to_average, simulate_round


class OddModel(torch.nn.Module):
    """Many tensors of odd shapes: one larger than a norm chunk, a non-contiguous one, a frozen one, BN buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.Parameter(torch.randn(601, 500))  # 300,500 elements: spans two 2^18 chunks
        self.lin = torch.nn.Linear(13, 7)
        self.conv = torch.nn.Conv2d(3, 5, kernel_size=3)
        self.vec = torch.nn.Parameter(torch.randn(1))
        self.scalar = torch.nn.Parameter(torch.randn(()))
        self.transposed = torch.nn.Parameter(torch.randn(11, 6).t())  # non-contiguous
        self.frozen = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.bn = torch.nn.BatchNorm1d(9)

    def randomise(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.bn.running_mean.copy_(torch.randn(9, generator=g))
            self.bn.running_var.copy_(torch.rand(9, generator=g) + 0.5)
            self.bn.num_batches_tracked.fill_(seed)


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def drift(tensors: list[torch.Tensor], rank: int, step: int, scale: float = 0.1) -> None:
    """A deterministic "local phase" of worker `rank`: every worker drifts its own way (in place)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    with torch.no_grad():
        for t in tensors:
            t.add_(scale * torch.randn(t.shape, generator=g))


def _oracle_rounds(rank: int, world_size: int, config: DPPFConfig, rounds: int) -> dict:
    model = OddModel()
    model.randomise(seed=100 + rank)
    frozen_before = model.frozen.detach().clone()
    int_buffer_before = model.bn.num_batches_tracked.clone()
    engine = DPPFConsensus(model, config)
    worst, buckets = 0.0, 0
    for k in range(rounds):
        drift([p for p in model.parameters() if p.requires_grad], rank, k)
        workers = gather_workers(trainable(model), world_size)
        buffers = gather_workers([model.bn.running_mean.clone(), model.bn.running_var.clone()], world_size)
        expected = simulate_round(workers, config, push_scale=0.7)[rank]
        expected_dist = sum(distances_to_average(workers)) / world_size
        bytes_before = engine.stats.bytes_communicated
        with count_collectives() as log:
            stats = engine.round(push_scale=0.7)
        buckets = len(engine._buckets)
        got = trainable(model)
        worst = max(worst, max((g_ - e).abs().max().item() for g_, e in zip(got, expected)))
        for b, name in zip(range(2), ("running_mean", "running_var")):
            mean = torch.stack([w[b] for w in buffers]).mean(0)
            assert torch.allclose(getattr(model.bn, name), mean, atol=1e-6), name
        assert math.isclose(stats.distance_before, expected_dist, rel_tol=1e-5), (stats.distance_before, expected_dist)
        floats = sum(p.numel() for p in model.parameters() if p.requires_grad) + 2 * 9
        assert stats.bytes_communicated - bytes_before == 4 * floats + 16  # parameters + buffers + 2 fp64 stats
        assert log.bytes == 4 * floats + 16 and log.count == buckets + 1, log.calls
    assert torch.equal(model.frozen, frozen_before), "frozen parameters must not move"
    assert torch.equal(model.bn.num_batches_tracked, int_buffer_before), "integer buffers are not averaged"
    return {"worst": worst, "buckets": buckets, "rounds": engine.stats.rounds}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "config",
    [
        DPPFConfig(alpha=0.5, lam=0.3, bucket_mb=0.5),
        DPPFConfig(alpha=0.3, width=0.02, bucket_mb=0.01),
        DPPFConfig(strategy="avg", bucket_mb=0.5),
    ],
    ids=["dppf-lam", "dppf-width", "avg"],
)
def test_engine_matches_oracle(world_size: int, config: DPPFConfig) -> None:
    results = run_distributed(_oracle_rounds, world_size, config, 3)
    for r in results:
        assert r["worst"] <= 1e-6, r
        assert r["buckets"] >= 3 and r["rounds"] == 3


def _stabilisation(rank: int, world_size: int, alpha: float, lam: float, rounds: int) -> list[float]:
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(37, 3) * 2), torch.nn.Parameter(torch.randn(5))]
    engine = DPPFConsensus(params, DPPFConfig(alpha=alpha, lam=lam, lam_schedule="constant"))
    distances = []
    for _ in range(rounds):  # zero learning rate: nothing moves the workers but the rounds
        stats = engine.round()
        distances.append((stats.distance_before, stats.mean_distance))
    return distances


def test_self_stabilisation_closed_form() -> None:
    alpha, lam, rounds = 0.3, 0.25, 60
    a, b = run_distributed(_stabilisation, 2, alpha, lam, rounds)
    assert a == b, "with M = 2 both workers are at the same distance"
    r = a[0][0]
    for k, (before, after) in enumerate(a):
        closed = (1 - alpha) ** (k + 1) * a[0][0] + lam * (1 - (1 - alpha) ** (k + 1)) / alpha
        assert math.isclose(before, r, rel_tol=1e-5), (k, before, r)
        assert math.isclose(after, closed, rel_tol=1e-5), (k, after, closed)
        r = (1 - alpha) * r + lam
    assert math.isclose(a[-1][1], lam / alpha, rel_tol=1e-4), "the distance settles at the valley width lam/alpha"


def _width_mode(rank: int, world_size: int) -> tuple[float, float, float]:
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(50, 20))]
    engine = DPPFConsensus(params, DPPFConfig(alpha=0.5, width=0.05))
    for _ in range(40):
        stats = engine.round()
    return stats.mean_distance, stats.average_norm, stats.lam


def test_width_sets_valley_relative_to_average_norm() -> None:
    (dist0, norm0, lam0), (dist1, *_) = run_distributed(_width_mode, 2)
    assert math.isclose(dist0, 0.05 * norm0, rel_tol=1e-4)
    assert math.isclose(lam0, 0.5 * 0.05 * norm0, rel_tol=1e-6)
    assert math.isclose(dist0, dist1, rel_tol=1e-6)


def _steps_and_resume(rank: int, world_size: int) -> tuple[list[int], list[int]]:
    params = [torch.nn.Parameter(torch.full((3,), float(rank)))]
    cfg = DPPFConfig(tau=3, warmup_steps=2, strategy="avg")
    engine = DPPFConsensus(params, cfg)
    ran = [s for s in range(1, 12) if engine.step()]
    # a restarted engine that loads the state continues the same schedule
    first = DPPFConsensus(params, cfg)
    ran_first = [s for s in range(1, 6) if first.step()]
    resumed = DPPFConsensus(params, cfg)
    resumed.load_state_dict(first.state_dict())
    ran_resumed = [s for s in range(6, 12) if resumed.step()]
    assert resumed.stats.steps == 11
    return ran, ran_first + ran_resumed


def test_schedule_warmup_tau_and_state_dict() -> None:
    for ran, ran_resumed in run_distributed(_steps_and_resume, 2):
        assert ran == [1, 2, 5, 8, 11]
        assert ran_resumed == ran


def _averaged_context(rank: int, world_size: int) -> None:
    model = OddModel()
    model.randomise(seed=rank)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    workers = gather_workers(trainable(model), world_size)
    mean = [torch.stack(ts).mean(0) for ts in zip(*workers)]
    engine = DPPFConsensus(model, DPPFConfig())
    with engine.averaged():
        for got, want in zip(trainable(model), mean):
            assert torch.allclose(got, want, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), f"{k} was not restored exactly"


def test_averaged_context_restores_each_worker() -> None:
    run_distributed(_averaged_context, 2)


def test_single_process_is_plain_local_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = OddModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = DPPFConsensus(model, DPPFConfig(tau=1, lam=1.0))
    assert engine.step() and engine.stats.rounds == 1
    assert engine.stats.bytes_communicated == 0 and engine.stats.mean_distance == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_world_size_without_process_group_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="cpu=True"):
        DPPFConsensus(torch.nn.Linear(2, 2), DPPFConfig())


def _half_precision_wire(rank: int, world_size: int, comm_dtype: str) -> dict:
    model = OddModel()
    model.randomise(seed=7 + rank)
    wire = {"bf16": torch.bfloat16, "fp16": torch.float16}[comm_dtype]
    # alpha != 0.5 and a push far above the wire's rounding (r is about 390 here: 0.13 per unit of d_i)
    config = DPPFConfig(alpha=0.3, lam=50.0, comm_dtype=comm_dtype, lam_schedule="constant")
    workers = gather_workers(trainable(model), world_size)
    stats = DPPFConsensus(model, config).round()
    got = trainable(model)

    def error(cfg: DPPFConfig, wire_dtype: torch.dtype | None = wire) -> float:
        expected = simulate_round(workers, cfg, wire_dtype=wire_dtype)[rank]
        return max((g - e).abs().max().item() for g, e in zip(got, expected))

    floats = sum(p.numel() for p in model.parameters() if p.requires_grad) + 2 * 9
    return {
        "error": error(config),
        "unrounded_oracle": error(config, None),
        "no_push": error(DPPFConfig(alpha=0.3, lam=0.0, comm_dtype=comm_dtype)),
        "swapped_alpha": error(DPPFConfig(alpha=0.7, lam=50.0, comm_dtype=comm_dtype)),
        "sent": stats.bytes_communicated,
        "floats": floats,
    }


@pytest.mark.parametrize("comm_dtype", ["bf16", "fp16"])
def test_half_precision_wire_matches_the_oracle_with_the_same_rounding(comm_dtype: str) -> None:
    for r in run_distributed(_half_precision_wire, 2, comm_dtype):
        # 2 bytes per element on the wire (+ the fp64 statistics and the start-up fingerprint)
        assert r["sent"] == 2 * r["floats"] + 16 + FINGERPRINT_BYTES
        # the oracle rounding the average as the wire does: float32 arithmetic apart, the same round
        assert r["error"] <= 1e-5, r
        assert r["unrounded_oracle"] > 10 * r["error"], "the wire's rounding is visible (else this test proves little)"
        # a missing push or a swapped alpha would be caught by far
        assert r["no_push"] > 0.05 and r["swapped_alpha"] > 0.05, r


def _fp16_overflow(rank: int, world_size: int) -> dict:
    model = OddModel()
    model.randomise(seed=rank)
    with torch.no_grad():
        model.big[0, 0] = 70000.0  # finite in fp32, beyond fp16's 65504: inf on an fp16 wire
    own = [t.clone() for t in trainable(model)]
    engine = DPPFConsensus(model, DPPFConfig(comm_dtype="fp16"))
    try:
        engine.round()
    except RuntimeError as err:
        return {"message": str(err), "untouched": all(torch.equal(a, b) for a, b in zip(own, trainable(model)))}
    return {"message": None}


def test_fp16_wire_overflow_stops_every_rank_naming_the_wire() -> None:
    for r in run_distributed(_fp16_overflow, 2):
        assert r["message"] is not None and "overflow on the wire" in r["message"], r
        assert "comm_dtype='fp16'" in r["message"] and r["untouched"]
