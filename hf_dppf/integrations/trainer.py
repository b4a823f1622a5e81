"""
`DPPFTrainer` and `DPPFTrainingArguments`: DPPF for scripts built on the Hugging Face `Trainer`, switched on by a flag.

With `--dppf` each worker trains its own copy of the weights with its own optimizer state on its own data shard, with
no gradient all-reduce on any micro-batch, and the workers meet in a consensus round every `--dppf_tau` optimizer
steps. Evaluation, `save_model`, `push_to_hub` and the model left after `train()` are the workers' average; checkpoints
also hold every worker's own weights, optimizer, RNG and engine state, so that `resume_from_checkpoint` continues the
run exactly. Without `--dppf` the classes are the stock `TrainingArguments` and `Trainer`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import transformers.trainer
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..engine import DPPFConsensus
from .arguments import DPPFArguments
from .common import after_round, initial_lr, inner_optimizer, lr_push_scale, restore_ddp, silence_ddp
from .deepspeed import DeepSpeedDPPF, ReplicaGroups, check_zero_stage, zero_stage_of

logger = logging.getLogger(__name__)

# Inside a checkpoint folder: `dppf/rank{r}/` holds worker r's own weights, optimizer state and engine state.
DPPF_CHECKPOINT_DIR = "dppf"
WORKER_WEIGHTS_NAME = "model.safetensors"
WORKER_OPTIMIZER_NAME = "optimizer.pt"
WORKER_STATE_NAME = "dppf_state.json"
WORKER_CENTRE_NAME = "centre.safetensors"  # easgd's centre variable (engine state that is tensors)
# Under DeepSpeed: `dppf/replica{k}/` holds replica k's DeepSpeed checkpoint (its ZeRO shards) and engine state.
REPLICA_DIR = "replica{}"
DEEPSPEED_TAG = "deepspeed"  # a fixed tag: DeepSpeed's `latest` file is written by global rank 0 only
SCHEDULER_NAME = "scheduler.pt"  # the stock Trainer's file name: the schedule is the same on every worker
# A checkpoint is written under this prefix and renamed to `checkpoint-N` once every rank has finished, so that a crash
# while saving never leaves a half-written `checkpoint-N` for `resume_from_checkpoint=True` to pick.
STAGING_PREFIX = "tmp-checkpoint"


@dataclass
class DPPFTrainingArguments(DPPFArguments, TrainingArguments):
    """
    `TrainingArguments` plus `--dppf` and one `--dppf_<field>` flag per `DPPFConfig` field (`lam` is `--dppf_lambda`),
    from `DPPFArguments`.

    The `DPPFConfig` is built (and validated) before the (slow) device set-up of `TrainingArguments`, so a bad value
    fails at argument parsing with the config's message; it is available as `args.dppf_config`. With `dppf=True`,
    `average_tokens_across_devices` is switched off: each worker trains on its own loss and nothing is exchanged
    between rounds.

    Args:
        dppf (`bool`, defaults to `False`):
            Train with DPPF: local steps without gradient all-reduce, a consensus round every `dppf_tau` optimizer
            steps; evaluate and save the workers' average. `False` is the stock `Trainer` (DDP).
        dppf_tau, dppf_alpha, dppf_lambda, dppf_width, dppf_lam_schedule, dppf_strategy, dppf_beta,
        dppf_warmup_steps, dppf_bucket_mb, dppf_comm_dtype, dppf_eps:
            The `DPPFConfig` fields `tau`, `alpha`, `lam`, `width`, ... (see `hf_dppf.DPPFConfig`).

    Example:
        ```python
        args = DPPFTrainingArguments(output_dir="out", dppf=True, dppf_tau=4, dppf_alpha=0.5, dppf_width=0.01)
        ```
    """

    def __post_init__(self) -> None:
        if self.dppf and self.average_tokens_across_devices:
            # Gathering token counts would be a collective per step and would scale each worker's loss by the others'.
            self.average_tokens_across_devices = False
        super().__post_init__()  # DPPFArguments (builds the config), then TrainingArguments
        if self.dppf and self.dppf_config.replica_size > 1:
            from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

            if is_deepspeed_zero3_enabled():
                # `from_pretrained` after these arguments would build the model under zero.Init over every process;
                # with replica groups DeepSpeed partitions it inside each replica when training starts instead.
                unset_hf_deepspeed_config()
                logger.info("DPPF: ZeRO-3 partitions the model inside each replica when the DeepSpeed engine starts.")


class _DPPFCallback(TrainerCallback):
    """Runs the trainer's DPPF hooks at the points of the stock loop where every rank is in step."""

    def __init__(self, trainer: DPPFTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.trainer._dppf_silence()

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.trainer._dppf_on_optimizer_step()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.trainer._dppf_finish()


class DPPFTrainer(Trainer):
    """
    A `Trainer` that runs DPPF when `args.dppf` is set (`DPPFTrainingArguments`) and is the stock `Trainer` otherwise.

    With DPPF:

    - No gradient all-reduce on any micro-batch: DDP's reducer and buffer broadcast are switched off for the whole run
      (the stock loop all-reduces on the last micro-batch of every step). Each worker still reads its own data shard.
    - A consensus round (`DPPFConsensus`) follows every `dppf_tau`-th optimizer step (not micro-batch); the push
      follows the learning rate (`dppf_lam_schedule="lr"`).
    - `evaluate`, `predict`, `save_model` (and so checkpoints' `model.safetensors` and `push_to_hub`) use the workers'
      average, computed without touching the workers' own weights or optimizer states. After `train()` every worker
      holds the average, which is the model the run produces.
    - A checkpoint also holds, under `dppf/rank{r}/`, worker r's own weights (safetensors), optimizer state and engine
      state (easgd's centre variable in `centre.safetensors`), next to the stock per-rank RNG files and the
      scheduler, so `resume_from_checkpoint` continues exactly (same number of processes required). A stock DDP
      checkpoint resumes too: every worker starts from it.
    - `dppf/valley_width`, `dppf/bytes`, `dppf/round_ms`, `dppf/rounds`, ... are added to the training logs, so they
      reach every `report_to` integration and the progress bar.
    - The baselines get what they need from the stock loop: `lsgd` the loss of every micro-batch as `training_step`
      returns it (the value the Trainer logs), `grawa` the gradient norm the Trainer computes before clipping (the
      logged `grad_norm`; after clipping every norm above `max_grad_norm` would be the same and the weights equal).
    - With DeepSpeed (`--deepspeed ds_config.json` or an Accelerate DeepSpeed config) the workers are replicas of
      `--dppf_replica_size` processes: ZeRO shards and synchronises inside each replica every step, DPPF runs across
      replicas shard by shard (`deepspeed.py` in this package); checkpoints hold each replica's DeepSpeed checkpoint
      under `dppf/replica{k}/`. ZeRO-2/3 need `--dppf_replica_size` > 1.

    `evaluate`, `predict` and `save_model` are collectives while the workers differ: call them on every process, as
    the stock scripts do.

    Example:
        ```python
        args = DPPFTrainingArguments(output_dir="out", dppf=True, dppf_tau=4)
        trainer = DPPFTrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
        trainer.train()
        trainer.save_model()  # the workers' average
        ```
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dppf_engine: DPPFConsensus | DeepSpeedDPPF | None = None
        self._dppf_groups: ReplicaGroups | None = None  # under DeepSpeed: ZeRO inside a replica, DPPF across
        self._dppf_ddp_flags: dict[str, bool] = {}
        self._dppf_lr0 = 0.0
        self._dppf_in_sync = False  # every worker known to hold the same weights (after the final average)
        self._dppf_feed_loss = True  # `training_step` feeds its loss to the engine (lsgd)
        if self.dppf_enabled:
            self._check_dppf_setup()
            if self.is_deepspeed_enabled:
                self._dppf_groups = ReplicaGroups.build(self.args.dppf_config.replica_size)
            self.add_callback(_DPPFCallback(self))

    @property
    def dppf_enabled(self) -> bool:
        """Whether this trainer runs DPPF (`args.dppf`)."""
        return bool(getattr(self.args, "dppf", False))

    @property
    def dppf_engine(self) -> DPPFConsensus | DeepSpeedDPPF | None:
        """The consensus engine of the current (or last) run; `None` before training or without DPPF."""
        return self._dppf_engine

    def _check_dppf_setup(self) -> None:
        if not hasattr(Trainer, "_prepare_for_training"):  # the set-up step DPPF hooks into (transformers 5)
            import transformers

            raise ImportError(
                f"--dppf needs a transformers release whose Trainer has _prepare_for_training (supported: >= 5.3.0); "
                f"found {transformers.__version__}."
            )
        if not hasattr(Trainer, "_get_grad_norm"):  # where grawa's gradient norm is read (transformers 5)
            import transformers

            raise ImportError(
                f"--dppf needs a transformers release whose Trainer has _get_grad_norm (supported: >= 5.3.0); found "
                f"{transformers.__version__}."
            )
        if not isinstance(self.args, DPPFTrainingArguments):
            raise TypeError(f"args.dppf needs a DPPFTrainingArguments, got {type(self.args).__name__}.")
        if self.is_fsdp_enabled:
            raise ValueError(
                "--dppf with FSDP is not supported by DPPFTrainer: use DeepSpeed ZeRO with --dppf_replica_size to "
                "shard a replica over several processes, or DDP / a single process per replica."
            )
        replica_size = self.args.dppf_config.replica_size
        if self.is_deepspeed_enabled:
            check_zero_stage(zero_stage_of(self.accelerator.state.deepspeed_plugin.deepspeed_config), replica_size)
        elif replica_size > 1:
            raise ValueError(
                f"--dppf_replica_size={replica_size} needs DeepSpeed ZeRO (--deepspeed ds_config.json) to shard a "
                "replica over its processes; without DeepSpeed every process is a replica (valid: 1)."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"--dppf with torch.nn.DataParallel over n_gpu={self.args.n_gpu} GPUs in one process is not "
                "supported: launch one process per GPU with torchrun or accelerate launch."
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() != self.args.world_size:
            # E.g. `accelerate launch` on a CPU-only machine without --use_cpu: the process group exists but the
            # Trainer runs every process alone on the whole dataset, while the rounds would average across them.
            raise RuntimeError(
                f"torch.distributed has {dist.get_world_size()} processes but the Trainer runs with "
                f"world_size={self.args.world_size}, so the workers would not share the data. On CPU pass --use_cpu "
                "(or export ACCELERATE_USE_CPU=true); on GPUs check the launcher's configuration."
            )
        if self.args.world_size == 1:
            logger.warning("DPPF with a single process: there is one worker, so this is plain local training.")

    # ------------------------------------------------------------------ the run
    def _dppf_worker_dir(self, checkpoint: str) -> str:
        if self._dppf_groups is not None:
            return os.path.join(checkpoint, DPPF_CHECKPOINT_DIR, REPLICA_DIR.format(self._dppf_groups.replica_index))
        return os.path.join(checkpoint, DPPF_CHECKPOINT_DIR, f"rank{self.args.process_index}")

    def _dppf_silence(self) -> None:
        self._dppf_ddp_flags = silence_ddp(self.model_wrapped, self._dppf_ddp_flags)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """
        After the stock preparation (DDP or DeepSpeed wrap, optimizer, scheduler, checkpoint): start the DPPF engine.
        """
        prepare = super()._prepare_for_training if self._dppf_groups is None else self._dppf_prepare_deepspeed
        model, train_dataloader = prepare(max_steps, train_dataloader, resume_from_checkpoint)
        if self.dppf_enabled:
            self._dppf_start(resume_from_checkpoint)
        return model, train_dataloader

    def _dppf_prepare_deepspeed(self, max_steps, train_dataloader, checkpoint: str | None):
        """
        The stock preparation with DeepSpeed's data-parallel group set to this process's replica; a DPPF checkpoint
        is then resumed from the replica's own DeepSpeed checkpoint (the stock resume reads the checkpoint's top
        folder, where the replicas' shards, which share their file names, cannot all live).
        """
        own = checkpoint is not None and os.path.isdir(self._dppf_worker_dir(checkpoint))
        with self._dppf_groups.routed_initialize():
            model, train_dataloader = super()._prepare_for_training(
                max_steps, train_dataloader, None if own else checkpoint
            )
        if own:
            load_path, _ = self.model_wrapped.load_checkpoint(
                self._dppf_worker_dir(checkpoint),
                tag=DEEPSPEED_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise ValueError(f"No DeepSpeed checkpoint in {self._dppf_worker_dir(checkpoint)}.")
            self._load_optimizer_and_scheduler(checkpoint)
            self._load_scaler(checkpoint)
        return model, train_dataloader

    def _dppf_start(self, checkpoint: str | None) -> None:
        self._dppf_in_sync = False
        # lr_0 of the schedule (on resume the optimizer's param groups are restored by now).
        self._dppf_lr0 = initial_lr(self._dppf_lr_optimizer())
        self._dppf_check_schedule(self.state.max_steps)
        if self._dppf_groups is not None:  # each replica's weights and optimizer came with its DeepSpeed checkpoint
            self._dppf_engine = DeepSpeedDPPF(self.model_wrapped, self.args.dppf_config, self._dppf_groups)
            if checkpoint is not None and os.path.isdir(self._dppf_worker_dir(checkpoint)):
                with open(os.path.join(self._dppf_worker_dir(checkpoint), WORKER_STATE_NAME)) as f:
                    engine = json.load(f)["engine"]
                centre = self._dppf_centre_file(self._dppf_worker_dir(checkpoint))
                if os.path.isfile(centre):
                    engine["centre"] = load_file(centre)
                self._dppf_engine.load_state_dict(engine)
                self._dppf_engine.verify_ranks()  # every replica resumed from the same step
            return
        self._dppf_engine = DPPFConsensus(self.model, self.args.dppf_config)
        self._dppf_silence()
        if checkpoint is not None and os.path.isdir(self._dppf_worker_dir(checkpoint)):
            # After the DDP wrap: wrapping broadcasts rank 0's weights, which would overwrite the others' own.
            worker = self._dppf_worker_dir(checkpoint)
            with open(os.path.join(worker, WORKER_STATE_NAME)) as f:
                saved = json.load(f)
            if saved["world_size"] != self.args.world_size:
                raise ValueError(
                    f"Checkpoint {checkpoint} was written by {saved['world_size']} DPPF workers, this run has "
                    f"{self.args.world_size}: an exact resume needs the same number. To start a new run from its "
                    "average instead, load the checkpoint folder as the model (from_pretrained) without resuming."
                )
            load_model(self.model, os.path.join(worker, WORKER_WEIGHTS_NAME))  # copied into the params in place
            centre = self._dppf_centre_file(worker)
            if os.path.isfile(centre):
                saved["engine"]["centre"] = load_file(centre)
            self._dppf_engine.load_state_dict(saved["engine"])
            self._dppf_engine.verify_ranks()  # every rank resumed from the same step
        elif checkpoint is not None:
            logger.warning(
                "Checkpoint %s has no DPPF worker states: every worker starts from its model and optimizer.",
                checkpoint,
            )

    def _dppf_lr_optimizer(self) -> Any:
        """What holds the learning rate and the state: the torch optimizer, or DeepSpeed's (same `param_groups`)."""
        if self._dppf_groups is not None:
            return self.model_wrapped.optimizer
        return inner_optimizer(self.optimizer)

    def _dppf_check_schedule(self, max_steps: int) -> None:
        """Warn about settings that make the run's rounds differ from what the flags suggest."""
        config = self.args.dppf_config
        if max_steps <= config.warmup_steps:
            logger.warning(
                "DPPF: dppf_warmup_steps=%d covers the whole run (max_steps=%d): a round follows every optimizer "
                "step, so the run communicates as much as DDP. Lower --dppf_warmup_steps.",
                config.warmup_steps,
                max_steps,
            )
        elif max_steps - config.warmup_steps < config.tau:
            logger.warning(
                "DPPF: dppf_tau=%d is larger than the %d steps after warmup (max_steps=%d): no regular round will "
                "run, only the final average. Lower --dppf_tau.",
                config.tau,
                max_steps - config.warmup_steps,
                max_steps,
            )

    def _dppf_on_optimizer_step(self) -> None:
        # Called on every rank right after each optimizer step (before the scheduler's), whether or not a grad scaler
        # skipped it on some rank, so all ranks count the same steps and meet in the same rounds.
        self._dppf_in_sync = False
        optimizer = self._dppf_lr_optimizer()
        if self._dppf_engine.step(lr_push_scale(self.args.dppf_config, optimizer, self._dppf_lr0)):
            after_round(self._dppf_engine, optimizer)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        """The stock step; with DPPF its loss is fed to the engine (`lsgd` elects the lowest-loss worker)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._dppf_engine is not None and self._dppf_feed_loss:
            self._dppf_engine.observe(loss=loss)
        return loss

    @contextlib.contextmanager
    def dppf_loss_unobserved(self) -> Iterator[None]:
        """Inside the block `training_step` feeds no loss to the engine (e.g. SAM's pass at the perturbed weights)."""
        before, self._dppf_feed_loss = self._dppf_feed_loss, False
        try:
            yield
        finally:
            self._dppf_feed_loss = before

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """The stock gradient norm (before clipping); with DPPF it is fed to the engine (`grawa` weighs by it)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._dppf_engine is not None and grad_norm is not None:
            self._dppf_engine.observe(grad_norm=grad_norm)
        return grad_norm

    def _dppf_finish(self) -> None:
        """End of `train()`: every worker takes the average, which is the model the run produces."""
        self._dppf_engine.average()
        self._dppf_in_sync = True
        restore_ddp(self.model_wrapped, self._dppf_ddp_flags)
        self._dppf_ddp_flags = {}

    @contextlib.contextmanager
    def dppf_averaged(self) -> Iterator[None]:
        """
        Inside the block every worker holds the workers' average; their own weights come back after it (a collective
        while the workers differ). A no-op without DPPF.
        """
        if not self.dppf_enabled or self._dppf_in_sync or (self._dppf_groups and self._dppf_engine is None):
            yield  # (under DeepSpeed before training, every process holds the model it was given)
            return
        if self._dppf_groups is None and (self._dppf_engine is None or self._dppf_engine.module is not self.model):
            self._dppf_engine = DPPFConsensus(self.model, self.args.dppf_config)  # e.g. evaluate() before train()
        with self._dppf_engine.averaged():
            yield

    # ------------------------------------------------------------------ the average for eval and save
    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """The stock loop (used by `evaluate` and `predict`) on the workers' average."""
        with self.dppf_averaged():
            return super().evaluation_loop(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the workers' average (`from_pretrained` loads it), as the stock `save_model` saves the model."""
        with self.dppf_averaged():
            super().save_model(output_dir, _internal_call)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the engine's statistics (`dppf/valley_width`, `dppf/bytes`, `dppf/round_ms`, ...) to training logs."""
        if self._dppf_engine is not None and ("loss" in logs or "train_loss" in logs):
            logs = {**logs, **self._dppf_engine.stats.to_logs()}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """
        With DPPF, a checkpoint is safe to resume from or it does not exist:

        - an overlapped round in flight (`--dppf_overlap_steps`) lands first (`ensure_finite` finishes it), so the
          checkpoint holds consistent weights and no pending communication; a run resumed from it continues exactly
          as the run that saved it;
        - no NaN/Inf is written: a worker whose weights are not finite is re-seeded from the healthy workers' average
          first (its optimizer state reset), or every rank raises (`dppf_nonfinite_policy="raise"`) before a byte is
          written;
        - the stock checkpoint is written into `tmp-checkpoint-N` by every rank and renamed to `checkpoint-N` (an
          atomic rename) by the main process once all ranks are done, so a crash while saving leaves the previous
          checkpoint as the last one.
        """
        if not self.dppf_enabled:
            return super()._save_checkpoint(model, trial)
        if self._dppf_engine is not None:
            self._dppf_engine.ensure_finite()
            after_round(self._dppf_engine, self._dppf_lr_optimizer())
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}-{step}")
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # the remains of a crash while saving this step
        self.args.distributed_state.wait_for_everyone()
        saved_prefix = transformers.trainer.PREFIX_CHECKPOINT_DIR
        transformers.trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX  # the stock code names the folder from it
        try:
            super()._save_checkpoint(model, trial)
        finally:
            transformers.trainer.PREFIX_CHECKPOINT_DIR = saved_prefix
        self.args.distributed_state.wait_for_everyone()  # every rank's files are in the staging folder
        if self.args.should_save:
            if self.state.best_model_checkpoint == staging:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staging, "trainer_state.json"))
            if os.path.isdir(final):  # the same step saved again: keep the old one until the new one is in place
                os.replace(final, f"{staging}.old")
            os.replace(staging, final)
            shutil.rmtree(f"{staging}.old", ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.args.distributed_state.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """
        With DPPF, the resume state of every worker (own weights, optimizer, engine) under `dppf/rank{r}/`, written by
        every rank, and the scheduler (the same on all ranks) by the main process. The stock per-rank RNG files and
        trainer state are written by the stock `_save_checkpoint` around this call.
        """
        if not self.dppf_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        worker = self._dppf_worker_dir(output_dir)
        os.makedirs(worker, exist_ok=True)
        if self._dppf_groups is not None:
            return self._dppf_save_deepspeed(output_dir, worker)
        save_model(self.model, os.path.join(worker, WORKER_WEIGHTS_NAME), force_contiguous=True)
        torch.save(self.optimizer.state_dict(), os.path.join(worker, WORKER_OPTIMIZER_NAME))
        engine = self._dppf_engine.state_dict()
        centre = engine.pop("centre", {})
        if centre:
            save_file({k: v.contiguous() for k, v in centre.items()}, self._dppf_centre_file(worker))
        state = {"world_size": self.args.world_size, "engine": engine}
        with open(os.path.join(worker, WORKER_STATE_NAME), "w") as f:
            json.dump(state, f, indent=2)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _dppf_centre_file(self, worker: str) -> str:
        """easgd's centre variable in a worker folder (one file per shard under DeepSpeed replicas)."""
        if self._dppf_groups is None:
            return os.path.join(worker, WORKER_CENTRE_NAME)
        return os.path.join(worker, f"shard{self._dppf_groups.shard_index}-{WORKER_CENTRE_NAME}")

    def _dppf_save_deepspeed(self, output_dir: str, worker: str) -> None:
        """Each replica's DeepSpeed checkpoint (its ranks' shards) and engine state, and the torch scheduler."""
        self.model_wrapped.save_checkpoint(worker, tag=DEEPSPEED_TAG)
        engine = self._dppf_engine.state_dict()
        centre = engine.pop("centre", {})
        if centre:  # easgd: this rank's shard of the centre variable
            save_file({k: v.contiguous() for k, v in centre.items()}, self._dppf_centre_file(worker))
        if self._dppf_groups.shard_index == 0:
            state = {"world_size": self.args.world_size, "engine": engine}
            with open(os.path.join(worker, WORKER_STATE_NAME), "w") as f:
                json.dump(state, f, indent=2)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):  # as the stock
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """With DPPF, each worker loads its own optimizer state (and the shared scheduler) from a DPPF checkpoint."""
        if self._dppf_groups is not None or not (
            self.dppf_enabled and checkpoint and os.path.isdir(self._dppf_worker_dir(checkpoint))
        ):
            return super()._load_optimizer_and_scheduler(checkpoint)
        device = "cpu" if self.args.device.type == "cpu" else self.args.device
        worker = self._dppf_worker_dir(checkpoint)
        self.optimizer.load_state_dict(
            torch.load(os.path.join(worker, WORKER_OPTIMIZER_NAME), map_location=device, weights_only=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
