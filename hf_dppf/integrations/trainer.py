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
import inspect
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
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..engine import DPPFConsensus
from .arguments import DPPFArguments
from .common import (  # noqa: F401 (re-exported: scripts and tests read checkpoints)
    DPPF_CHECKPOINT_DIR,
    REPLICA_DIR,
    WORKER_CENTRE_NAME,
    WORKER_STATE_NAME,
    ReplicaGradients,
    after_round,
    build_engine,
    check_worker_state,
    initial_lr,
    inner_optimizer,
    load_worker_state,
    lr_push_scale,
    restore_ddp,
    save_worker_state,
    silence_ddp,
    worker_dir,
)
from .deepspeed import DeepSpeedDPPF, ReplicaGroups, check_zero_stage, zero_stage_of

logger = logging.getLogger(__name__)

# Inside a checkpoint folder: `dppf/rank{r}/` holds worker r's own weights, optimizer state and engine state, and
# `dppf/replica{k}/` replica k's with --dppf_replica_size > 1 (the layout the Accelerate block writes too: its names
# live in `common.py`). Under DeepSpeed `dppf/replica{k}/` holds replica k's DeepSpeed checkpoint (its ZeRO shards).
DEEPSPEED_TAG = "deepspeed"  # a fixed tag: DeepSpeed's `latest` file is written by global rank 0 only
SCHEDULER_NAME = "scheduler.pt"  # the stock Trainer's file name: the schedule is the same on every worker
# A checkpoint is written under this prefix and renamed to `checkpoint-N` once every rank has finished, so that a crash
# while saving never leaves a half-written `checkpoint-N` for `resume_from_checkpoint=True` to pick.
STAGING_PREFIX = "tmp-checkpoint"

# The transformers releases DPPFTrainer supports: the floor (setup.cfg, constraints-min.txt) and the newest one CI runs
# (constraints-cpu.txt); a test keeps them equal to those files.
TRANSFORMERS_FLOOR = "5.3.0"
TRANSFORMERS_TESTED = "5.24.0"

# The private members of transformers' `Trainer` that DPPFTrainer still relies on, with the parameters it passes or
# receives, and when: "always" (every --dppf run), "grawa" (--dppf_strategy grawa), "deepspeed" (under DeepSpeed).
# Everything else it uses is public: `TrainerCallback` events, `train`, `training_step`, `evaluation_loop`,
# `save_model`, `log`. Why each of these has no public equivalent: docs/integrations.md, "What DPPFTrainer hooks and
# why". `check_trainer_api` checks them when a trainer is built with --dppf; a test keeps this table equal to what
# the code below uses, so a new private dependency is a deliberate change.
PRIVATE_TRAINER_API: dict[str, tuple[tuple[str, ...], str]] = {
    # a checkpoint is written in full into tmp-checkpoint-N, then renamed; nothing non-finite is written
    "_save_checkpoint": (("model", "trial"), "always"),
    # every worker's own weights, optimizer and engine state instead of rank 0's optimizer (or, under DeepSpeed,
    # one DeepSpeed checkpoint per replica instead of colliding ones in the checkpoint's top folder)
    "_save_optimizer_and_scheduler": (("output_dir",), "always"),
    # the run folder `_save_checkpoint` writes into (the staging folder's parent)
    "_get_output_dir": (("trial",), "always"),
    # grawa weighs workers by the gradient norm before clipping, which no public event sees
    "_get_grad_norm": (("model", "grad_norm"), "grawa"),
    # DeepSpeed's initialize routed to the replica's group, and the top-folder resume skipped for the replica's own
    "_prepare_for_training": (("max_steps", "train_dataloader", "resume_from_checkpoint"), "deepspeed"),
}
# ... and one module attribute, set only inside `checkpoint_prefix`: the name `_save_checkpoint` gives its folder.
PREFIX_ATTRIBUTE = "transformers.trainer.PREFIX_CHECKPOINT_DIR"


def _signature_problem(name: str, expected: tuple[str, ...]) -> str | None:
    member = getattr(Trainer, name, None)
    if member is None:
        return f"no Trainer.{name}"
    try:
        params = list(inspect.signature(member).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return f"Trainer.{name} has no readable signature"
    names = tuple(p.name for p in params)
    required_extra = [
        p
        for p in params[len(expected) :]
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if names[: len(expected)] != expected or required_extra:
        return f"Trainer.{name}({', '.join(names)}) where DPPFTrainer expects {name}({', '.join(expected)})"
    return None


def _code_names(function: Any) -> set[str]:
    """The global and attribute names a function's code (nested code included) refers to."""
    names: set[str] = set()
    pending = [getattr(inspect.unwrap(function), "__code__", None)]
    while pending:
        code = pending.pop()
        if code is not None:
            names.update(code.co_names)
            pending.extend(c for c in code.co_consts if inspect.iscode(c))
    return names


def check_trainer_api(strategy: str, deepspeed: bool) -> None:
    """
    Check that this transformers' `Trainer` has the private members DPPFTrainer relies on (`PRIVATE_TRAINER_API`,
    with their parameters) for a run with this strategy, with or without DeepSpeed, and that `_save_checkpoint` still
    names its folder from `PREFIX_CHECKPOINT_DIR`. Raises one `ImportError` naming the supported range and every
    problem found; `DPPFTrainer` calls it when it is built with --dppf, before any training.
    """
    needed = {"always", strategy} | ({"deepspeed"} if deepspeed else set())
    problems = [
        problem
        for name, (expected, when) in PRIVATE_TRAINER_API.items()
        if when in needed and (problem := _signature_problem(name, expected)) is not None
    ]
    if hasattr(Trainer, "_save_checkpoint") and not (
        hasattr(transformers.trainer, "PREFIX_CHECKPOINT_DIR")
        and {"PREFIX_CHECKPOINT_DIR", "_save_optimizer_and_scheduler"} <= _code_names(Trainer._save_checkpoint)
    ):
        problems.append(
            f"Trainer._save_checkpoint no longer names its folder from {PREFIX_ATTRIBUTE} and saves the optimizer "
            "through _save_optimizer_and_scheduler"
        )
    if problems:
        raise ImportError(
            f"--dppf needs transformers >= {TRANSFORMERS_FLOOR} (tested: {TRANSFORMERS_FLOOR} to "
            f"{TRANSFORMERS_TESTED}); found {transformers.__version__}, whose Trainer lacks what DPPFTrainer hooks: "
            f"{'; '.join(problems)}. "
            'See docs/integrations.md, "What DPPFTrainer hooks and why".'
        )


@contextlib.contextmanager
def checkpoint_prefix(prefix: str) -> Iterator[None]:
    """
    Inside the block the stock `Trainer._save_checkpoint` names its folder `{prefix}-{step}` (and looks for the best
    checkpoint under that prefix). The one place hf_dppf sets an attribute of a transformers module: the Trainer has no
    argument for the folder's name, and reads the module's `PREFIX_CHECKPOINT_DIR` when it saves. The attribute is
    restored on the way out, also when the block raises.
    """
    saved = transformers.trainer.PREFIX_CHECKPOINT_DIR
    transformers.trainer.PREFIX_CHECKPOINT_DIR = prefix
    try:
        yield
    finally:
        transformers.trainer.PREFIX_CHECKPOINT_DIR = saved


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
        if self.dppf and getattr(self, "dppf_replica_size", 1) > 1 and self.ddp_find_unused_parameters is None:
            # The stock default (True for a model without gradient checkpointing) makes DDP all-reduce a bitmap of
            # the used parameters over every process at every step: across replicas, on the slow links.
            self.ddp_find_unused_parameters = False
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

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        # After the stock set-up (the DDP or DeepSpeed wrap, optimizer, scheduler, trainer state), before any step.
        self.trainer._dppf_start(self.trainer._dppf_resume)

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
    - With `--dppf_replica_size G > 1` (hierarchical DPPF; `G` = processes per machine) the `G` neighbouring
      processes of a replica are one worker: DDP averages their gradients over the replica at every optimizer step
      (a communication hook; `--ddp_find_unused_parameters` defaults to false, as its bitmap would cross replicas at
      every step), nothing crosses replicas between rounds, and each round is sharded so that each process sends 1/G
      of the model across replicas. Checkpoints hold one copy per replica under `dppf/replica{k}/`.
    - With DeepSpeed (`--deepspeed ds_config.json` or an Accelerate DeepSpeed config) the workers are replicas of
      `--dppf_replica_size` processes: ZeRO shards and synchronises inside each replica every step, DPPF runs across
      replicas shard by shard (`deepspeed.py` in this package); checkpoints hold each replica's DeepSpeed checkpoint
      under `dppf/replica{k}/`. ZeRO-2/3 need `--dppf_replica_size` > 1.

    `evaluate`, `predict` and `save_model` are collectives while the workers differ: call them on every process, as
    the stock scripts do.

    It hooks the stock loop through `TrainerCallback` events and public methods, and through the private members of
    `PRIVATE_TRAINER_API` where no public one does the same; with `--dppf` they are checked when the trainer is built
    (`check_trainer_api`), so a transformers release without them stops before training, naming the supported range.

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
        # replicas of --dppf_replica_size processes (always under DeepSpeed): ZeRO or DDP inside one, DPPF across
        self._dppf_groups: ReplicaGroups | None = None
        self._dppf_gradients: ReplicaGradients | None = None  # DDP averaging the gradients inside a replica
        self._dppf_ddp_flags: dict[str, bool] = {}
        self._dppf_lr0 = 0.0
        self._dppf_in_sync = False  # every worker known to hold the same weights (after the final average)
        self._dppf_feed_loss = True  # `training_step` feeds its loss to the engine (lsgd)
        self._dppf_resume: str | None = None  # the checkpoint `train()` resumes from, for `on_train_begin`
        if self.dppf_enabled:
            self._check_dppf_setup()
            if self.is_deepspeed_enabled or self.args.dppf_config.replica_size > 1:
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
        if not isinstance(self.args, DPPFTrainingArguments):
            raise TypeError(f"args.dppf needs a DPPFTrainingArguments, got {type(self.args).__name__}.")
        check_trainer_api(self.args.dppf_config.strategy, deepspeed=self.is_deepspeed_enabled)
        if self.is_fsdp_enabled:
            raise ValueError(
                "--dppf with FSDP is not supported by DPPFTrainer: use DeepSpeed ZeRO with --dppf_replica_size to "
                "shard a replica over several processes, or DDP / a single process per replica."
            )
        config = self.args.dppf_config
        if self.is_deepspeed_enabled:
            stage = zero_stage_of(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            check_zero_stage(stage, config.replica_size)
        elif config.replica_size > 1 and config.push_mode == "step":
            raise ValueError(
                f"--dppf_push_mode step is not available with --dppf_replica_size {config.replica_size} (the per-step "
                "push would need an all-gather inside the replica at every step): use --dppf_push_mode round."
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
            return worker_dir(checkpoint, self._dppf_groups.replica_index, replicated=True)
        return worker_dir(checkpoint, self.args.process_index)

    def _dppf_silence(self) -> None:
        gradients = self._dppf_gradients is None  # (a replica's DDP averages them inside the replica)
        self._dppf_ddp_flags = silence_ddp(self.model_wrapped, self._dppf_ddp_flags, gradients)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """
        The stock `train`. With DPPF it notes the checkpoint it resumes from (`True`: the last one in `output_dir`, as
        the stock `train` picks it), whose worker states `on_train_begin` loads.
        """
        if self.dppf_enabled:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the stock train() raises
            self._dppf_resume = checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """
        The stock set-up; under DeepSpeed with DPPF, with DeepSpeed's data-parallel group set to this process's replica
        and without the stock resume from a DPPF checkpoint, which reads a DeepSpeed checkpoint from the checkpoint's
        top folder, where the replicas' shards, which share their file names, cannot all live: each replica resumes
        from its own at `on_train_begin`. (The one use of this private step: no public event runs around
        `deepspeed.initialize`, and none can replace the stock resume.)
        """
        if not (self.is_deepspeed_enabled and self._dppf_groups is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        own = resume_from_checkpoint is not None and os.path.isdir(self._dppf_worker_dir(resume_from_checkpoint))
        with self._dppf_groups.routed_initialize():
            return super()._prepare_for_training(max_steps, train_dataloader, None if own else resume_from_checkpoint)

    def _dppf_start(self, checkpoint: str | None) -> None:
        """
        `on_train_begin`, after the stock set-up (the DDP or DeepSpeed wrap, which broadcasts rank 0's weights; the
        optimizer and scheduler, restored from a stock checkpoint): start the engine and restore every worker's own
        state from a DPPF checkpoint.
        """
        self._dppf_in_sync = False
        self._dppf_resume = None
        worker = self._dppf_worker_dir(checkpoint) if checkpoint is not None else None
        if worker is not None and not os.path.isdir(worker):
            logger.warning(
                "Checkpoint %s has no DPPF worker states: every worker starts from its model and optimizer.",
                checkpoint,
            )
            worker = None
        config, groups = self.args.dppf_config, self._dppf_groups
        if self.is_deepspeed_enabled:  # each replica's weights come with its DeepSpeed checkpoint
            saved = None
            if worker is not None:
                with open(os.path.join(worker, WORKER_STATE_NAME)) as f:
                    saved = json.load(f)
                self._dppf_load_optimizer(checkpoint, worker)
            self._dppf_engine = DeepSpeedDPPF(self.model_wrapped, config, groups)
            if saved is not None:
                centre = self._dppf_centre_file(worker)
                if os.path.isfile(centre):
                    saved["engine"]["centre"] = load_file(centre)
                self._dppf_engine.load_state_dict(saved["engine"])
                self._dppf_engine.verify_ranks()  # every worker resumed from the same step
        else:
            self._dppf_engine, self._dppf_gradients = build_engine(self.model, self.model_wrapped, config, groups)
            self._dppf_silence()
            if worker is not None:  # the weights are copied into the params in place
                check_worker_state(worker, self._dppf_engine, checkpoint)
                load_worker_state(worker, self.model, inner_optimizer(self.optimizer), self._dppf_engine)
                self._dppf_load_scheduler(checkpoint)
        # lr_0 of the schedule (on resume the optimizer's param groups are restored by now).
        self._dppf_lr0 = initial_lr(self._dppf_lr_optimizer())
        self._dppf_check_schedule(self.state.max_steps)

    def _dppf_load_optimizer(self, checkpoint: str, worker: str) -> None:
        """
        Under DeepSpeed, this replica's DeepSpeed checkpoint (weights and optimizer state) and the scheduler, the same
        on every worker, from a DPPF checkpoint. (The stock resume skipped it, see `_prepare_for_training`.)
        """
        load_path, _ = self.model_wrapped.load_checkpoint(
            worker, tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ValueError(f"No DeepSpeed checkpoint in {worker}.")
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):  # (else DeepSpeed's checkpoint held it)
            self._dppf_load_scheduler(checkpoint)

    def _dppf_load_scheduler(self, checkpoint: str) -> None:
        """The scheduler, the same on every worker (the stock resume finds no `optimizer.pt`, so it restored none)."""
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _dppf_lr_optimizer(self) -> Any:
        """What holds the learning rate and the state: the torch optimizer, or DeepSpeed's (same `param_groups`)."""
        if self.is_deepspeed_enabled:
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
        if self._dppf_gradients is not None:  # DDP averages over every process again
            self._dppf_gradients.active = False
            self._dppf_gradients = None

    @contextlib.contextmanager
    def dppf_averaged(self) -> Iterator[None]:
        """
        Inside the block every worker holds the workers' average; their own weights come back after it (a collective
        while the workers differ). A no-op without DPPF.
        """
        if not self.dppf_enabled or self._dppf_in_sync or (self._dppf_groups and self._dppf_engine is None):
            yield  # (under DeepSpeed before training, every process holds the model it was given)
            return
        if not self._dppf_groups and (self._dppf_engine is None or self._dppf_engine.module is not self.model):
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
        with checkpoint_prefix(STAGING_PREFIX):
            super()._save_checkpoint(model, trial)
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
        if self.is_deepspeed_enabled:
            return self._dppf_save_deepspeed(output_dir, worker)
        save_worker_state(worker, self.model, inner_optimizer(self.optimizer), self._dppf_engine)
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
