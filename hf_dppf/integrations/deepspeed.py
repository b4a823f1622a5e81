"""
DPPF under DeepSpeed ZeRO: replica groups, ZeRO inside a group, DPPF across groups.

The world is `replica_size x num_replicas` processes; rank `r` is shard `r % replica_size` of replica
`r // replica_size` (a replica's ranks are neighbours, so on a GPU node ZeRO's every-step traffic stays on the fast
links). Inside a replica ZeRO shards and synchronises every step as usual: DeepSpeed is handed the replica's group
as its data-parallel group. Across replicas the workers take local steps and meet every `tau` optimizer steps in a
DPPF round, where each rank exchanges only its own shard, with the same shard of the other replicas, and the global
distance `r_i` is assembled from per-shard sums of squares. The round acts on what the optimizer steps from (ZeRO's
fp32 master partitions), then refreshes the model's own copy the way the ZeRO step itself does. Optimizer states stay
local and sharded; nothing crosses replicas between rounds.

`replica_size = 1` (flat) makes every process a worker: ZeRO-0 or ZeRO-1 over a one-rank group, i.e. true local steps
with no gradient all-reduce. ZeRO-2/3 shard gradients or parameters, so they need `replica_size > 1`.

Example:
    ```python
    groups = ReplicaGroups.build(replica_size=2)  # a collective: every rank calls it
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=groups.deepspeed_config(ds_config), mpu=groups
    )
    dppf = DeepSpeedDPPF(engine, DPPFConfig(tau=4, replica_size=2), groups)
    for batch in loader:
        engine.backward(engine(batch).loss)
        engine.step()
        if engine.is_gradient_accumulation_boundary():
            dppf.step()
    ```
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..config import DPPFConfig
from ..engine import DPPFConsensus, DPPFStats
from . import common

logger = logging.getLogger(__name__)

# ZeRO stages that shard what a local step needs (gradients or parameters): a rank cannot step on its own.
SHARDED_STEP_STAGES = (2, 3)


def check_zero_stage(stage: int, replica_size: int) -> None:
    """
    Refuse a ZeRO stage that cannot take local steps at this `replica_size` (raises `ValueError` saying why).

    Args:
        stage (`int`): the ZeRO stage (0 to 3).
        replica_size (`int`): processes per DPPF worker (`DPPFConfig.replica_size`).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} is invalid: it must be 0, 1, 2 or 3.")
    if replica_size == 1 and stage in SHARDED_STEP_STAGES:
        raise ValueError(
            f"DPPF with ZeRO stage {stage} and replica_size=1 is not possible: ZeRO-{stage} shards the "
            f"{'gradients' if stage == 2 else 'parameters'} over the data-parallel ranks, so no rank can take a local "
            "step on its own. Use replica groups (--dppf_replica_size G with G > 1 dividing the number of processes: "
            "ZeRO shards inside each group of G ranks, DPPF runs across the groups), or ZeRO stage 0 or 1."
        )


def zero_stage_of(ds_config: dict[str, Any] | str) -> int:
    """The ZeRO stage of a DeepSpeed config (a dict or a JSON file path); 0 when it has no `zero_optimization`."""
    return int(_load_config(ds_config).get("zero_optimization", {}).get("stage", 0))


def _load_config(ds_config: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(ds_config, str):
        with open(ds_config) as f:
            return json.load(f)
    if not isinstance(ds_config, dict):
        raise TypeError(f"a DeepSpeed config must be a dict or a JSON file path, got {type(ds_config).__name__}.")
    return ds_config


class ReplicaGroups(common.ReplicaGroups):
    """
    `common.ReplicaGroups` as DeepSpeed's model-parallel unit (`mpu`): it hands DeepSpeed the replica's group as its
    data-parallel group (`deepspeed.initialize(..., mpu=groups)`), and a replica's DeepSpeed config.
    """

    # ------------------------------------------------------------------ the mpu protocol DeepSpeed queries
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.replica_group

    def get_data_parallel_world_size(self) -> int:
        return self.replica_size

    def get_data_parallel_rank(self) -> int:
        return self.shard_index

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.replica_group)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.solo_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    # ------------------------------------------------------------------ configs
    def deepspeed_config(self, ds_config: dict[str, Any] | str) -> dict[str, Any]:
        """
        A copy of `ds_config` for one replica: the ZeRO stage is checked against `replica_size`, and
        `train_batch_size` (DeepSpeed counts it over its data-parallel group) becomes the replica's batch,
        `train_micro_batch_size_per_gpu x gradient_accumulation_steps x replica_size` (or, when only
        `train_batch_size` is given, that world batch divided by the number of replicas).

        Under ZeRO-3, `stage3_gather_16bit_weights_on_model_save` is switched on: saving a model then gathers the
        replica's shards into one state dict that the main process writes (the workers' average, as every DPPF save
        is). Without it the `Trainer` falls back to writing a DeepSpeed checkpoint from every process, and the
        replicas, whose shard files share their names, would overwrite each other's files.
        """
        config = dict(_load_config(ds_config))
        stage = zero_stage_of(config)
        check_zero_stage(stage, self.replica_size)
        if stage == 3:
            zero = dict(config["zero_optimization"])
            if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
                logger.warning(
                    "DPPF: stage3_gather_16bit_weights_on_model_save=false is overridden: with replica groups the "
                    "model is saved as one gathered state dict (the workers' average)."
                )
            zero["stage3_gather_16bit_weights_on_model_save"] = True
            config["zero_optimization"] = zero
        micro, accumulation = (
            config.get("train_micro_batch_size_per_gpu"),
            config.get("gradient_accumulation_steps", 1),
        )
        if isinstance(micro, int) and isinstance(accumulation, int):
            config["train_batch_size"] = micro * accumulation * self.replica_size
        elif isinstance(config.get("train_batch_size"), int):
            if config["train_batch_size"] % self.num_replicas:
                raise ValueError(
                    f"train_batch_size={config['train_batch_size']} is invalid with {self.num_replicas} replicas: it "
                    "must be a multiple of the number of replicas."
                )
            config["train_batch_size"] //= self.num_replicas
        return config

    @contextlib.contextmanager
    def routed_initialize(self) -> Iterator[None]:
        """
        Inside the block, `deepspeed.initialize` (as Accelerate and the `Trainer` call it) gets `mpu=self` and the
        replica's config (`deepspeed_config`). Accelerate has no argument for DeepSpeed's data-parallel group.
        """
        import deepspeed

        original = deepspeed.initialize

        def initialize(*args: Any, **kwargs: Any):
            if kwargs.get("mpu") is not None:
                raise ValueError("DPPF replica groups are DeepSpeed's mpu; another mpu cannot be combined with them.")
            for key in ("config", "config_params"):
                if kwargs.get(key) is not None:
                    kwargs[key] = self.deepspeed_config(kwargs[key])
            return original(*args, mpu=self, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original


class DeepSpeedDPPF:
    """
    DPPF rounds across the replicas of a DeepSpeed engine (ZeRO stage 0 to 3), shard by shard.

    Args:
        engine (`deepspeed.DeepSpeedEngine`): built with `mpu=groups` (its data-parallel group is one replica).
        config (`DPPFConfig`): the round's rule; `config.replica_size` must equal `groups.replica_size`.
        groups (`ReplicaGroups`): the groups the engine was built with.

    The engine's round (a `DPPFConsensus` over `groups.shard_group`) pulls and pushes what the optimizer steps from:
    ZeRO-1/2's and ZeRO-3's fp32 partitions (without their alignment padding), ZeRO-0's parameters. The model's own
    copy is then refreshed as after an optimizer step (ZeRO-1/2: bit16 partitions and an all-gather inside the
    replica; ZeRO-3: partitions and the persistent parameters), so forward passes, checkpoints and the optimizer agree.
    """

    def __init__(self, engine: Any, config: DPPFConfig, groups: ReplicaGroups) -> None:
        if config.replica_size != groups.replica_size:
            raise ValueError(
                f"DPPFConfig.replica_size={config.replica_size} but the replica groups have {groups.replica_size} "
                "ranks per replica: build the groups with the config's replica_size."
            )
        self.stage = int(engine.zero_optimization_stage())
        check_zero_stage(self.stage, groups.replica_size)
        if engine.dp_world_size != groups.replica_size:
            raise ValueError(
                f"The DeepSpeed engine's data-parallel group has {engine.dp_world_size} ranks, not replica_size="
                f"{groups.replica_size}: build it with deepspeed.initialize(..., mpu=groups) (or inside "
                "groups.routed_initialize())."
            )
        if self.stage == 3:
            spans = {dist.get_world_size(p.ds_process_group) for p in engine.module.parameters()}
            if spans != {groups.replica_size}:
                raise ValueError(
                    f"ZeRO-3 partitioned the parameters over {sorted(spans)} processes, not over the replica's "
                    f"{groups.replica_size}: the model was built under zero.Init over the whole world (Accelerate's "
                    "zero3_init_flag, on by default for stage 3, or HfDeepSpeedConfig before from_pretrained). Set "
                    "zero3_init_flag: false (accelerate config or --zero3_init_flag false); DeepSpeed then partitions "
                    "the model inside each replica when the engine is built."
                )
        self.engine, self.groups, self.config = engine, groups, config
        masters = self._master_tensors()
        sharded = self.stage >= 1 and groups.replica_size > 1
        self.consensus = DPPFConsensus(
            masters, config, process_group=groups.shard_group, norm_group=groups.replica_group if sharded else None
        )

    @property
    def stats(self) -> DPPFStats:
        """The round statistics (bytes count the round's own collectives, not ZeRO's refresh inside a replica)."""
        return self.consensus.stats

    def _master_tensors(self) -> list[torch.Tensor]:
        optimizer = self.engine.optimizer
        if self.stage == 0:
            if self.engine.fp16_enabled() or self.engine.bfloat16_enabled():
                raise ValueError(
                    "DPPF with ZeRO stage 0 needs fp32 training (the round acts on the parameters the optimizer "
                    "steps); for fp16/bf16 use ZeRO stage 1, whose fp32 master partitions the round moves."
                )
            return [p for p in self.engine.module.parameters() if p.requires_grad]
        if self.stage in (1, 2):  # one flat partition per parameter group; alignment padding at its end
            return [
                flat[: flat.numel() - pad]
                for flat, pad in zip(optimizer.single_partition_of_fp32_groups, optimizer.groups_padding)
                if flat.numel() > pad
            ]
        if any(flat is None for flat in optimizer.fp16_partitioned_groups_flat):
            raise ValueError("DPPF with ZeRO-3 does not support parameters offloaded to NVMe.")
        masters = []  # one flat partition per sub-group: every parameter's partition, each padded at its end
        for flat, partitions, paddings in zip(
            optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups, optimizer.groups_padding
        ):
            offset = 0
            for partition, pad in zip(partitions, paddings):
                if partition.ds_numel > pad:
                    masters.append(flat[offset : offset + partition.ds_numel - pad])
                offset += partition.ds_numel
        return masters

    @torch.no_grad()
    def _refresh_model(self) -> None:
        """Make the model's parameters match the (moved) master partitions, as the ZeRO step does after stepping."""
        optimizer = self.engine.optimizer
        if self.stage in (1, 2):
            optimizer.update_lp_params()  # bit16 partition <- fp32 partition, all-gather inside the replica
        elif self.stage == 3:
            for low, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
                if low.data_ptr() != master.data_ptr():  # the same tensor when the model is fp32 on this device
                    low.copy_(master)
            if optimizer.persistent_parameters:  # kept whole on every rank of the replica
                optimizer.persistent_parameters[0].all_gather(optimizer.persistent_parameters)
            if hasattr(optimizer, "invalidate_secondary_tensor"):
                optimizer.invalidate_secondary_tensor()

    def round(self, push_scale: float = 1.0, *, strategy: str | None = None) -> DPPFStats:
        """One round now, on every rank (a collective): see `DPPFConsensus.round`."""
        stats = self.consensus.round(push_scale, strategy=strategy)
        self._refresh_model()
        return stats

    @property
    def last_reseeded(self) -> bool:
        """Whether the last round (or `ensure_finite`) re-seeded this replica (see `DPPFConsensus`)."""
        return self.consensus.last_reseeded

    def verify_ranks(self) -> None:
        """Check that the replicas agree on config, steps and shard layout (a collective; see `DPPFConsensus`)."""
        self.consensus.verify_ranks()

    def ensure_finite(self) -> bool:
        """Re-seed a replica whose weights hold NaN/Inf from the healthy ones (see `DPPFConsensus.ensure_finite`)."""
        reseeded = self.consensus.ensure_finite()
        if reseeded:  # every rank of this replica agrees: its shards are judged together
            self._refresh_model()
        return reseeded

    def average(self) -> DPPFStats:
        """Set every replica to the average (one averaging round)."""
        return self.round(strategy="avg")

    def observe(self, *, loss: Any = None, grad_norm: Any = None) -> None:
        """Feed this rank's loss / gradient norm (lsgd, grawa); a replica's ranks are averaged at the round."""
        self.consensus.observe(loss=loss, grad_norm=grad_norm)

    def step(self, push_scale: float = 1.0) -> bool:
        """Count one optimizer step (call it at each gradient-accumulation boundary); run a round when one is due."""
        ran = self.consensus.step(push_scale)
        if ran:
            self._refresh_model()
        return ran

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Every replica holds the average inside the block, its own weights after it (a collective)."""
        try:
            with self.consensus.averaged():
                self._refresh_model()
                yield
        finally:
            self._refresh_model()

    def state_dict(self) -> dict[str, Any]:
        """The engine's state plus the replica layout it was written with."""
        return {**self.consensus.state_dict(), "replica_size": self.groups.replica_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("replica_size", self.groups.replica_size) != self.groups.replica_size:
            raise ValueError(
                f"The DPPF state was written with replica_size={state['replica_size']}, this run has "
                f"{self.groups.replica_size}: an exact resume needs the same layout."
            )
        self.consensus.load_state_dict({k: v for k, v in state.items() if k != "replica_size"})
