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


def silence_ddp(
    model: torch.nn.Module, saved: dict[str, bool] | None = None, gradients: bool = True
) -> dict[str, bool]:
    """
    Switch off a `DistributedDataParallel` module's gradient all-reduce and forward buffer broadcast. Call it again at
    every step: `accelerator.trigger_sync_in_backward` and friends set the flags back to True.

    Args:
        model (`torch.nn.Module`): the (possibly DDP-wrapped) model.
        saved (`dict[str, bool]`, *optional*): what an earlier call returned; kept, so `restore_ddp` gets the flags
            as they were before the first call.
        gradients (`bool`, defaults to `True`): switch off the gradient all-reduce too (`False` for replicas of
            several processes, whose DDP averages the gradients inside the replica: `sync_gradients_in_replica`).

    Returns:
        `dict[str, bool]`: the original flags, for `restore_ddp` (empty when `model` is not DDP-wrapped).
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return {}
    flags = saved or {
        "require_backward_grad_sync": model.require_backward_grad_sync,
        "require_forward_param_sync": model.require_forward_param_sync,
    }
    if gradients:
        model.require_backward_grad_sync = False
    model.require_forward_param_sync = False
    return flags


def restore_ddp(model: torch.nn.Module, flags: dict[str, bool]) -> None:
    """Give a DDP module back the flags that `silence_ddp` returned."""
    for name, value in flags.items():
        setattr(model, name, value)


# One worker's resume state inside a checkpoint: `<checkpoint>/dppf/rank{r}/`, or `<checkpoint>/dppf/replica{k}/` for
# a worker that is a replica of several processes (the Trainer's layout too).
DPPF_CHECKPOINT_DIR = "dppf"
REPLICA_DIR = "replica{}"
WORKER_WEIGHTS_NAME = "model.safetensors"
WORKER_OPTIMIZER_NAME = "optimizer.pt"
WORKER_STATE_NAME = "dppf_state.json"
WORKER_CENTRE_NAME = "centre.safetensors"  # easgd's centre variable (engine state that is tensors)


def worker_dir(checkpoint: str, rank: int, replicated: bool = False) -> str:
    """Where worker `rank` (a process, or with `replicated` the replica of that index) keeps its resume state."""
    name = REPLICA_DIR.format(rank) if replicated else f"rank{rank}"
    return os.path.join(checkpoint, DPPF_CHECKPOINT_DIR, name)


def engine_dir(checkpoint: str, engine: DPPFConsensus) -> str:
    """`worker_dir` of the worker that `engine` runs (its replica when it is one of several processes)."""
    return worker_dir(checkpoint, engine.rank, engine.replica_size > 1)


def shard_file(folder: str, name: str, engine: DPPFConsensus) -> str:
    """A file of this process's own in a worker folder: `name`, or `shard{j}-name` for process j of a replica."""
    return os.path.join(folder, name if engine.replica_size == 1 else f"shard{engine.replica_rank}-{name}")


def save_worker_state(
    folder: str,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    engine: DPPFConsensus,
    extra: dict[str, Any] | None = None,
) -> None:
    """
    Write this worker's own weights (safetensors), optimizer state, engine state (JSON; easgd's centre in
    safetensors) and the number of workers into `folder`. An overlapped round in flight lands first (a collective: call
    it on every rank). `extra` maps a name to an object whose `state_dict()` is saved as `<name>.pt` (e.g. a grad
    scaler). In a replica of several processes, which hold the same weights and optimizer state, the first process
    writes those once; every process writes its own engine state (what it observed, its shard of easgd's centre).
    """
    engine.finish()
    os.makedirs(folder, exist_ok=True)
    if engine.replica_rank == 0:
        save_model(module, os.path.join(folder, WORKER_WEIGHTS_NAME), force_contiguous=True)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(folder, WORKER_OPTIMIZER_NAME))
        for name, obj in (extra or {}).items():
            torch.save(obj.state_dict(), os.path.join(folder, f"{name}.pt"))
    state = engine.state_dict()
    centre = state.pop("centre", {})
    if centre:
        save_file({k: v.contiguous() for k, v in centre.items()}, shard_file(folder, WORKER_CENTRE_NAME, engine))
    saved = {"world_size": engine.world_size, "replica_size": engine.replica_size, "engine": state}
    with open(shard_file(folder, WORKER_STATE_NAME, engine), "w") as f:
        json.dump(saved, f, indent=2)


def check_worker_state(folder: str, engine: DPPFConsensus, checkpoint: str) -> dict[str, Any]:
    """
    Raise a clear `ValueError` unless `folder` holds a worker state written by as many workers, of as many processes
    each, as `engine` has; return that state.
    """
    path = shard_file(folder, WORKER_STATE_NAME, engine)
    if not os.path.isfile(path):
        raise ValueError(
            f"Checkpoint {checkpoint} has no DPPF state for this rank ({path} is missing): it was written by fewer "
            f"DPPF workers than this run's {engine.world_size}, by replicas of another size, or without DPPF. An "
            "exact resume needs the same processes; to start a new run from it, load its model without resuming."
        )
    with open(path) as f:
        saved = json.load(f)
    workers, size = saved["world_size"], saved.get("replica_size", 1)
    if (workers, size) != (engine.world_size, engine.replica_size):
        replicas = f" (replicas of {size} processes)" if size > 1 else ""
        now = f" (replicas of {engine.replica_size})" if engine.replica_size > 1 else ""
        raise ValueError(
            f"Checkpoint {checkpoint} was written by {workers} DPPF workers{replicas}, this run has "
            f"{engine.world_size}{now}: an exact resume needs the same processes. To start a new run from it, load "
            "its model without resuming."
        )
    return saved


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
    with open(shard_file(folder, WORKER_STATE_NAME, engine)) as f:
        state = json.load(f)["engine"]
    centre = shard_file(folder, WORKER_CENTRE_NAME, engine)
    if os.path.isfile(centre):
        state["centre"] = load_file(centre, device=str(device))
    engine.load_state_dict(state)
    engine.verify_ranks()


class ReplicaGradients:
    """
    The state of the DDP communication hook that averages gradients over one replica (`sync_gradients_in_replica`):
    over `group` while `active`, else over DDP's own group, as the stock hook would.
    """

    def __init__(self, group: dist.ProcessGroup, ddp_group: dist.ProcessGroup | None) -> None:
        self.group, self.ddp_group, self.active = group, ddp_group, True


def _replica_allreduce(state: ReplicaGradients, bucket):
    """DDP's communication hook: average one gradient bucket (a `dist.GradBucket`) over the replica."""
    group = state.group if state.active else state.ddp_group
    tensor = bucket.buffer().div_(dist.get_world_size(group))
    return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def sync_gradients_in_replica(model: torch.nn.Module, group: dist.ProcessGroup) -> ReplicaGradients:
    """
    Make a `DistributedDataParallel` model average its gradients over `group` (one replica) instead of every process:
    DDP's own reducer, buckets and overlap with the backward pass, gradient accumulation (`no_sync`) and all, with a
    communication hook. DDP cannot remove a hook: set the returned state's `active = False` to average over DDP's group
    again, as the stock DDP does.

    Args:
        model (`torch.nn.Module`): the DDP-wrapped model (`accelerator.prepare`, the Trainer's wrap).
        group (`ProcessGroup`): the replica's processes.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"replica_size > 1 averages the gradients inside each replica with DistributedDataParallel, but the model "
            f"is a {type(model).__name__}: pass the model that accelerator.prepare returned (DDP-wrapped), launched "
            "on several processes."
        )
    if getattr(model, "find_unused_parameters", False):
        logger.warning(
            "DPPF replicas: the DDP model searches for unused parameters (find_unused_parameters=True), which "
            "all-reduces a small bitmap over every process at every step, across replicas. Build it with "
            "find_unused_parameters=False (Trainer: --ddp_find_unused_parameters false) unless the model needs it."
        )
    state = getattr(model, "_dppf_replica_gradients", None)
    if state is None:
        state = ReplicaGradients(group, getattr(model, "process_group", None))
        try:
            model.register_comm_hook(state, _replica_allreduce)
        except RuntimeError as err:
            raise ValueError(
                "replica_size > 1 needs DDP's communication hook, but the model already has one (e.g. "
                "DistributedDataParallelKwargs(comm_hook=...)): remove it, or use replica_size=1."
            ) from err
        model._dppf_replica_gradients = state
    state.group, state.active = group, True
    return state


def build_engine(
    module: torch.nn.Module, ddp_model: torch.nn.Module, config: DPPFConfig, groups: ReplicaGroups | None
) -> tuple[DPPFConsensus, ReplicaGradients | None]:
    """
    The engine of a run without DeepSpeed: one worker per process, or, with replica groups of several processes, one
    per replica, whose DDP model (`ddp_model`) then averages the gradients inside the replica (the returned state;
    set its `active = False` when DPPF ends).
    """
    if groups is None or groups.replica_size == 1:
        return DPPFConsensus(module, config), None
    gradients = sync_gradients_in_replica(ddp_model, groups.replica_group)
    engine = DPPFConsensus(module, config, process_group=groups.shard_group, replica_group=groups.replica_group)
    return engine, gradients


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
            raise RuntimeError(
                f"replica_size={replica_size} needs several processes with an initialised torch.distributed process "
                "group: launch with torchrun or accelerate launch (on CPU, Accelerator(cpu=True)), or use "
                "replica_size=1."
            )
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
