"""
The baseline strategies (easgd, lsgd, grawa) in the distributed engine against the in-process oracle, their closed
forms, exact byte counts, easgd's checkpointed centre, and the integrations feeding lsgd's loss and grawa's gradient
norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_utils import count_collectives, gather_workers, run_distributed
from safetensors.torch import load_file, save_file
from test_accelerate import make_model, params
from test_engine import OddModel, drift, trainable
from test_trainer import _tensors_equal, collected
from trainer_fixtures import make_args, tiny_bert, toy_data
from transformers import TrainerCallback

from hf_dppf import DPPF, DPPFConfig, DPPFConsensus, DPPFTrainer
from hf_dppf.integrations.trainer import DPPF_CHECKPOINT_DIR
from hf_dppf.recipes.sam import SAMTrainer, SAMTrainingArguments
from hf_dppf.simulate import simulate_consensus, simulate_round
from hf_dppf.strategies import STRATEGIES, grawa_weight, leader_rank

# Bytes a round sends on top of the parameters, buffers and the 16-byte distance statistics (M workers).
EXTRA_BYTES = {"easgd": lambda m: 0, "lsgd": lambda m: 8 * m, "grawa": lambda m: 8 * m}
EXTRA_CALLS = {"easgd": 0, "lsgd": 1, "grawa": 1}


def gap(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between two lists of tensors."""
    return max((g.detach().double() - w.double()).abs().max().item() for g, w in zip(got, want, strict=True))


def fed_values(rank: int, world_size: int, k: int) -> list[tuple[float, float]]:
    """What worker `rank` feeds `observe()` before round `k`: three (loss, grad_norm) pairs, set by (rank, k)."""
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
        drift([p for p in model.parameters() if p.requires_grad], rank, k)
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
        worst = max(worst, gap(got, expected.workers[rank]))
        for b, name in enumerate(("running_mean", "running_var")):  # buffers: the plain average, every strategy
            mean = torch.stack([w[b] for w in buffers]).mean(0)
            assert torch.allclose(getattr(model.bn, name), mean, atol=1e-6), name
        if expected.centre is not None:
            saved = engine.state_dict()["centre"]
            assert list(saved) == names
            worst = max(worst, gap([saved[n] for n in names], expected.centre))
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


# ---------------------------------------------------------------------------------------------------- closed forms


def _easgd_closed_form(rank: int, world_size: int, alpha: float, beta: float, rounds: int, tmp: str) -> dict:
    """Zero learning rate, a centre z0 away from the average: the recurrences in closed form, then a resume."""
    torch.manual_seed(rank)
    weights = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    z0 = [torch.randn(p.shape, generator=torch.Generator().manual_seed(99)) for p in weights]  # the same on every rank
    config = DPPFConfig(strategy="easgd", alpha=alpha, beta=beta)
    engine = DPPFConsensus(weights, config)
    engine.load_state_dict({"format": 1, "stats": {}, "centre": {"0": z0[0], "1": z0[1]}})
    x0 = [p.detach().double().clone() for p in weights]
    avg0 = [torch.stack(ts).mean(0) for ts in zip(*gather_workers(x0, world_size))]
    worst, ratios = 0.0, []
    for k in range(1, rounds + 1):
        stats = engine.round()
        ratios.append(stats.mean_distance / stats.distance_before)
        # b x_A + a z is invariant, e = x_A - z shrinks by (1 - a - b), d_i = x_i - x_A by (1 - a)
        centres = engine.state_dict()["centre"]
        for j, (p, x, a0, z) in enumerate(zip(weights, x0, avg0, z0)):
            z = z.double()
            invariant, e = beta * a0 + alpha * z, (1 - alpha - beta) ** k * (a0 - z)
            avg_k, z_k = (invariant + alpha * e) / (alpha + beta), (invariant - beta * e) / (alpha + beta)
            x_k = avg_k + (1 - alpha) ** k * (x - a0)
            worst = max(worst, (p.detach() - x_k).abs().max().item(), (centres[str(j)] - z_k).abs().max().item())
    # Exact resume: the state goes through safetensors, into a fresh engine whose buckets are built on new storage.
    state = engine.state_dict()
    save_file(state.pop("centre"), f"{tmp}/centre{rank}.safetensors")
    state["centre"] = load_file(f"{tmp}/centre{rank}.safetensors")
    copies = [torch.nn.Parameter(p.detach().clone()) for p in weights]
    resumed = DPPFConsensus(copies, config)
    resumed.load_state_dict(state)
    for _ in range(2):
        engine.round()
    resumed.round()
    with torch.no_grad():  # re-point the storage between rounds: the buckets are rebuilt, the centre must survive
        for p in copies:
            p.data = p.data.clone()
    resumed.round()
    same_params = all(torch.equal(a, b) for a, b in zip(weights, copies))
    centre, centre_resumed = engine.state_dict()["centre"], resumed.state_dict()["centre"]
    same_centre = centre.keys() == centre_resumed.keys() and all(
        torch.equal(centre[k], centre_resumed[k]) for k in centre
    )
    return {"worst": worst, "ratios": ratios, "resume_exact": same_params and same_centre}


def test_easgd_closed_form_and_exact_resume(tmp_path) -> None:
    alpha, beta = 0.3, 0.5
    for r in run_distributed(_easgd_closed_form, 2, alpha, beta, 12, str(tmp_path)):
        assert r["worst"] <= 1e-6, r
        assert all(math.isclose(q, 1 - alpha, rel_tol=1e-6) for q in r["ratios"]), r["ratios"]
        assert r["resume_exact"]


def _lsgd_and_grawa(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)
    x0 = [torch.randn(6, 4), torch.randn(3)]
    workers = gather_workers(x0, world_size)
    out = {}
    # lsgd: the leader does not move (bit for bit), the others are pulled toward its weights
    weights = [torch.nn.Parameter(t.clone()) for t in x0]
    engine = DPPFConsensus(weights, DPPFConfig(strategy="lsgd", alpha=0.25))
    for loss in [5.0, 0.0] if rank == 1 else [3.0 - rank]:  # means: rank 0: 3, rank 1: 2.5, rank 2: 1
        engine.observe(loss=loss)
    leaders = [engine.round().leader]
    moved = gap(weights, x0)
    expect = [t - 0.25 * (t - lt) for t, lt in zip(x0, workers[2])]
    out["lsgd_pull"] = gap(weights, expect)
    out["lsgd_leader_moved"] = moved if rank == 2 else None
    engine.observe(loss=float("nan") if rank == 2 else 4.0 - rank)  # NaN never leads: rank 1 (3.0) does
    leaders.append(engine.round().leader)
    leaders.append(engine.round().leader)  # nothing new observed: the last round's losses still hold
    engine.observe(loss=1.0)  # a tie: the lowest rank leads
    leaders.append(engine.round().leader)
    out["leaders"] = leaders
    # grawa with equal gradient norms is the plain pull toward the average: the dppf rule with lam = 0
    grawa = DPPFConfig(strategy="grawa", alpha=0.4)
    weights = [torch.nn.Parameter(t.clone()) for t in x0]
    engine = DPPFConsensus(weights, grawa)
    engine.observe(grad_norm=2.0)
    engine.round()
    plain = simulate_round(workers, DPPFConfig(strategy="dppf", alpha=0.4, lam=0.0))[rank]
    out["grawa_equal"] = gap(weights, plain)
    # weights 1 / ||g||: norms 1, 3 and inf give the centre (3 x_0 + x_1) / 4; the infinite norm has no weight
    weights = [torch.nn.Parameter(t.clone()) for t in x0]
    engine = DPPFConsensus(weights, grawa)
    engine.observe(grad_norm=torch.tensor([1.0, 3.0, math.inf][rank]))
    engine.round()
    centre = [(3 * a + b) / 4 for a, b in zip(workers[0], workers[1])]
    expect = [t - 0.4 * (t - c) for t, c in zip(x0, centre)]
    out["grawa_weighted"] = gap(weights, expect)
    out["nonfinite"] = _nonfinite_workers(rank, x0, workers)
    return out


def _nonfinite_workers(rank: int, x0: list[torch.Tensor], workers: list[list[torch.Tensor]]) -> dict[str, float]:
    """
    One worker holds NaN weights: it is never the leader and has no weight, takes the centre (re-seeded), and the
    healthy workers do the round among themselves.
    """
    out = {}
    healthy_avg = {
        bad: [sum(w[j] for i, w in enumerate(workers) if i != bad) / 2 for j in range(2)] for bad in (0, 1, 2)
    }
    cases = {
        # rank 0 has the lowest loss but NaN weights: rank 1 (next lowest) leads
        "lsgd": (DPPFConfig(strategy="lsgd", alpha=0.25), 0, {"loss": [0.0, 1.0, 2.0][rank]}, workers[1]),
        # rank 1 is NaN: the centre is (x_0 / 1 + x_2 / 3) / (1 + 1/3)
        "grawa": (
            DPPFConfig(strategy="grawa", alpha=0.4),
            1,
            {"grad_norm": [1.0, 1.0, 3.0][rank]},
            [(3 * a + b) / 4 for a, b in zip(workers[0], workers[2])],
        ),
        # rank 2 is NaN: the centre variable starts at the healthy workers' average
        "easgd": (DPPFConfig(strategy="easgd", alpha=0.3), 2, {}, healthy_avg[2]),
    }
    for name, (config, bad, feed, centre) in cases.items():
        weights = [torch.nn.Parameter(t.clone()) for t in x0]
        if rank == bad:
            with torch.no_grad():
                weights[0][0, 0] = math.nan
        engine = DPPFConsensus(weights, config)
        engine.observe(**feed)
        stats = engine.round()
        expect = centre if rank == bad else [t - config.alpha * (t - c) for t, c in zip(x0, centre)]
        out[name] = gap(weights, expect)
        assert stats.reseeded_workers == 1 and engine.last_reseeded == (rank == bad), (name, stats)
    return out


def test_lsgd_leader_grawa_weights_and_nonfinite_workers_closed_form() -> None:
    for rank, r in enumerate(run_distributed(_lsgd_and_grawa, 3)):
        assert r["leaders"] == [2, 1, 1, 0], r["leaders"]
        assert r["lsgd_pull"] <= 1e-6 and r["grawa_equal"] <= 1e-6 and r["grawa_weighted"] <= 1e-6, r
        assert all(v <= 1e-6 for v in r["nonfinite"].values()), r["nonfinite"]
        if rank == 2:
            assert r["lsgd_leader_moved"] == 0.0, "the leader keeps its weights bit for bit"


def test_scalar_rules() -> None:
    assert leader_rank([3.0, 1.0, 1.0]) == 1 and leader_rank([math.nan, 2.0]) == 1 and leader_rank([math.inf]) == 0
    assert grawa_weight(3.0, 1e-12) == pytest.approx(1 / 3) and grawa_weight(math.nan, 1e-12) == 0.0
    for name in ("easgd", "lsgd", "grawa"):
        s = STRATEGIES[name]
        assert s.coefficient(1.0, 0.3, 0.0, 1e-12) == pytest.approx(0.7) and not s.pushes and s.description


def test_lsgd_without_a_loss_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    engine = DPPFConsensus(torch.nn.Linear(2, 2), DPPFConfig(strategy="lsgd", tau=1))
    with pytest.raises(RuntimeError, match=r"observe\(loss=\.\.\.\)"):
        engine.step()
    engine.observe(grad_norm=1.0)  # not what lsgd uses: dropped, still no loss
    with pytest.raises(RuntimeError, match="loss"):
        engine.round()
    engine.observe(loss=0.5)
    assert engine.step() and engine.stats.rounds == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "easgd", "beta": 0.0}, r"beta=0\.0 is invalid: beta must be None or a number in \(0, 1\]"),
        ({"strategy": "dppf", "beta": 0.5}, "would be ignored by strategy='dppf'"),
        ({"strategy": "lsgd", "width": 0.01}, "strategy='lsgd' does not push"),
        ({"strategy": "easgd", "lam": 0.1}, "strategy='easgd' does not push"),
        ({"strategy": "grawa", "eps": 0.0}, r"eps=0\.0 is invalid: eps must be a finite number > 0"),
    ],
)
def test_config_rejects_settings_the_strategy_ignores(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPPFConfig(**kwargs)
    assert (
        DPPFConfig(strategy="easgd").moving_rate == 0.9 and DPPFConfig(strategy="easgd", beta=0.2).moving_rate == 0.2
    )


# ---------------------------------------------------------------------------------------------------- integrations


def global_grad_norm(parameters: Any) -> float:
    """The oracle's gradient norm: the L2 norm over every gradient, in float64 (independent of the engine's)."""
    return math.sqrt(sum(p.grad.double().square().sum().item() for p in parameters if p.grad is not None))


def gathered_means(values: list[float], world_size: int) -> list[float]:
    """Every rank's mean of `values` (what the round must have used)."""
    mean = torch.tensor([sum(values) / len(values)], dtype=torch.float64)
    return [w[0].item() for w in gather_workers([mean], world_size)]


def _accelerate_feeds(rank: int, world_size: int) -> dict[str, dict]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    out = {}
    for name in ("easgd", "lsgd", "grawa"):
        config = DPPFConfig(strategy=name, tau=2, alpha=0.5)
        model = make_model()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
        captured: dict[str, list[torch.Tensor]] = {}

        def capture(*_: Any, into: dict = captured, ddp: torch.nn.Module = model) -> None:
            into["pre"] = params(ddp.module)

        # registered before DPPF's hook, so it sees the weights right before the round
        hook = optimizer.optimizer.register_step_post_hook(capture)
        g = torch.Generator().manual_seed(7 + rank)
        losses, norms = [], []
        with DPPF(accelerator, model, optimizer, config) as dppf:
            for _ in range(config.tau):
                x, y = torch.randn(8, 6, generator=g), (1 + 4 * rank) * torch.randn(8, 2, generator=g)
                loss = F.mse_loss(model(x), y)
                accelerator.backward(loss)
                losses.append(loss.item())
                norms.append(global_grad_norm(model.parameters()))
                dppf.observe(loss=loss)  # lsgd; grawa's norm is measured by DPPF's optimizer pre-hook
                optimizer.step()
                optimizer.zero_grad()
            hook.remove()
            assert dppf.stats.rounds == 1
            loss_means, norm_means = gathered_means(losses, world_size), gathered_means(norms, world_size)
            expected = simulate_consensus(
                gather_workers(captured["pre"], world_size), config, losses=loss_means, grad_norms=norm_means
            )
            worst = gap(params(model.module), expected.workers[rank])
            out[name] = {"worst": worst, "leader": dppf.stats.leader, "losses": loss_means, "norms": norm_means}
    return out


def test_accelerate_context_feeds_every_strategy() -> None:
    results = run_distributed(_accelerate_feeds, 2, init=False)
    for r in results:
        for name, got in r.items():
            assert got["worst"] <= 1e-6, (name, got)
        losses = r["lsgd"]["losses"]
        assert r["lsgd"]["leader"] == min(range(2), key=losses.__getitem__), "the leader is the lowest fed loss"
        assert r["easgd"]["leader"] == r["grawa"]["leader"] == -1
        norms = r["grawa"]["norms"]
        assert max(norms) > 1.5 * min(norms), "the workers' gradient norms differ, so the weights matter"


class FeedRecorder(DPPFTrainer):
    """Records what the stock loop produces: each micro-batch's loss and the gradient norm before clipping."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(loss.item())
        # after the last micro-batch of a step the gradient is complete and not yet clipped
        self.norms.append(global_grad_norm(model.parameters()))
        return loss


class PreRound(TrainerCallback):
    """Registered before DPPF's callback: the workers' weights right before and right after each step's round."""

    def __init__(self) -> None:
        self.pre: dict[int, list[torch.Tensor]] = {}
        self.post: dict[int, list[torch.Tensor]] = {}
        self.leader: dict[int, int] = {}
        self.trainer: DPPFTrainer | None = None

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.pre[state.global_step + 1] = params(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.post[state.global_step] = params(model)
        self.leader[state.global_step] = self.trainer.dppf_engine.stats.leader  # before the final average


def _trainer_feeds(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    accumulation = 2
    for name in ("lsgd", "grawa"):
        args = make_args(f"{tmp}/{name}", dppf=True, dppf_strategy=name, dppf_tau=2, max_steps=2, max_grad_norm=1e-3)
        recorder = PreRound()
        trainer = FeedRecorder(model=tiny_bert(seed=1), args=args, train_dataset=toy_data(), callbacks=[recorder])
        trainer.losses, trainer.norms, recorder.trainer = [], [], trainer
        trainer.train()
        pre_clip = trainer.norms[accumulation - 1 :: accumulation]  # one per optimizer step
        loss_means, norm_means = gathered_means(trainer.losses, world_size), gathered_means(pre_clip, world_size)
        config = args.dppf_config
        expected = simulate_consensus(
            gather_workers(recorder.pre[2], world_size), config, losses=loss_means, grad_norms=norm_means
        )
        worst = gap(recorder.post[2], expected.workers[rank])
        out[name] = {"worst": worst, "leader": recorder.leader[2], "losses": loss_means}
        # had the clipped norms (all max_grad_norm) been fed, the weights would be equal: a visibly different round
        clipped = simulate_consensus(
            gather_workers(recorder.pre[2], world_size), config, losses=loss_means, grad_norms=[1e-3] * world_size
        )
        out[name]["clipped_gap"] = gap(recorder.post[2], clipped.workers[rank])
    # easgd: the centre variable is checkpointed with safetensors and a resumed run continues exactly
    resume = dict(dppf=True, dppf_strategy="easgd", dppf_tau=2, max_steps=4, save_strategy="steps", save_steps=2)
    DPPFTrainer(model=tiny_bert(seed=1), args=make_args(f"{tmp}/a", **resume), train_dataset=toy_data()).train()
    resumed = DPPFTrainer(model=tiny_bert(seed=7), args=make_args(f"{tmp}/b", **resume), train_dataset=toy_data())
    resumed.train(resume_from_checkpoint=f"{tmp}/a/checkpoint-2")
    files = {
        run: {n: load_file(f"{tmp}/{run}/checkpoint-4/{DPPF_CHECKPOINT_DIR}/rank{rank}/{n}") for n in FILES}
        for run in ("a", "b")
    }
    out["easgd"] = {
        "exact": all(_tensors_equal(files["a"][n], files["b"][n]) for n in FILES),
        "centre_keys": sorted(files["a"]["centre.safetensors"])
        == sorted(n for n, _ in tiny_bert(1).named_parameters()),
    }
    return out


FILES = ("model.safetensors", "centre.safetensors")


def test_trainer_feeds_loss_and_pre_clip_grad_norm_and_checkpoints_the_centre(tmp_path) -> None:
    for r in run_distributed(collected, 2, _trainer_feeds, str(tmp_path), init=False):
        for name in ("lsgd", "grawa"):
            assert r[name]["worst"] <= 1e-6, (name, r[name])
        losses = r["lsgd"]["losses"]
        assert r["lsgd"]["leader"] == min(range(2), key=losses.__getitem__)
        assert r["grawa"]["clipped_gap"] > 1e-5, "grawa weighs by the norms from before clipping (max_grad_norm=1e-3)"
        assert r["easgd"]["exact"] and r["easgd"]["centre_keys"]


class SAMLossRecorder(SAMTrainer):
    """Records what each SAM training step returns: the loss at the weights (the first of its two passes)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.returned.append(loss.item())
        return loss


def test_sam_feeds_lsgd_the_loss_at_the_weights_not_at_the_perturbed_point(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = SAMTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dppf=True,
        dppf_strategy="lsgd",
        dppf_tau=100,  # no round: the window still holds what was fed
        sam_rho=0.05,
    )
    trainer = SAMLossRecorder(model=tiny_bert(seed=1), args=args, train_dataset=toy_data())
    trainer.returned = []
    trainer.train()
    observed = trainer.dppf_engine.state_dict()["observed"]["loss"]
    assert observed["count"] == len(trainer.returned) == 2, "one loss per micro-batch, not one per SAM pass"
    assert math.isclose(observed["sum"], sum(trainer.returned), rel_tol=1e-6)
