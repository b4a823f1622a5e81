"""
What every integration does around the engine at each optimizer step, written once: the push schedule (`initial_lr`,
`lr_push_scale`), DDP silencing (`silence_ddp`, `restore_ddp`), optimizer unwrapping (`inner_optimizer`), the resets
after a round (`after_round`), and one worker's resume files in a checkpoint (`save_worker_state`,
`load_worker_state`). The DPPF block (`accelerate.py`) and `DPPFTrainer` (`trainer.py`) both call these, so they never
import one another. Imports: torch, safetensors, `hf_dppf.config` and `hf_dppf.engine` only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model

from ..config import DPPFConfig
from ..engine import DPPFConsensus

logger = logging.getLogger(__name__)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind Accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch optimizer or an AcceleratedOptimizer, got {type(optimizer)}.")
    return inner


def initial_lr(optimizer: torch.optim.Optimizer) -> float:
    """`lr_0` of the first parameter group: the scheduler's `initial_lr` when there is one, else the current lr."""
    group = optimizer.param_groups[0]
    return float(group.get("initial_lr", group["lr"]))


def lr_push_scale(config: DPPFConfig, optimizer: torch.optim.Optimizer, lr0: float) -> float:
    """
    The `push_scale` of a round: `lr_t / lr_0` of the first parameter group under `lam_schedule="lr"` (1.0 when
    `lr_0` is 0), 1.0 under `"constant"`.
    """
    if config.lam_schedule != "lr" or not lr0:
        return 1.0
    return float(optimizer.param_groups[0]["lr"]) / lr0


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """
    Forget a re-seeded worker's optimizer state (moments built on its NaN/Inf weights would poison it again): torch
    optimizers rebuild the state lazily at the next step. The schedule (param groups' lr) is kept.
    """
    optimizer.state.clear()
    logger.warning("DPPF: this worker was re-seeded from the healthy workers' average; its optimizer state is reset.")


def after_round(engine: DPPFConsensus, optimizer: torch.optim.Optimizer | None) -> None:
    """What an integration does after a round or a finiteness check: reset the optimizer of a re-seeded worker."""
    if engine.last_reseeded and optimizer is not None:
        reset_optimizer_state(optimizer)


def silence_ddp(model: torch.nn.Module, saved: dict[str, bool] | None = None) -> dict[str, bool]:
    """
    Switch off a `DistributedDataParallel` module's gradient all-reduce and forward buffer broadcast. Call it again at
    every step: `accelerator.trigger_sync_in_backward` and friends set the flags back to True.

    Args:
        model (`torch.nn.Module`): the (possibly DDP-wrapped) model.
        saved (`dict[str, bool]`, *optional*): what an earlier call returned; kept, so `restore_ddp` gets the flags
            as they were before the first call.

    Returns:
        `dict[str, bool]`: the original flags, for `restore_ddp` (empty when `model` is not DDP-wrapped).
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return {}
    flags = saved or {
        "require_backward_grad_sync": model.require_backward_grad_sync,
        "require_forward_param_sync": model.require_forward_param_sync,
    }
    model.require_backward_grad_sync = False
    model.require_forward_param_sync = False
    return flags


def restore_ddp(model: torch.nn.Module, flags: dict[str, bool]) -> None:
    """Give a DDP module back the flags that `silence_ddp` returned."""
    for name, value in flags.items():
        setattr(model, name, value)


# One worker's resume state inside a checkpoint: `<checkpoint>/dppf/rank{r}/` (the Trainer's layout too).
DPPF_CHECKPOINT_DIR = "dppf"
WORKER_WEIGHTS_NAME = "model.safetensors"
WORKER_OPTIMIZER_NAME = "optimizer.pt"
WORKER_STATE_NAME = "dppf_state.json"
WORKER_CENTRE_NAME = "centre.safetensors"  # easgd's centre variable (engine state that is tensors)


def worker_dir(checkpoint: str, rank: int) -> str:
    """Where rank `rank` keeps its own weights, optimizer and engine state in `checkpoint`."""
    return os.path.join(checkpoint, DPPF_CHECKPOINT_DIR, f"rank{rank}")


def save_worker_state(
    folder: str,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    engine: DPPFConsensus,
    extra: dict[str, Any] | None = None,
) -> None:
    """
    Write this worker's own weights (safetensors), optimizer state, engine state (JSON; easgd's centre in
    safetensors) and the world size into `folder`. An overlapped round in flight lands first (a collective: call it on
    every rank). `extra` maps a name to an object whose `state_dict()` is saved as `<name>.pt` (e.g. a grad scaler).
    """
    engine.finish()
    os.makedirs(folder, exist_ok=True)
    save_model(module, os.path.join(folder, WORKER_WEIGHTS_NAME), force_contiguous=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(folder, WORKER_OPTIMIZER_NAME))
    for name, obj in (extra or {}).items():
        torch.save(obj.state_dict(), os.path.join(folder, f"{name}.pt"))
    state = engine.state_dict()
    centre = state.pop("centre", {})
    if centre:
        save_file({k: v.contiguous() for k, v in centre.items()}, os.path.join(folder, WORKER_CENTRE_NAME))
    with open(os.path.join(folder, WORKER_STATE_NAME), "w") as f:
        json.dump({"world_size": engine.world_size, "engine": state}, f, indent=2)


def check_worker_state(folder: str, world_size: int, checkpoint: str) -> None:
    """Raise a clear `ValueError` unless `folder` holds a worker state written by `world_size` workers."""
    path = os.path.join(folder, WORKER_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"Checkpoint {checkpoint} has no DPPF state for this rank ({path} is missing): it was written by fewer "
            f"DPPF workers than this run's {world_size}, or without DPPF. An exact resume needs the same number of "
            "processes; to start a new run from it, load its model without resuming."
        )
    with open(path) as f:
        saved = json.load(f)["world_size"]
    if saved != world_size:
        raise ValueError(
            f"Checkpoint {checkpoint} was written by {saved} DPPF workers, this run has {world_size}: an exact resume "
            "needs the same number of processes. To start a new run from it, load its model without resuming."
        )


def load_worker_state(
    folder: str,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    engine: DPPFConsensus,
    extra: dict[str, Any] | None = None,
) -> None:
    """
    Restore what `save_worker_state` wrote: the weights are copied into the parameters in place (the engine's flat
    buffers stay), then the optimizer state, each `extra` object's `load_state_dict`, and the engine's state; every
    rank then checks that all resumed from the same step (a collective).
    """
    engine.finish()  # a round of the run before the load must not land on the loaded weights
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    load_model(module, os.path.join(folder, WORKER_WEIGHTS_NAME), device=str(device))
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(os.path.join(folder, WORKER_OPTIMIZER_NAME), map_location=device, weights_only=True)
        )
    for name, obj in (extra or {}).items():
        obj.load_state_dict(torch.load(os.path.join(folder, f"{name}.pt"), weights_only=True))
    with open(os.path.join(folder, WORKER_STATE_NAME)) as f:
        state = json.load(f)["engine"]
    centre = os.path.join(folder, WORKER_CENTRE_NAME)
    if os.path.isfile(centre):
        state["centre"] = load_file(centre, device=str(device))
    engine.load_state_dict(state)
    engine.verify_ranks()


@dataclass(frozen=True)
class ReplicaGroups:
    """
    The process groups of a replica-group run: `replica_size` neighbouring ranks form one replica (one DPPF worker),
    so on a GPU node a replica's every-step traffic stays on the fast links. Under DeepSpeed ZeRO shards the replica;
    without it every rank holds the whole replica and its gradients are averaged over the replica every step.

    Attributes:
        replica_size (`int`): processes per replica (its data-parallel degree).
        num_replicas (`int`): DPPF workers.
        replica_index (`int`): this process's replica.
        shard_index (`int`): this process's rank inside its replica (which shard of the round it holds).
        replica_group (`ProcessGroup`): the ranks of this replica (its data-parallel group).
        shard_group (`ProcessGroup`): the ranks holding the same shard in every replica (the DPPF round's group).
        solo_group (`ProcessGroup`): this rank alone (DeepSpeed's model-parallel group: no model parallelism).
    """

    replica_size: int
    num_replicas: int
    replica_index: int
    shard_index: int
    replica_group: dist.ProcessGroup
    shard_group: dist.ProcessGroup
    solo_group: dist.ProcessGroup

    @classmethod
    def build(cls, replica_size: int) -> ReplicaGroups:
        """
        Create the groups (a collective: every rank of the initialised default group calls it, in the same order).

        Args:
            replica_size (`int`): processes per replica; must divide the world size.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ReplicaGroups.build needs an initialised torch.distributed process group.")
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(replica_size, bool) or not isinstance(replica_size, int) or replica_size < 1:
            raise ValueError(f"replica_size={replica_size!r} is invalid: it must be an integer >= 1.")
        if world % replica_size:
            raise ValueError(
                f"replica_size={replica_size} is invalid for {world} processes: it must divide the number of "
                f"processes (valid: {[g for g in range(1, world + 1) if world % g == 0]})."
            )
        replicas = world // replica_size
        by_replica = [list(range(k * replica_size, (k + 1) * replica_size)) for k in range(replicas)]
        by_shard = [list(range(s, world, replica_size)) for s in range(replica_size)]
        replica_group, _ = dist.new_subgroups_by_enumeration(by_replica)
        shard_group, _ = dist.new_subgroups_by_enumeration(by_shard)
        solo_group = (
            replica_group if replica_size == 1 else dist.new_subgroups_by_enumeration([[r] for r in range(world)])[0]
        )
        return cls(
            replica_size, replicas, rank // replica_size, rank % replica_size, replica_group, shard_group, solo_group
        )
