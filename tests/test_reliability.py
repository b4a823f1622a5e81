"""
Failure behaviour of the engine: mismatched ranks, non-finite workers and dead or stuck peers fail loudly (or are
repaired), the same way on every rank, instead of hanging or averaging garbage.

Oracles: `simulate_round` over the healthy workers, explicit averages, the engine's byte counts, wall-clock bounds.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from dist_utils import gather_workers, run_distributed
from test_engine import OddModel, trainable

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.consensus import FINGERPRINT_BYTES
from hf_dppf.simulate import distances_to_average, simulate_round

BAD = 2  # the rank whose weights go bad in the non-finite tests


def _error(fn) -> str:
    """The message of the `RuntimeError` that `fn()` must raise."""
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


# ---------------------------------------------------------------------------------------------------- mismatched ranks


def _mismatches(rank: int, world_size: int) -> dict[str, str]:
    messages = {}
    model = OddModel()
    if rank == 1:
        model.lin = torch.nn.Linear(13, 8)  # a different head on one rank
    messages["shape"] = _error(lambda: DPPFConsensus(model, DPPFConfig()))
    messages["config"] = _error(lambda: DPPFConsensus(OddModel(), DPPFConfig(tau=4 + rank)))
    engine = DPPFConsensus(OddModel(), DPPFConfig())  # agrees: no error
    state = engine.state_dict()
    state["stats"]["steps"] = 8 if rank == 0 else 6  # e.g. the ranks resumed from different checkpoints
    engine.load_state_dict(state)
    messages["steps"] = _error(engine.verify_ranks)
    messages["bytes"] = engine.stats.bytes_communicated
    return messages


def test_mismatched_ranks_fail_on_every_rank_naming_the_difference() -> None:
    for messages in run_distributed(_mismatches, 2):
        assert (
            "tensor 'lin.weight' is [7, 13] torch.float32 on rank 0 but rank 1 has 'lin.weight' [8, 13]"
            in (messages["shape"])
        )
        assert (
            "rank 1's DPPFConfig differs from rank 0's" in messages["config"]
            and "'tau': (4, 5)" in (messages["config"])
        )
        assert "rank 0 has counted 8 optimizer steps, rank 1 6" in messages["steps"]
        assert messages["bytes"] == 2 * FINGERPRINT_BYTES, "construction and the check after loading: 16 bytes each"


# ---------------------------------------------------------------------------------------------------- non-finite


def _poisoned_model(rank: int, what: str) -> OddModel:
    model = OddModel()
    model.randomise(seed=10 + rank)
    with torch.no_grad():
        if rank == BAD and what == "param":
            model.big[3, 4] = float("nan")
        if rank == BAD and what == "buffer":
            model.bn.running_var[1] = float("inf")
    return model


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a round touches: trainable parameters, then floating buffers."""
    return trainable(model) + [b.detach().clone() for b in model.buffers() if b.is_floating_point()]


def _healthy_mean(workers: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    healthy = [w for i, w in enumerate(workers) if i != BAD]
    return [torch.stack(ts).double().mean(0).float() for ts in zip(*healthy)]


def _nonfinite_rounds(rank: int, world_size: int) -> dict:
    out: dict = {}
    n_params = len(trainable(OddModel()))
    config = DPPFConfig(alpha=0.5, lam=0.3)

    # a NaN in a weight: healthy workers do the round among themselves, the bad one takes their average
    model = _poisoned_model(rank, "param")
    before = gather_workers(_state(model), world_size)
    engine = DPPFConsensus(model, config)
    bytes_before = engine.stats.bytes_communicated
    stats = engine.round()
    healthy = [w[:n_params] for i, w in enumerate(before) if i != BAD]
    expected = simulate_round(healthy, config)[rank - (rank > BAD)] if rank != BAD else _healthy_mean(before)
    if rank != BAD:
        expected = expected + _healthy_mean(before)[n_params:]  # buffers: the healthy workers' average
    out["round_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), expected))
    out["round_bytes"] = stats.bytes_communicated - bytes_before
    out["param_bytes"] = sum(t.numel() * 4 for t in _state(model))
    out["reseeded"], out["count"] = engine.last_reseeded, stats.reseeded_workers
    out["distance_before"] = (stats.distance_before, sum(distances_to_average(healthy)) / len(healthy))

    # an Inf in a BatchNorm buffer is caught too
    model = _poisoned_model(rank, "buffer")
    before = gather_workers(_state(model), world_size)
    DPPFConsensus(model, DPPFConfig(strategy="avg")).round()
    out["buffer_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), _healthy_mean(before)))

    # averaged(): the healthy average inside the block, every worker's own weights (NaN included) after it
    model = _poisoned_model(rank, "param")
    own = _state(model)
    before = gather_workers(own, world_size)
    engine = DPPFConsensus(model, config)
    with engine.averaged():
        out["averaged_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), _healthy_mean(before)))
    out["restored"] = all(torch.equal(g, e) for g, e in zip(_state(model), own) if not torch.isnan(e).any())
    out["still_nan"] = bool(torch.isnan(model.big).any())

    # ensure_finite(): only the bad worker moves, to the healthy average
    out["ensure_returned"] = engine.ensure_finite()
    expected = _healthy_mean(before) if rank == BAD else own
    out["ensure_error"] = max((g - e).abs().max().item() for g, e in zip(_state(model), expected))
    out["ensure_again"] = engine.ensure_finite()  # all finite now: nothing to do

    # nonfinite_policy="raise": every rank stops, nobody moves
    model = _poisoned_model(rank, "param")
    own = _state(model)
    engine = DPPFConsensus(model, DPPFConfig(alpha=0.5, lam=0.3, nonfinite_policy="raise"))
    out["raise"] = _error(engine.round)
    out["untouched"] = all(torch.equal(g, e) for g, e in zip(_state(model), own) if not torch.isnan(e).any())
    out["raise_at_save"] = _error(engine.ensure_finite)

    # no healthy worker left: even "reseed" must stop
    model = _poisoned_model(BAD, "param")  # every rank holds the NaN
    out["all_bad"] = _error(DPPFConsensus(model, config).round)
    return out


def test_nonfinite_worker_is_reseeded_from_the_healthy_average_or_stops_every_rank() -> None:
    results = run_distributed(_nonfinite_rounds, 3)
    for rank, r in enumerate(results):
        assert r["round_error"] <= 1e-6, (rank, r["round_error"])
        assert r["buffer_error"] <= 1e-6, (rank, r["buffer_error"])
        assert r["averaged_error"] <= 1e-6 and r["restored"] and r["still_nan"] == (rank == BAD)
        assert r["ensure_returned"] == (rank == BAD) and r["ensure_error"] <= 1e-6 and r["ensure_again"] is False
        assert r["reseeded"] == (rank == BAD) and r["count"] == 1, "every rank counts the re-seeded worker"
        got, want = r["distance_before"]
        assert got == pytest.approx(want, rel=1e-5), "the statistics are the healthy workers (fp32 norms)"
        # the first reduction finds the NaN in the shared sum; then M flags, the healthy reduction and the distances
        assert r["round_bytes"] == 2 * r["param_bytes"] + 8 * 3 + 16
        assert "DPPF round 1 (after optimizer step 0): worker(s) [2] of 3 hold NaN/Inf weights" in r["raise"]
        assert "nonfinite_policy='raise'" in r["raise"] and r["untouched"]
        assert "worker(s) [2] of 3 hold NaN/Inf weights" in r["raise_at_save"]
        assert "worker(s) [0, 1, 2] of 3" in r["all_bad"] and "no healthy worker is left" in r["all_bad"]


# ---------------------------------------------------------------------------------------------------- dead peers


def _peer_dies_between_rounds(rank: int, world_size: int, how: str) -> dict | None:
    engine = DPPFConsensus(OddModel(), DPPFConfig(timeout_s=3.0))
    engine.round()  # round 1 completes on both ranks
    if rank == 1:
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(15)  # "stuck": alive, but never joins round 2
        return None
    start = time.monotonic()
    message = _error(engine.round)
    return {"message": message, "seconds": time.monotonic() - start}


@pytest.mark.parametrize("how", ["killed", "stuck"])
def test_a_dead_or_stuck_peer_fails_the_round_within_the_timeout(how: str) -> None:
    result = run_distributed(_peer_dies_between_rounds, 2, how, dying=(1,))[0]
    assert "DPPF round 2 (after optimizer step 0) failed on rank 0 of 2" in result["message"]
    assert "3 s (DPPFConfig.timeout_s)" in result["message"]
    # a killed peer is noticed at once (connection reset); a stuck one after the 3 s timeout, not in 30 min
    assert result["seconds"] < 10, result["seconds"]
    if how == "stuck":
        assert result["seconds"] >= 2.9, result["seconds"]
