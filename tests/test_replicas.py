"""
Hierarchical DPPF in the engine, without DeepSpeed: 4 CPU processes (gloo) as 2 replicas x 2 processes that hold the
same weights. Each round must equal `simulate_round` applied to the replicas' weights (every strategy, a bf16 wire,
an overlapped round, `averaged()`, a re-seeded replica), leave the ranks of a replica bit for bit equal, and send
exactly 1/2 of the weights per process across replicas (every collective recorded with its group and its bytes).
"""

from __future__ import annotations

import math
import os
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
    # one replica of every process (M = 1): nothing moves, the statistics are the whole model's
    whole = ReplicaGroups.build(WORLD)
    model = _replica_model(whole, 5)  # the same weights on every process of the replica
    engine = DPPFConsensus(
        model, DPPFConfig(width=0.01), process_group=whole.shard_group, replica_group=whole.replica_group
    )
    before = trainable(model)
    stats = engine.round()
    assert all(torch.equal(a, b) for a, b in zip(trainable(model), before))
    want = math.sqrt(sum(t.double().square().sum().item() for t in before))
    assert math.isclose(stats.average_norm, want, rel_tol=1e-5), (stats.average_norm, want)  # fp32 norms
    from hf_dppf.integrations.common import sync_gradients_in_replica

    with pytest.raises(ValueError, match="DDP-wrapped"):
        sync_gradients_in_replica(torch.nn.Linear(2, 2), groups.replica_group)
    from trainer_fixtures import make_args, tiny_bert

    from hf_dppf import DPPFTrainer

    with pytest.raises(ValueError, match="--dppf_push_mode step is not available with --dppf_replica_size 2"):
        args = make_args(f"/tmp/unused-{rank}", dppf=True, dppf_replica_size=2, dppf_push_mode="step")
        DPPFTrainer(model=tiny_bert(seed=1), args=args)


def test_replica_refusals():
    run_distributed(_refusals, WORLD)


# ---------------------------------------------------------------------------------------------------- integrations
TAU, STEPS, ACCUM, LR = 3, 7, 2, 0.05
INTEGRATION_CONFIG = DPPFConfig(tau=TAU, alpha=0.5, lam=0.05, lam_schedule="constant", replica_size=G)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)  # every process reads its own data
    return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)


def _own(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _accelerate_loop(rank: int, world_size: int) -> dict[str, Any]:
    from accelerate import Accelerator
    from dist_utils import count_collectives

    from hf_dppf import DPPF

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    replica = tuple(range(rank - rank % G, rank - rank % G + G))
    shard_group = tuple(range(rank % G, WORLD, G))
    out: dict[str, Any] = {"local_groups": set(), "round_bytes": [], "worst": 0.0, "replicas_differ": [], "unseen": []}
    with DPPF(accelerator, model, config=INTEGRATION_CONFIG) as dppf:
        numel = sum(p.numel() for p in model.parameters())
        for step in range(STEPS):
            start = _own(model.module)
            # the oracle for the gradient: the mean over the replica of each process's own accumulated gradient
            reference = _mlp()
            reference.load_state_dict(model.module.state_dict())
            for micro in range(ACCUM):
                x, y = _batch(rank, step, micro)
                (torch.nn.functional.mse_loss(reference(x), y) / ACCUM).backward()
            grads = gather_workers([p.grad for p in reference.parameters()], WORLD)
            with count_collectives() as profiled, record_collective_groups() as calls:
                for micro in range(ACCUM):
                    with accelerator.accumulate(model):
                        x, y = _batch(rank, step, micro)
                        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
                        optimizer.step()
                        optimizer.zero_grad()
            # the profiler sees every collective, the recorder only those issued from Python: the one difference
            # allowed is DDP's C++ reducer broadcasting its rebuilt bucket order once, after the first synced step
            unseen = [c for c in profiled.calls if c[0] != "gloo:all_reduce"]
            assert profiled.count - len(unseen) == len(calls), (profiled.calls, calls)
            out["unseen"].append(unseen)
            out["local_groups"] |= {ranks for _, ranks in calls}
            mean_grad = [sum(g[j] for g in grads[replica[0] : replica[-1] + 1]) / G for j in range(len(start))]
            stepped = _own(model.module)
            gap = max((s - (w - LR * g)).abs().max().item() for s, w, g in zip(stepped, start, mean_grad))
            assert gap < 1e-6, (step, gap)
            workers = _replicas(stepped)
            out["replicas_differ"].append(any(not torch.equal(a, b) for a, b in zip(*workers)))
            sent = dppf.stats.bytes_communicated - dppf.stats.replica_bytes
            with record_collective_groups() as round_calls:
                ran = dppf.step()
            if ran:
                expected = simulate_consensus(workers, INTEGRATION_CONFIG).workers[rank // G]
                got = _replicas(_own(model.module))[rank // G]
                out["worst"] = max(out["worst"], max((a - e).abs().max().item() for a, e in zip(got, expected)))
                assert (
                    round_calls.bytes_over(shard_group)
                    == dppf.stats.bytes_communicated - dppf.stats.replica_bytes - sent
                )
                out["round_bytes"].append(round_calls.bytes_over(shard_group))
        out["rounds"] = dppf.stats.rounds
        before_exit = _replicas(_own(model.module))
    final = gather_workers(_own(model.module), WORLD)
    average = [sum(w[j] for w in before_exit) / len(before_exit) for j in range(len(before_exit[0]))]
    out["exit_average"] = all(all(torch.allclose(a, b, atol=1e-6) for a, b in zip(f, average)) for f in final) and all(
        all(torch.equal(a, b) for a, b in zip(f, final[0])) for f in final
    )
    out["numel"] = numel
    return out


def test_accelerate_block_replicas_sync_inside_and_round_across():
    results = run_distributed(_accelerate_loop, WORLD, init=False)
    for rank, out in enumerate(results):
        replica = tuple(range(rank - rank % G, rank - rank % G + G))
        assert out["local_groups"] == {replica}, out["local_groups"]  # gradients inside the replica, nothing across
        assert out["rounds"] == STEPS // TAU and out["worst"] < TOL, out
        assert all(out["replicas_differ"]), out["replicas_differ"]
        # a round: this process's half of the weights (fp32) and the 16-byte distance statistics
        assert out["round_bytes"] == [4 * math.ceil(out["numel"] / G) + 16] * (STEPS // TAU), out["round_bytes"]
        assert out["exit_average"]
        # DDP's bucket-order broadcast over its whole group: once per run, a few bytes (sizes and indices)
        assert [bool(u) for u in out["unseen"]] == [False, True] + [False] * (STEPS - 2), out["unseen"]
        assert {name for name, _ in out["unseen"][1]} == {"gloo:broadcast"} and sum(
            b for _, b in out["unseen"][1]
        ) < 64


class _ReplicaRecorder:
    """
    A Trainer callback (registered before DPPF's, so it sees each step before the round and the run before the final
    average): what each step sent and to whom, the replicas' weights before and after every round.
    """

    def __init__(self, rank: int) -> None:
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                recorder.begin()

            def on_optimizer_step(self, args, state, control, model=None, **kwargs):
                recorder.stepped(kwargs.get("model") or model)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                recorder.ended(model)

            def on_train_end(self, args, state, control, model=None, **kwargs):
                recorder.before_exit = _replicas(_own(model))

        self.callback, self.rank = Callback(), rank
        self.trainer: Any = None
        self.groups: list[set] = []
        self.unseen: list[list] = []
        self.rounds: list[tuple[list, list]] = []
        self.round_bytes: list[int] = []
        self.replicas_differ: list[bool] = []

    def begin(self) -> None:
        from dist_utils import count_collectives

        self._windows = (count_collectives(), record_collective_groups())
        self._logs = [w.__enter__() for w in self._windows]

    def stepped(self, model: torch.nn.Module) -> None:
        for w in reversed(self._windows):
            w.__exit__(None, None, None)
        profiled, calls = self._logs
        unseen = [c for c in profiled.calls if c[0] != "gloo:all_reduce"]
        assert profiled.count - len(unseen) == len(calls), (profiled.calls, calls)
        self.groups.append({ranks for _, ranks in calls})
        self.unseen.append(unseen)
        self.workers = _replicas(_own(self.trainer.model))  # the ranks of each replica must agree after the step
        self.replicas_differ.append(any(not torch.equal(a, b) for a, b in zip(*self.workers)))
        engine = self.trainer.dppf_engine
        self._rounds, self._across = engine.stats.rounds, engine.stats.bytes_communicated - engine.stats.replica_bytes

    def ended(self, model: torch.nn.Module) -> None:
        engine = self.trainer.dppf_engine
        if engine.stats.rounds > self._rounds:
            self.rounds.append((self.workers, _replicas(_own(self.trainer.model))))
            self.round_bytes.append(engine.stats.bytes_communicated - engine.stats.replica_bytes - self._across)


TRAINER_RUN = dict(
    dppf=True,
    dppf_tau=3,
    dppf_alpha=0.5,
    dppf_lambda=0.05,
    dppf_lam_schedule="constant",
    dppf_replica_size=G,
    max_steps=8,
    logging_steps=1,
    save_strategy="steps",
    save_steps=4,
)


def _trainer_runs(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import gc

    from safetensors.torch import load_file
    from test_trainer import RecordingDPPFTrainer, _optimizer_states_equal, _tensors_equal, own_weights
    from trainer_fixtures import make_args, tiny_bert, toy_data

    from hf_dppf import DPPFTrainer

    recorder = _ReplicaRecorder(rank)
    straight = RecordingDPPFTrainer(
        model=tiny_bert(seed=1),
        args=make_args(f"{tmp}/a", **TRAINER_RUN),
        train_dataset=toy_data(),
        callbacks=[recorder.callback],
    )
    recorder.trainer = straight
    straight.seen = []
    straight.train()
    seen: list[Any] = [None] * WORLD
    dist.all_gather_object(seen, straight.seen)
    final = gather_workers(_own(straight.model), WORLD)
    config = straight.args.dppf_config
    worst = 0.0
    for workers, after in recorder.rounds:
        expected = simulate_consensus(workers, config).workers
        worst = max(worst, max((a - e).abs().max().item() for w, x in zip(after, expected) for a, e in zip(w, x)))
    average = [sum(w[j] for w in recorder.before_exit) / G for j in range(len(final[0]))]
    resumed = DPPFTrainer(model=tiny_bert(seed=7), args=make_args(f"{tmp}/b", **TRAINER_RUN), train_dataset=toy_data())
    resumed.train(resume_from_checkpoint=f"{tmp}/a/checkpoint-4")
    worker = f"{tmp}/{{}}/checkpoint-8/dppf/replica{rank // G}/{{}}"
    out = {
        # one epoch is 3 micro-batches of 4 per process: together, every sample once (each process its own shard)
        "one_epoch": sorted(i for ids in seen for batch in ids[:3] for i in batch),
        "groups": recorder.groups,
        "unseen": recorder.unseen,
        "replicas_differ": recorder.replicas_differ,
        "rounds": len(recorder.rounds),
        "worst": worst,
        "round_bytes": recorder.round_bytes,
        "numel": sum(p.numel() for p in straight.model.parameters()),
        "exit_average": all(
            all(torch.allclose(a, b, atol=1e-6) and torch.equal(a, c) for a, b, c in zip(f, average, final[0]))
            for f in final
        ),
        "files": sorted(os.listdir(f"{tmp}/a/checkpoint-4/dppf")) if rank == 0 else None,
        "replica_files": sorted(os.listdir(f"{tmp}/a/checkpoint-4/dppf/replica0")) if rank == 0 else None,
        "resumed_weights": _tensors_equal(
            load_file(worker.format("a", "model.safetensors")), load_file(worker.format("b", "model.safetensors"))
        ),
        "resumed_optimizer": _optimizer_states_equal(
            worker.format("a", "optimizer.pt"), worker.format("b", "optimizer.pt")
        ),
        "resumed_final": _tensors_equal(own_weights(straight.model), own_weights(resumed.model)),
    }
    del straight, resumed
    gc.collect()
    return out


def test_trainer_replicas_sync_inside_round_across_and_resume_exactly(tmp_path):
    results = run_distributed(_trainer_runs, WORLD, str(tmp_path), init=False)
    for rank, out in enumerate(results):
        replica = tuple(range(rank - rank % G, rank - rank % G + G))
        assert all(groups == {replica} for groups in out["groups"]), out["groups"]
        assert [bool(u) for u in out["unseen"]] == [False, True] + [False] * 6, out["unseen"]
        assert all(out["replicas_differ"]) and out["rounds"] == 2 and out["worst"] < TOL, out
        assert out["round_bytes"] == [4 * math.ceil(out["numel"] / G) + 16] * 2, out["round_bytes"]
        assert out["exit_average"] and out["one_epoch"] == list(range(48))
        assert out["resumed_weights"] and out["resumed_optimizer"] and out["resumed_final"], out
    assert results[0]["files"] == ["replica0", "replica1"]
    assert results[0]["replica_files"] == [
        "model.safetensors",
        "optimizer.pt",
        "shard0-dppf_state.json",
        "shard1-dppf_state.json",
    ]


def test_accelerate_save_state_load_state_resumes_replicas_exactly(tmp_path):
    import numpy as np
    from test_accelerate_state import TOTAL, _train

    from hf_dppf.engine import FINGERPRINT_BYTES

    config = DPPFConfig(tau=3, alpha=0.5, width=0.05, replica_size=G)  # the push follows the lr schedule
    ckpt = str(tmp_path / "ckpt")
    straight = run_distributed(_train, WORLD, config, range(TOTAL), None, str(tmp_path / "scratch"), False, init=False)
    run_distributed(_train, WORLD, config, range(4), 4, ckpt, False, init=False)
    assert sorted(os.listdir(os.path.join(ckpt, "dppf"))) == ["replica0", "replica1"]  # one copy per replica
    assert sorted(os.listdir(os.path.join(ckpt, "dppf", "replica1"))) == [
        "model.safetensors",
        "optimizer.pt",
        "shard0-dppf_state.json",
        "shard1-dppf_state.json",
    ]
    resumed = run_distributed(_train, WORLD, config, range(4, TOTAL), None, ckpt, True, init=False)
    for rank in range(WORLD):
        want, got = straight[rank], resumed[rank]
        for a, b in zip(want["params"] + want["moments"], got["params"] + got["moments"], strict=True):
            assert np.array_equal(a, b), f"rank {rank}: max diff {np.abs(a - b).max()}"
        assert np.array_equal(want["rng"], got["rng"]) and want["lr"] == got["lr"]
        assert want["stats"][:2] == got["stats"][:2] and want["stats"][3] == got["stats"][3]
        assert got["stats"][2] == want["stats"][2] + FINGERPRINT_BYTES
    # the ranks of a replica hold the same weights; the replicas differ
    assert all(np.array_equal(a, b) for a, b in zip(straight[0]["params"], straight[1]["params"]))
    assert not np.array_equal(straight[0]["params"][0], straight[2]["params"][0])
    # another replica size cannot resume this checkpoint
    flat = DPPFConfig(tau=3, alpha=0.5, width=0.05)
    with pytest.raises(AssertionError, match="has no DPPF state for this rank .* by replicas of another size"):
        run_distributed(_train, WORLD, flat, range(4, TOTAL), None, ckpt, True, init=False)
