"""
`push_mode="step"`: the push as the regulariser's gradient at every local step, against the last round's average,
and rounds that only pull. The engine against the oracle (`simulate_round` + `simulate_step_push`) over several
rounds and steps, its per-step cost (ops, host reads, bytes), and an exact resume.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import count_collectives, gather_workers, run_distributed
from test_engine import OddModel, drift, trainable
from test_round_ops import counted

from hf_dppf import DPPFConfig, DPPFConsensus
from hf_dppf.simulate import simulate_round, simulate_step_push

SCALES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]  # a decaying lr_t / lr_0


def _average(workers: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([w[j].double() for w in workers]).mean(0) for j in range(len(workers[0]))]


def _trajectory(rank: int, world_size: int, config: DPPFConfig) -> dict:
    model = OddModel()
    model.randomise(seed=70 + rank)
    live = [p for p in model.parameters() if p.requires_grad]
    engine = DPPFConsensus(model, config)
    workers = gather_workers(trainable(model), world_size)  # the oracle's copy of every worker
    anchor, worst, steps_ops, steps_bytes = None, 0.0, [], []
    for step, scale in enumerate(SCALES, start=1):
        drift(live, rank, step, scale=0.05)
        for i in range(world_size):
            drift(workers[i], i, step, scale=0.05)
        due = config.round_due(step)
        if anchor is not None and not due:
            with counted() as c, count_collectives() as log:
                engine.step(scale)
            steps_ops.append((c.ops, c.reads))
            steps_bytes.append(log.bytes)
        else:
            engine.step(scale)
        if anchor is not None:
            workers = simulate_step_push(workers, anchor, config, scale)
        if due:
            anchor = _average(workers)
            workers = simulate_round(workers, config, scale)
        worst = max(
            worst, max((g.double() - w.double()).abs().max().item() for g, w in zip(trainable(model), workers[rank]))
        )
    return {
        "worst": worst,
        "rounds": engine.stats.rounds,
        "steps": steps_ops,
        "step_bytes": steps_bytes,
        "buckets": len(engine._buckets),
        "lam": engine.stats.lam,
    }


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "config",
    [
        DPPFConfig(tau=3, alpha=0.4, width=0.05, push_mode="step", bucket_mb=0.5),
        DPPFConfig(tau=2, alpha=0.5, lam=3.0, push_mode="step", warmup_steps=1, bucket_mb=0.01),
    ],
    ids=["width", "lam-warmup"],
)
def test_step_push_matches_the_oracle_and_costs_no_communication(world_size: int, config: DPPFConfig) -> None:
    for r in run_distributed(_trajectory, world_size, config):
        assert r["worst"] <= 1e-5, r["worst"]
        assert r["rounds"] == sum(config.round_due(s) for s in range(1, len(SCALES) + 1))
        assert r["lam"] > 0
        # a step between rounds: nothing on the wire, no host read, 4 ops per parameter bucket plus a few
        assert r["step_bytes"] and all(b == 0 for b in r["step_bytes"]), r["step_bytes"]
        for ops, reads in r["steps"]:
            assert reads == 0 and ops <= 4 * r["buckets"] + 20, (ops, reads, r["buckets"])


def _push_differs(rank: int, world_size: int) -> float:
    """The step push does move the workers: the same run with push_mode='round' ends elsewhere."""
    out = []
    for mode in ("step", "round"):
        model = OddModel()
        model.randomise(seed=80 + rank)
        engine = DPPFConsensus(model, DPPFConfig(tau=3, alpha=0.4, width=0.05, push_mode=mode))
        for step in range(1, 8):
            drift([p for p in model.parameters() if p.requires_grad], rank, step, scale=0.05)
            engine.step()
        out.append(trainable(model))
    return max((a - b).abs().max().item() for a, b in zip(*out))


def test_step_and_round_push_are_different_rules() -> None:
    for gap in run_distributed(_push_differs, 2):
        assert gap > 1e-3, gap


def _resume(rank: int, world_size: int) -> bool:
    config = DPPFConfig(tau=3, alpha=0.4, width=0.05, push_mode="step")

    def run(model: torch.nn.Module, engine: DPPFConsensus, steps: range) -> None:
        for step in steps:
            drift([p for p in model.parameters() if p.requires_grad], rank, step, scale=0.05)
            engine.step(SCALES[step - 1])

    straight = OddModel()
    straight.randomise(seed=90 + rank)
    run(straight, DPPFConsensus(straight, config), range(1, 9))
    first = OddModel()
    first.randomise(seed=90 + rank)
    engine = DPPFConsensus(first, config)
    run(first, engine, range(1, 5))  # a round after step 3, one push after it
    state = engine.state_dict()
    assert state["centre"], "the last round's average is checkpointed"
    resumed = OddModel()
    resumed.load_state_dict(first.state_dict())
    engine = DPPFConsensus(resumed, config)
    engine.load_state_dict(state)
    run(resumed, engine, range(5, 9))
    return all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_resume_with_the_step_push_is_exact() -> None:
    assert run_distributed(_resume, 2) == [True, True]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(push_mode="step", strategy="avg"), "does not push"),
        (dict(push_mode="step", tau=4, overlap_steps=1), "overlapped round"),
        (dict(push_mode="every"), "one of ['round', 'step']"),
    ],
)
def test_push_mode_refuses_what_makes_no_sense(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match="push_mode") as err:
        DPPFConfig(**fields)
    assert message in str(err.value)
