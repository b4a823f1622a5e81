"""
DPPF under DeepSpeed ZeRO on 4 CPU processes (gloo): 2 replicas x 2 ranks, and flat mode (4 replicas of 1 rank).

One launch builds several engines (DeepSpeed start-ups are slow) and checks, against `simulate_round` applied to the
gathered full parameters: ZeRO-2 and ZeRO-3 rounds shard by shard, no cross-replica collective between rounds (every
collective recorded with its group, and the recorder checked against the profiler's independent count), the round's
bytes (each rank sends only its own shard), and flat ZeRO-1 (local steps with no collective at all).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import (
    count_collectives,
    free_port,
    gather_workers,
    launcher_env,
    record_collective_groups,
    run_distributed,
)
from test_trainer import tiny_classifier  # noqa: F401 (a fixture)
from trainer_fixtures import make_args, tiny_bert, toy_data

from hf_dppf import DPPFConfig, DPPFTrainer
from hf_dppf.integrations.deepspeed import DeepSpeedDPPF, ReplicaGroups, check_zero_stage
from hf_dppf.integrations.trainer import DEEPSPEED_TAG, DPPF_CHECKPOINT_DIR
from hf_dppf.simulate import distances_to_average, simulate_consensus, simulate_round

WORLD = 4
TOL = 1e-6
LOCAL_STEPS = 3
# ZeRO-3 checks over the whole world that every rank recorded the same module trace, in its first two steps only
# (a few small int broadcasts); the count starts after them.
WARMUP_STEPS = 2
PUSH_SCALE = 0.7
# A large tau: the test triggers the round itself, after gathering the workers.
DPPF_CONFIG = {"tau": 1000, "alpha": 0.5, "lam": 0.3}


def ds_config(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 40  # the biases stay whole on every rank, the weights do not
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def train_step(engine: Any, g: torch.Generator) -> None:
    """One DeepSpeed step of the MLP on a random batch of 4 drawn from `g` (each rank its own)."""
    x, y = torch.randn(4, 10, generator=g), torch.randn(4, 3, generator=g)
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    engine.step()


def full_parameters(model: torch.nn.Module, stage: int) -> list[torch.Tensor]:
    """The replica's full parameters (ZeRO-3 gathers them inside the replica)."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return [p.detach().clone() for p in params]


def _replica_round(rank: int, stage: int, replica_size: int) -> dict[str, Any]:
    import deepspeed

    config = DPPFConfig(replica_size=replica_size, **DPPF_CONFIG)
    groups = ReplicaGroups.build(replica_size)
    model = mlp(seed=groups.replica_index)  # replicas start apart; DeepSpeed syncs the ranks of one replica
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=groups.deepspeed_config(ds_config(stage)), mpu=groups
    )
    dppf = DeepSpeedDPPF(engine, config, groups)
    backend = deepspeed.comm.comm.cdb
    captured = [(backend, "all_gather_function"), (backend, "reduce_scatter_function")]
    g = torch.Generator().manual_seed(rank)

    def local_step() -> None:
        train_step(engine, g)
        assert dppf.step(PUSH_SCALE) is False

    for _ in range(WARMUP_STEPS):
        local_step()
    with count_collectives() as profiled, record_collective_groups(*captured) as local_calls:
        for _ in range(LOCAL_STEPS):
            local_step()
    my_replica = set(range(groups.replica_index * replica_size, (groups.replica_index + 1) * replica_size))
    crossing = [(name, ranks) for name, ranks in local_calls if not set(ranks) <= my_replica]
    assert not crossing, f"cross-replica collectives between rounds: {crossing}"
    assert len(local_calls) == profiled.count, (local_calls, profiled.calls)  # the recorder saw every collective

    before = full_parameters(engine.module, stage)
    everyone = gather_workers(before, WORLD)
    workers = everyone[::replica_size]  # rank k * replica_size speaks for replica k
    for r in range(WORLD):
        assert all(torch.equal(a, b) for a, b in zip(everyone[r], workers[r // replica_size])), "replica ranks differ"
    expected = simulate_round(workers, config, push_scale=PUSH_SCALE)[groups.replica_index]
    expected_distance = sum(distances_to_average(workers)) / len(workers)

    shard_numel = sum(t.numel() for t in dppf.consensus.layout.collect()[0])
    sent = dppf.stats.bytes_communicated
    with record_collective_groups(*captured) as round_calls:
        stats = dppf.round(PUSH_SCALE)
    after = full_parameters(engine.module, stage)
    worst = max((a - e).abs().max().item() for a, e in zip(after, expected))
    shard_group = tuple(range(groups.shard_index, WORLD, replica_size))
    cross = [name for name, ranks in round_calls if not set(ranks) <= my_replica]
    assert all(ranks == shard_group for name, ranks in round_calls if not set(ranks) <= my_replica), round_calls
    # the shard group carries this rank's shard (fp32) + the two distance statistics (fp64); the replica group the sums
    norm_bytes = 24 if replica_size > 1 and stage >= 1 else 0  # r_i^2, ||x_A||^2 and a non-finite count, fp64
    assert stats.bytes_communicated - sent == 4 * shard_numel + 16 + norm_bytes
    assert math.isclose(stats.distance_before, expected_distance, rel_tol=1e-6), (stats, expected_distance)
    if stage in (1, 2):  # what the optimizer steps from agrees with the model
        opt = engine.optimizer
        for master, bit16 in zip(opt.single_partition_of_fp32_groups, opt.parallel_partitioned_bit16_groups):
            assert torch.equal(master, bit16[groups.shard_index])
    reseeded = _poison_and_reseed(engine, dppf, groups, stage, after)
    engine.destroy()
    # calls between rounds whose group holds another process (flat mode: DeepSpeed still runs its reduce and gather on
    # the one-rank group, a local copy that sends nothing)
    sending = [(name, ranks) for name, ranks in local_calls if ranks != (rank,)]
    return {
        "worst": worst,
        "cross_calls": len(cross),
        "shard_numel": shard_numel,
        "sending_calls": len(sending),
        "reseeded": reseeded,
    }


def _poison_and_reseed(
    engine: Any, dppf: DeepSpeedDPPF, groups: ReplicaGroups, stage: int, before: list[torch.Tensor]
) -> bool:
    """
    A NaN in one shard of replica 1 (its last rank's): `ensure_finite` must re-seed every shard of replica 1 from the
    average of the healthy replicas, and leave those untouched.
    """
    bad = 1
    if groups.replica_index == bad and groups.shard_index == groups.replica_size - 1:
        with torch.no_grad():
            dppf.consensus.layout.collect()[0][0][0] = float("nan")
    reseeded = dppf.ensure_finite()
    after = full_parameters(engine.module, stage)
    replicas = gather_workers(before, WORLD)[:: groups.replica_size]
    healthy = [w for k, w in enumerate(replicas) if k != bad]
    if groups.replica_index == bad:
        expected = [torch.stack([w[j] for w in healthy]).mean(0) for j in range(len(before))]
    else:
        expected = before
    assert all(torch.allclose(a, e, atol=TOL, rtol=0) for a, e in zip(after, expected)), "re-seed mismatch"
    return reseeded


# The ranks of a replica see different batches, so they feed different losses; the replica's loss is their mean (5.5
# and 4.0: replica 1 leads). Each shard group electing by its own ranks' losses would pick replica 0 for shard 0
# (ranks 0 and 2: 1.0 < 4.0) and replica 1 for shard 1 (ranks 1 and 3: 10.0 > 4.0): a model of mixed halves.
RANK_LOSSES = [1.0, 10.0, 4.0, 4.0]
REPLICA_LOSSES = [5.5, 4.0]
REPLICA_GRAD_NORMS = [2.0, 0.5]  # the gradient norm of a replica (ZeRO's global norm) is the same on its ranks
STRATEGY_SETTINGS = {"easgd": {"alpha": 0.3, "beta": 0.5}, "lsgd": {"alpha": 0.4}, "grawa": {"alpha": 0.4}}


def _strategy_rounds(rank: int, stage: int) -> dict[str, float]:
    """easgd, lsgd and grawa across 2 ZeRO replicas of 2, two rounds each: == `simulate_consensus` on the replicas."""
    import deepspeed

    groups = ReplicaGroups.build(2)
    model = mlp(seed=groups.replica_index)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=groups.deepspeed_config(ds_config(stage)), mpu=groups
    )
    g = torch.Generator().manual_seed(rank)
    worst = {}
    for name, settings in STRATEGY_SETTINGS.items():
        dppf = DeepSpeedDPPF(engine, DPPFConfig(replica_size=2, strategy=name, tau=1000, **settings), groups)
        centre, worst[name] = None, 0.0
        for _ in range(2):  # easgd's second round starts from the centre variable the first one left
            train_step(engine, g)
            workers = gather_workers(full_parameters(engine.module, stage), WORLD)[::2]
            dppf.observe(loss=RANK_LOSSES[rank], grad_norm=REPLICA_GRAD_NORMS[groups.replica_index])
            expected = simulate_consensus(
                workers, dppf.config, losses=REPLICA_LOSSES, grad_norms=REPLICA_GRAD_NORMS, centre=centre
            )
            dppf.round()
            centre = expected.centre
            after = full_parameters(engine.module, stage)
            mine = expected.workers[groups.replica_index]
            worst[name] = max(worst[name], *((a - e).abs().max().item() for a, e in zip(after, mine)))
            if name == "lsgd":
                assert dppf.stats.leader == expected.leader == 1, (dppf.stats.leader, expected.leader)
    engine.destroy()
    return worst


def _accelerate_round(rank: int) -> dict[str, Any]:
    """The plain Accelerate loop of docs/deepspeed.md: `accelerator.prepare` inside `groups.routed_initialize()`."""
    from accelerate import Accelerator, DeepSpeedPlugin

    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    config = DPPFConfig(replica_size=2, **DPPF_CONFIG)
    groups = ReplicaGroups.build(config.replica_size)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(2)))
    model = mlp(seed=groups.replica_index)
    with groups.routed_initialize():
        engine, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    dppf = DeepSpeedDPPF(engine, config, groups)  # raises unless DeepSpeed's data-parallel group is the replica
    g = torch.Generator().manual_seed(rank)
    for _ in range(LOCAL_STEPS):
        x, y = torch.randn(4, 10, generator=g), torch.randn(4, 3, generator=g)
        accelerator.backward(torch.nn.functional.mse_loss(engine(x), y))
        optimizer.step()
        optimizer.zero_grad()
        assert dppf.step(PUSH_SCALE) is False
    workers = gather_workers(full_parameters(engine.module, 2), WORLD)[::2]
    expected = simulate_round(workers, config, push_scale=PUSH_SCALE)[groups.replica_index]
    dppf.round(PUSH_SCALE)
    after = full_parameters(engine.module, 2)
    return {
        "worst": max((a - e).abs().max().item() for a, e in zip(after, expected)),
        "dp_world_size": engine.dp_world_size,
        "replicas_differ": any(not torch.equal(a, b) for a, b in zip(*workers)),
    }


def _deepspeed_checks(rank: int, world_size: int) -> dict[str, Any]:
    results = {
        "zero2": _replica_round(rank, stage=2, replica_size=2),
        "zero3": _replica_round(rank, stage=3, replica_size=2),
        "flat_zero1": _replica_round(rank, stage=1, replica_size=1),
        "strategies_zero2": _strategy_rounds(rank, stage=2),
        "strategies_zero3": _strategy_rounds(rank, stage=3),
    }
    flat = ReplicaGroups.build(1)
    with pytest.raises(ValueError, match=r"ZeRO stage 3 and replica_size=1 is not possible.*--dppf_replica_size"):
        flat.deepspeed_config(ds_config(3))
    results["accelerate"] = _accelerate_round(rank)  # last: it leaves Accelerate's DeepSpeed state behind
    dist.barrier()
    return results


def test_zero_rounds_match_the_oracle_with_no_cross_replica_traffic_between_rounds():
    results = run_distributed(_deepspeed_checks, WORLD)
    n_params = sum(p.numel() for p in mlp(0).parameters())
    for rank, res in enumerate(results):
        for name in ("zero2", "zero3", "flat_zero1"):
            assert res[name]["worst"] <= TOL, (rank, name, res[name])
            assert res[name]["cross_calls"] == 2, res[name]  # one bucket of the shard + the distance statistics
        # ZeRO-2/3: each rank sends its own shard only (about half the parameters), flat: the whole model
        assert res["zero2"]["shard_numel"] < n_params and res["zero3"]["shard_numel"] < n_params
        assert res["flat_zero1"]["shard_numel"] == n_params
        for name, size in (("zero2", 2), ("zero3", 2), ("flat_zero1", 1)):  # every shard of replica 1, only those
            assert res[name]["reseeded"] == (rank // size == 1), (rank, name)
        assert res["flat_zero1"]["sending_calls"] == 0, "flat ZeRO-1 local steps must send nothing"
        assert res["zero2"]["sending_calls"] > 0  # ZeRO inside the replica does communicate every step
    assert sum(r["zero2"]["shard_numel"] for r in results[:2]) >= n_params
    for rank, res in enumerate(results):
        acc = res["accelerate"]
        assert acc["worst"] <= TOL and acc["dp_world_size"] == 2 and acc["replicas_differ"], (rank, acc)
    for rank, res in enumerate(results):  # easgd, lsgd, grawa: every shard follows its replica's centre
        for stage in ("strategies_zero2", "strategies_zero3"):
            assert res[stage].keys() == STRATEGY_SETTINGS.keys()
            assert all(v <= TOL for v in res[stage].values()), (rank, stage, res[stage])


def test_replica_config_gathers_zero3_weights_on_save_without_touching_the_users_dict(caplog):
    groups = ReplicaGroups(2, 2, 0, 0, replica_group=None, shard_group=None, solo_group=None)  # no collective needed
    user = ds_config(3)
    config = groups.deepspeed_config(user)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in user["zero_optimization"]  # the caller's dict is intact
    assert config["train_batch_size"] == 4 * 1 * 2  # micro x accumulation x replica_size
    assert (
        "stage3_gather_16bit_weights_on_model_save" not in groups.deepspeed_config(ds_config(2))["zero_optimization"]
    )
    user["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with caplog.at_level("WARNING", logger="hf_dppf.integrations.deepspeed"):
        assert groups.deepspeed_config(user)["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert "stage3_gather_16bit_weights_on_model_save=false is overridden" in caplog.text


@pytest.mark.parametrize("stage", [2, 3])
def test_flat_mode_refuses_sharded_zero_stages(stage):
    with pytest.raises(ValueError, match=rf"ZeRO stage {stage} and replica_size=1 is not possible.*replica groups"):
        check_zero_stage(stage, replica_size=1)
    check_zero_stage(stage, replica_size=2)
    for ok in (0, 1):
        check_zero_stage(ok, replica_size=1)


# ---------------------------------------------------------------------------------------------------- Trainer


def trainer_ds_config(stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }


TRAINER_RUN = dict(
    dppf=True,
    dppf_tau=3,  # does not divide the resume step 4: the round schedule must come from the checkpoint
    dppf_replica_size=2,
    max_steps=8,
    logging_steps=1,
    save_strategy="steps",
    save_steps=4,
    use_cpu=False,  # DeepSpeed's CPU accelerator (Accelerate refuses DeepSpeed with cpu=True); gloo underneath
    accelerator_config={"use_configured_state": True},
)


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested checkpoint contents (tensors, dicts, lists, numbers, strings)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _trainer_resume(rank: int, world_size: int, tmp: str, stage: int) -> dict[str, Any]:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")

    def trainer(run: str, seed: int) -> DPPFTrainer:
        AcceleratorState._reset_state()  # one DeepSpeed plugin per Accelerator; the process group is kept
        args = make_args(f"{tmp}/{run}", deepspeed=trainer_ds_config(stage), **TRAINER_RUN)
        return DPPFTrainer(model=tiny_bert(seed), args=args, train_dataset=toy_data())

    straight = trainer("a", seed=1)
    straight.train()
    # A fresh trainer and a model initialised differently: everything must come from the checkpoint.
    resumed = trainer("b", seed=7)
    resumed.train(resume_from_checkpoint=f"{tmp}/a/checkpoint-4")

    def replica_file(run: str, name: str, replica: int, step: int = 8) -> str:
        return f"{tmp}/{run}/checkpoint-{step}/{DPPF_CHECKPOINT_DIR}/replica{replica}/{DEEPSPEED_TAG}/{name}"

    def losses(trainer: DPPFTrainer) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > 4}

    def optimizer_shard(path: str) -> list[Any]:
        """This rank's fp32 master partition and optimizer state, as DeepSpeed saved them."""
        state = torch.load(path, weights_only=False)["optimizer_state_dict"]
        if stage == 3:
            return [state["fp32_flat_groups"], state["optimizer_state_dict"]]
        return [state["single_partition_of_fp32_groups"], state["base_optimizer_state"]]

    replica, shard = divmod(rank, 2)
    shard_file = f"zero_pp_rank_{shard}_mp_rank_00_optim_states.pt"
    out = {
        "optimizer_shard": _same(*(optimizer_shard(replica_file(run, shard_file, replica)) for run in ("a", "b"))),
        "losses": (losses(straight), losses(resumed)),
        "final": _same(full_parameters(straight.model, stage), full_parameters(resumed.model, stage)),
        "rounds": (straight.dppf_engine.stats.rounds, resumed.dppf_engine.stats.rounds),
    }
    # After train() every worker holds the average; save_model writes it once (ZeRO-3 gathers it inside the replica).
    straight.save_model(f"{tmp}/a/final")
    names = [n for n, _ in straight.model.named_parameters()]
    # numpy arrays travel to the test process by value (tensors would go through shared memory that dies with us)
    out["final_weights"] = {n: t.numpy() for n, t in zip(names, full_parameters(straight.model, stage))}
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from safetensors.torch import load_file

        def own(run: str, replica: int) -> dict[str, torch.Tensor]:
            """A replica's own weights at step 8, rebuilt from its ZeRO shards by DeepSpeed's zero_to_fp32."""
            folder = f"{tmp}/{run}/checkpoint-8/{DPPF_CHECKPOINT_DIR}/replica{replica}"
            return get_fp32_state_dict_from_zero_checkpoint(folder, tag=DEEPSPEED_TAG)

        a0, a1, b0, b1 = own("a", 0), own("a", 1), own("b", 0), own("b", 1)
        saved = load_file(f"{tmp}/a/checkpoint-8/model.safetensors")
        out["own_weights_resumed"] = _same(a0, b0) and _same(a1, b1)
        out["replicas_differ"] = any(not torch.equal(a0[k], a1[k]) for k in a0)
        out["saved_is_average"] = set(a0) <= set(saved) and all(
            torch.allclose(saved[k], (a0[k] + a1[k]) / 2, atol=1e-7) for k in a0
        )
        out["final_saved"] = {k: t.numpy() for k, t in load_file(f"{tmp}/a/final/model.safetensors").items()}
        # the only DeepSpeed checkpoints are the replicas' own (none at the top, where replicas would collide)
        out["top_level"] = sorted(str(x.relative_to(tmp)) for x in Path(tmp).glob("*/*/global_step*"))
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_replica_groups_resume_exactly(tmp_path, stage):
    """ZeRO-2 and ZeRO-3 inside 2 replicas of 2: resume == uninterrupted run; checkpoints hold the average."""
    results = run_distributed(_trainer_resume, WORLD, str(tmp_path), stage, init=False)
    for rank, out in enumerate(results):
        straight, resumed = out["losses"]
        assert straight and straight == resumed, (rank, straight, resumed)
        assert out["optimizer_shard"], f"rank {rank}: ZeRO optimizer shard after the resume differs"
        assert out["final"], f"rank {rank}: final model differs after the resume"
        # rounds after steps 3 and 6, plus the final average at the end of train()
        assert out["rounds"] == (3, 3), out["rounds"]
        mine, first = out["final_weights"], results[0]["final_weights"]
        assert mine.keys() == first.keys() and all(np.array_equal(mine[k], first[k]) for k in mine), rank
    first = results[0]
    assert first["own_weights_resumed"] and first["replicas_differ"]
    assert first["saved_is_average"], "the checkpoint's model.safetensors is not the replicas' average"
    saved = first["final_saved"]
    assert all(np.array_equal(saved[k], v) for k, v in first["final_weights"].items() if k in saved)
    assert set(first["final_weights"]) - set(saved) <= {"bert.embeddings.position_ids"}, set(first["final_weights"])
    assert first["top_level"] == [], first["top_level"]


# ---------------------------------------------------------------------------------------------------- launcher


REPO = Path(__file__).resolve().parents[1]


def test_recipe_under_accelerate_launch_with_the_cpu_deepspeed_config(tiny_classifier, tmp_path):  # noqa: F811
    """The README command: ZeRO-2, 2 replicas x 2 processes, from `accelerate_configs/deepspeed_zero2_cpu.yaml`."""
    config = str(REPO / "accelerate_configs" / "deepspeed_zero2_cpu.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    command += ["--main_process_port", str(free_port()), str(REPO / "recipes" / "text_classification.py")]
    command += ["--dppf", "--dppf_replica_size", "2", "--use_cpu", "false", "--ddp_backend", "gloo"]
    command += ["--model_name_or_path", tiny_classifier, "--output_dir", str(tmp_path / "out")]
    command += ["--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "32"]
    command += ["--max_steps", "4", "--logging_steps", "2", "--dppf_tau", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=launcher_env(), timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "(32 examples, 4 processes)" in out and "DPPF: 2 rounds" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()
