"""
What every integration does around the engine at each optimizer step, written once: the push schedule (`initial_lr`,
`lr_push_scale`), DDP silencing (`silence_ddp`, `restore_ddp`), optimizer unwrapping (`inner_optimizer`) and the
resets after a round (`after_round`). The DPPF block (`accelerate.py`) and `DPPFTrainer` (`trainer.py`) both call
these, so they never import one another. Imports: torch, `hf_dppf.config` and `hf_dppf.engine` only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

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
