"""
`DPPF`: the context manager that turns a plain Accelerate loop into DPPF training.

The block silences DDP, counts optimizer steps (every rank the same ones, even when a grad scaler skips a step on one
rank), runs the engine's round when one is due, logs the engine's statistics to the accelerator's trackers, makes
`accelerator.save_state` / `load_state` save and restore every worker exactly, and leaves every worker holding the
average on exit. The helpers it shares with `DPPFTrainer` are in `common.py`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from ..config import DPPFConfig
from ..engine import DPPFConsensus, DPPFStats
from ..strategies import STRATEGIES
from .common import (
    ReplicaGradients,
    ReplicaGroups,
    after_round,
    build_engine,
    check_worker_state,
    engine_dir,
    initial_lr,
    inner_optimizer,
    load_worker_state,
    lr_push_scale,
    restore_ddp,
    save_worker_state,
    silence_ddp,
)

logger = logging.getLogger(__name__)


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """
    The global L2 norm of the gradients `optimizer` is about to apply (all its parameter groups; `None` if no parameter
    has a gradient), as a tensor on the gradients' device: no host sync.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class DPPF:
    """
    Local steps inside the block, a DPPF consensus round every `config.tau` optimizer steps.

    Inside the block the (DDP-wrapped) model sends no gradient all-reduce and no buffer broadcast at all, for any
    number of micro-batches, with or without `accelerator.accumulate`. Optimizer steps are counted where every rank
    agrees on them: at each call of the prepared optimizer's `step()` that is a real step (`sync_gradients`, so
    accumulation micro-batches do not count), including a step the fp16 grad scaler skips on this rank (it skipped
    the step, not the round: the workers compute different gradients, so one rank may overflow alone). The round runs
    right after the step that completes it, before `lr_scheduler.step()`, so `lam_schedule="lr"` scales its push by
    `lr_t / lr_0` with `lr_t` the learning rate of that step. (A raw torch optimizer is counted by a post-step hook,
    which a `GradScaler` skip does not reach: prepare the optimizer with Accelerate when using fp16.)

    `accelerator.save_state(d)` inside the block also writes every worker's own weights (safetensors), optimizer and
    grad-scaler state and the engine's state (step counter, statistics, easgd's centre; an overlapped round in flight
    lands first) to `d/dppf/rank{r}/`; `accelerator.load_state(d)` inside a block restores them on every rank after
    Accelerate's own state (scheduler, RNG, dataloader), so the run continues exactly. Loading needs the same number
    of processes (otherwise a `ValueError` says so) and must happen inside the block: the block registers itself for
    checkpointing, and a checkpoint written without DPPF is loaded before entering it. When the accelerator has
    trackers (`accelerator.init_trackers`), the engine's statistics (`dppf/valley_width`, `dppf/lam`, `dppf/bytes`,
    ...) go to `accelerator.log` after every round, or every `log_every` optimizer steps, at `step=` the number of
    optimizer steps. On a normal exit every worker is set to the average (or, with `average_on_exit=False`, a last
    DPPF round runs), so `accelerator.save_model` saves the consensus model.

    With `config.replica_size = G > 1` (hierarchical DPPF, `G` = processes per machine) the `G` neighbouring processes
    of a replica are one worker: the DDP model averages their gradients over the replica at every real step (a
    communication hook; accumulation micro-batches stay local as usual, and the hook falls back to DDP's own group when
    the block ends), nothing crosses replicas between rounds, and each round is sharded so that each process sends
    1/G of the model across replicas (`hf_dppf.engine.replicas`). Checkpoints hold one copy per replica under
    `d/dppf/replica{k}/`. Build the DDP model with `find_unused_parameters=False` (Accelerate's default), or DDP
    all-reduces a bitmap over every process at every step.

    The baselines need a little more from the loop: `strategy="lsgd"` needs each worker's training loss, fed with
    `dppf.observe(loss=loss)` before the `optimizer.step()` that may complete a round; `strategy="grawa"` needs the
    gradient norm, which a pre-hook on the optimizer measures at every step (the norm of the gradients the step
    applies: after the grad scaler's unscale, and after any clipping the script does; to weigh by the pre-clip norm,
    pass it yourself: `dppf.observe(grad_norm=accelerator.clip_grad_norm_(...))`). Without `optimizer`, feed both.

    Args:
        accelerator (`accelerate.Accelerator`): the script's accelerator (on CPU build it with `cpu=True`).
        model (`torch.nn.Module`): the model returned by `accelerator.prepare` (DDP-wrapped or not).
        optimizer (`torch.optim.Optimizer`, *optional*):
            The prepared optimizer. When given, its steps are counted by a hook and the push follows its learning
            rate (`lam_schedule="lr"`); without it, call `dppf.step()` after every optimizer step.
        config (`DPPFConfig`, *optional*): defaults to `DPPFConfig()`.
        average_on_exit (`bool`, defaults to `True`): leave every worker holding the average when the block ends.
        enabled (`bool`, defaults to `True`): `False` makes the block a no-op, so one flag switches DPPF off.
        log_every (`int`, *optional*): log the statistics to the trackers every `log_every` optimizer steps; by
            default after every round.

    Example:
        ```python
        with DPPF(accelerator, model, optimizer, DPPFConfig(tau=4, alpha=0.5, width=0.01)) as dppf:
            for batch in loader:
                with accelerator.accumulate(model):
                    accelerator.backward(model(**batch).loss)
                    optimizer.step()
                    optimizer.zero_grad()
                dppf.step()
        print(dppf.stats.rounds, dppf.stats.mean_distance)
        ```
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: Any = None,
        config: DPPFConfig | None = None,
        *,
        average_on_exit: bool = True,
        enabled: bool = True,
        log_every: int | None = None,
    ) -> None:
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1):
            raise ValueError(f"log_every={log_every!r} is invalid: it must be an integer >= 1 (or None: every round).")
        # Accelerate's optimizer (it has a gradient state): its steps are counted even when its grad scaler skips one
        self._accelerated_optimizer = optimizer if hasattr(optimizer, "gradient_state") else None
        self.accelerator = accelerator
        self.model = model
        self.optimizer = inner_optimizer(optimizer) if optimizer is not None else None
        self.config = config if config is not None else DPPFConfig()
        self.average_on_exit = average_on_exit
        self.enabled = enabled
        self.engine: DPPFConsensus | None = None
        self._ddp_flags: dict[str, Any] = {}
        self._hook = None
        self._rounds_seen = 0
        self._warned_schedule = False
        self._lr0 = 0.0
        self._pre_hook = None
        self._grad_norm_fed = False
        self.log_every = log_every
        self._checkpoint_hooks: list = []
        self._loading_from: str | None = None
        self._replica_gradients: ReplicaGradients | None = None

    # ------------------------------------------------------------------ DDP silencing
    def _silence_ddp(self) -> None:
        """Switch off DDP's gradient all-reduce (kept inside a replica) and buffer broadcast (restored on exit)."""
        self._ddp_flags = silence_ddp(self.model, self._ddp_flags, gradients=self._replica_gradients is None)

    def _restore_ddp(self) -> None:
        restore_ddp(self.model, self._ddp_flags)
        self._ddp_flags = {}

    # ------------------------------------------------------------------ context
    def __enter__(self) -> DPPF:
        if not self.enabled:
            return self
        unwrapped = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
        groups = ReplicaGroups.build(self.config.replica_size) if self.config.replica_size > 1 else None
        self.engine, self._replica_gradients = build_engine(unwrapped, self.model, self.config, groups)
        world = self.engine.world_size * self.engine.replica_size
        processes = getattr(self.accelerator, "num_processes", world)
        if processes != world:
            raise RuntimeError(
                f"Accelerate reports {processes} process(es) but torch.distributed has {world}: "
                "the data would not be sharded and the workers would train on the same batches. On CPU build "
                "Accelerator(cpu=True) or export ACCELERATE_USE_CPU=true."
            )
        self._silence_ddp()
        if self.optimizer is not None:
            self._lr0 = initial_lr(self.optimizer)
            if self._accelerated_optimizer is not None:
                self._hook = _StepCounter(self._accelerated_optimizer, self._on_optimizer_step)
            else:
                self._hook = self.optimizer.register_step_post_hook(lambda *_: self._on_optimizer_step())
            if "grad_norm" in STRATEGIES[self.config.strategy].needs:
                self._pre_hook = self.optimizer.register_step_pre_hook(lambda *_: self._on_pre_optimizer_step())
        self._register_checkpointing()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for hook in (self._hook, self._pre_hook, *self._checkpoint_hooks):
            if hook is not None:
                hook.remove()
        self._hook = self._pre_hook = None
        self._checkpoint_hooks = []
        try:
            # After an exception the other ranks may not reach a collective: finish without one.
            if self.engine is not None and exc_type is None:
                if self.average_on_exit:
                    self.engine.average()
                else:
                    self.engine.round(self._push_scale())
        finally:
            self._restore_ddp()
            if self._replica_gradients is not None:  # DDP averages over every process again
                self._replica_gradients.active = False
                self._replica_gradients = None

    # ------------------------------------------------------------------ steps
    def _push_scale(self) -> float:
        if self.optimizer is not None:
            return lr_push_scale(self.config, self.optimizer, self._lr0)
        if self.config.lam_schedule == "lr" and not self._warned_schedule:
            logger.warning("DPPF: lam_schedule='lr' needs the optimizer (pass it to DPPF); push kept constant.")
            self._warned_schedule = True
        return 1.0

    def _on_pre_optimizer_step(self) -> None:
        if not self._grad_norm_fed:
            self.engine.observe(grad_norm=gradient_norm(self.optimizer))
        self._grad_norm_fed = False

    def observe(
        self, *, loss: float | torch.Tensor | None = None, grad_norm: float | torch.Tensor | None = None
    ) -> None:
        """
        Feed this worker's training loss (`strategy="lsgd"`) and/or gradient norm (`"grawa"`) of the current step;
        the engine keeps the mean since the last round. Call it before the `optimizer.step()` that may end a round.
        A `grad_norm` given here replaces the one the optimizer hook would measure at the next step. A no-op when DPPF
        is disabled; values the strategy does not use are dropped.
        """
        if self.engine is None:
            return
        self.engine.observe(loss=loss, grad_norm=grad_norm)
        self._grad_norm_fed = self._grad_norm_fed or grad_norm is not None

    def _on_optimizer_step(self) -> None:
        self._silence_ddp()
        ran = self.engine.step(self._push_scale())
        if ran:
            after_round(self.engine, self.optimizer)
        due = ran if self.log_every is None else self.engine.stats.steps % self.log_every == 0
        if due:
            self._log()

    def _log(self) -> None:
        """The engine's statistics to the accelerator's trackers (if it has any; `accelerator.log` is main-only)."""
        if getattr(self.accelerator, "trackers", None):
            self.accelerator.log(self.engine.stats.to_logs(), step=self.engine.stats.steps)

    # ------------------------------------------------------------------ save_state / load_state
    def _register_checkpointing(self) -> None:
        """Hook into `accelerator.save_state` / `load_state` (removed on exit)."""
        if self.accelerator is None or not hasattr(self.accelerator, "register_save_state_pre_hook"):
            return
        self.accelerator.register_for_checkpointing(self)  # `load_state` restores us after Accelerate's own state
        self._checkpoint_hooks = [
            self.accelerator.register_save_state_pre_hook(self._save_state_hook),
            self.accelerator.register_load_state_pre_hook(self._load_state_hook),
            _Unregister(self.accelerator._custom_objects, self),
        ]

    def _save_state_hook(self, models: list, weights: list, output_dir: str) -> None:
        # Every rank: its own weights, optimizer, scaler and engine state (Accelerate keeps only rank 0's model and
        # optimizer). The round in flight lands in place, so Accelerate's copy of rank 0's weights agrees.
        save_worker_state(
            engine_dir(output_dir, self.engine), self.engine.module, self.optimizer, self.engine, self._extra()
        )

    def _load_state_hook(self, models: list, input_dir: str) -> None:
        # Before Accelerate loads anything: refuse a checkpoint of another world size; the worker's own state is
        # loaded last, by `load_state_dict` (registered for checkpointing), over Accelerate's rank-0 copies. First wait
        # for every rank: a `load_state` right after a `save_state` must not read files rank 0 is still writing.
        self.accelerator.wait_for_everyone()
        check_worker_state(engine_dir(input_dir, self.engine), self.engine, input_dir)
        self._loading_from = input_dir

    def _extra(self) -> dict[str, Any]:
        scaler = getattr(self.accelerator, "scaler", None)
        return {"scaler": scaler} if scaler is not None else {}

    def step(self) -> bool:
        """
        Call after every optimizer step. With an optimizer given to `DPPF`, steps are counted by its hook and this
        only reports; without one, it counts a step whenever Accelerate completed one (`sync_gradients`).

        Returns:
            `bool`: whether a consensus round ran since the previous call.
        """
        if self.engine is None:
            return False
        if self.optimizer is None and getattr(self.accelerator, "sync_gradients", True):
            self._on_optimizer_step()
        ran = self.engine.stats.rounds != self._rounds_seen
        self._rounds_seen = self.engine.stats.rounds
        return ran

    @property
    def stats(self) -> DPPFStats:
        """The engine's statistics (`rounds`, `bytes_communicated`, `mean_distance`, `last_round_ms`, ...)."""
        return self.engine.stats if self.engine is not None else DPPFStats()

    def averaged(self) -> contextlib.AbstractContextManager:
        """
        Context manager: inside it every worker holds the workers' average (evaluate or save it); each worker's own
        weights come back after. A collective: every rank must enter it. A no-op when DPPF is disabled.
        """
        return self.engine.averaged() if self.engine is not None else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """The engine's state; an overlapped round in flight lands first (then a collective: call it on every rank)."""
        if self.engine is None:
            return {}
        self.engine.finish()
        return {**self.engine.state_dict(), "world_size": self.engine.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """
        Within `accelerator.load_state(d)`: restore this worker's own weights, optimizer, scaler and engine state from
        `d/dppf/rank{r}/`. Called directly: restore the engine's step counter and statistics from `state`. Either way
        every rank then checks that all resumed from the same step (a collective).
        """
        if self.engine is None:
            return
        if self._loading_from is not None:
            folder, self._loading_from = engine_dir(self._loading_from, self.engine), None
            load_worker_state(folder, self.engine.module, self.optimizer, self.engine, self._extra())
            return
        self.engine.load_state_dict({k: v for k, v in state.items() if k != "world_size"})
        self.engine.verify_ranks()


class _StepCounter:
    """
    Calls `callback` after each real step of an Accelerate `AcceleratedOptimizer` (`sync_gradients`), whether or not
    its grad scaler skipped it, by wrapping the instance's `step`; `remove()` unwraps it.
    """

    def __init__(self, optimizer: Any, callback: Any) -> None:
        self.optimizer = optimizer
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if optimizer.gradient_state.sync_gradients:
                callback()
            return out

        optimizer.step = step

    def remove(self) -> None:
        self.optimizer.__dict__.pop("step", None)


class _Unregister:
    """A handle that takes `obj` out of the accelerator's checkpointed objects."""

    def __init__(self, objects: list, obj: Any) -> None:
        self.objects, self.obj = objects, obj

    def remove(self) -> None:
        for i, o in enumerate(self.objects):
            if o is self.obj:
                del self.objects[i]
                return
