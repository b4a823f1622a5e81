"""
SAM (Sharpness-Aware Minimization, Foret et al., ICLR 2021) for any torch optimizer and for the Hugging Face `Trainer`.

One SAM update at the weights w, with g = grad L(w) on the current batch:

    e  = rho * g / ||g||                     (adaptive SAM, Kwon et al. 2021: e = rho * w^2 g / ||w g||)
    w <- base optimizer step from w, with the gradient grad L(w + e) taken at the perturbed point

`||.||` is the global L2 norm over all parameters that have a gradient. Two forward/backward passes per update.

- `SAM(optimizer, rho)` wraps any optimizer: `first_step()` / `second_step()` around a second backward, or
  `step(closure)`.
- `SAMTrainer` is `DPPFTrainer` whose `training_step` runs both passes when `--sam_rho > 0` (`SAMTrainingArguments`
  adds `--sam_rho` / `--sam_adaptive` to the DPPF and stock flags); with `--sam_rho 0` it is `DPPFTrainer`.

Several processes (each computes its own ascent, as in the paper's per-accelerator "m-sharpness"):

- Stock DDP: the first backward runs under `no_sync`, so each worker perturbs its weights with its *own* micro-batch
  gradient (no communication); the second backward is the one DDP all-reduces, so the update is
  `w - lr * mean_i grad L_i(w + e_i)`, identical on every worker. One gradient all-reduce per step, as without SAM.
- DPPF (`--dppf`): no gradient is ever all-reduced, so each worker runs SAM locally on its own weights and data:
  `w_i <- w_i - lr * grad L_i(w_i + e_i)`, and the consensus rounds every `tau` steps are unchanged.

Gradient accumulation: the ascent is taken per micro-batch (from that micro-batch's own gradient at w), and the
gradients at the perturbed points are accumulated as the stock loop accumulates gradients, so the step uses the mean
over the micro-batches of grad L_k(w + e_k) (e_k: micro-batch k's ascent). With one micro-batch per step this is SAM.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..integrations.trainer import DPPFTrainer, DPPFTrainingArguments

_NORM_EPS = 1e-12


def _check_rho(rho: float) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"sam_rho={rho!r} is invalid: it must be a finite number >= 0 (0 turns SAM off).")


@torch.no_grad()
def ascend(
    params: Iterable[torch.Tensor], rho: float, adaptive: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    Move every parameter that has a gradient to the SAM point `w + e`, `e = rho * g / ||g||` (adaptive:
    `e = rho * w^2 g / ||w g||`), with the norm taken over all of them.

    Args:
        params (iterable of `torch.Tensor`): the parameters; those whose `.grad` is `None` are left alone.
        rho (`float`): the radius of the ascent (>= 0).
        adaptive (`bool`, defaults to `False`): scale the ascent by `|w|` per element (ASAM).

    Returns:
        `list[tuple[torch.Tensor, torch.Tensor]]`: (parameter, its original weights), for `restore`. Empty when no
        parameter has a gradient; with a zero or non-finite gradient norm (e.g. an fp16 overflow the grad scaler will
        skip) the weights are not moved.
    """
    _check_rho(rho)
    params = [p for p in params if p.grad is not None]
    if not params or rho == 0:
        return []
    grads = [p.grad.detach() for p in params]
    scaled = [g * p.detach().abs() for p, g in zip(params, grads)] if adaptive else grads
    # per-tensor norms in at least fp32, combined in fp64 (parameters may mix dtypes)
    norms = [torch.linalg.vector_norm(s, dtype=torch.promote_types(s.dtype, torch.float32)) for s in scaled]
    norm = torch.linalg.vector_norm(torch.stack([n.double() for n in norms]))
    if not torch.isfinite(norm) or norm == 0:
        return []
    saved = [(p, p.detach().clone()) for p in params]
    scale = rho / (norm.item() + _NORM_EPS)
    for p, s in zip(params, scaled):
        e = s * p.detach().abs() if adaptive else s  # adaptive: w^2 g = |w| * (|w| g)
        p.add_(e.to(p.dtype), alpha=scale)
    return saved


@torch.no_grad()
def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the weights that `ascend` saved (bit-exact)."""
    for p, original in saved:
        p.copy_(original)


@contextlib.contextmanager
def frozen_running_stats(module: torch.nn.Module) -> Iterator[None]:
    """
    Inside the block, BatchNorm layers normalise with the batch as usual but leave their running statistics (and
    `num_batches_tracked`) as they were: the pass at `w + e` must not count as a second batch.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class SAM(torch.optim.Optimizer):
    """
    SAM around any optimizer: the base optimizer's step, taken from the weights w with the gradient at `w + e`.

    It shares the base optimizer's `param_groups` (so learning-rate schedulers work on either) and its `state_dict`.

    Args:
        base_optimizer (`torch.optim.Optimizer`): the optimizer that takes the step (SGD, AdamW, ...).
        rho (`float`, defaults to 0.05): the radius of the ascent (>= 0; 0 is the base optimizer).
        adaptive (`bool`, defaults to `False`): adaptive SAM (ASAM), element-wise scaled by `|w|`.

    Example:
        ```python
        optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)  # to w + e
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)  # back to w, then the base step with the gradient at w + e
        # or, with a closure that zeroes the gradients, computes the loss and calls backward():
        optimizer.step(closure)
        ```
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False) -> None:
        _check_rho(rho)
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}.")
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive = float(rho), bool(adaptive)
        super().__init__(base_optimizer.param_groups, {})
        self.param_groups = base_optimizer.param_groups  # one list: a scheduler on either sets both
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to `w + e` using the gradients now in `.grad` (computed at w)."""
        if self._saved:
            raise RuntimeError("SAM.first_step was called twice without second_step in between.")
        self._saved = ascend(self._params(), self.rho, self.adaptive)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Go back to w and take the base optimizer's step with the gradients now in `.grad` (computed at `w + e`)."""
        restore(self._saved)
        self._saved = []
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """
        One full SAM update. `closure` must zero the gradients, compute the loss, call `backward()` and return the
        loss; it is called twice (at w and at `w + e`). Returns the loss at w.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure (it evaluates the loss twice); or call first_step/second_step.")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)


@dataclass
class SAMArguments:
    """
    `--sam_rho` and `--sam_adaptive` for any `HfArgumentParser` script (cooperative with the other argument classes).
    """

    sam_rho: float = field(
        default=0.0,
        metadata={
            "help": "[SAM] Sharpness-Aware Minimization radius rho (Foret et al. 2021; 0.05 is the paper's usual "
            "value): every step takes its gradient at the weights moved by rho along the normalised gradient, at the "
            "cost of a second forward/backward. 0 turns SAM off."
        },
    )
    sam_adaptive: bool = field(
        default=False, metadata={"help": "[SAM] Adaptive SAM (ASAM): scale the ascent element-wise by |w|."}
    )

    def __post_init__(self) -> None:
        _check_rho(self.sam_rho)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class SAMTrainingArguments(SAMArguments, DPPFTrainingArguments):
    """`DPPFTrainingArguments` (the stock flags, `--dppf` and `--dppf_*`) plus `--sam_rho` and `--sam_adaptive`."""


class SAMTrainer(DPPFTrainer):
    """
    `DPPFTrainer` that runs SAM when `args.sam_rho > 0` (`SAMTrainingArguments`): every micro-batch is a forward/
    backward at w (without gradient all-reduce), an ascent to `w + e`, and a forward/backward there whose gradient the
    stock loop (all-reduce under DDP, clipping, optimizer step) uses; the weights are back at w before the step. The
    logged loss is the loss at w; BatchNorm running statistics are updated by the pass at w only. See the module
    docstring for DDP, DPPF and gradient accumulation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, on in (("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled)):
            if on and self.sam_rho > 0:
                raise ValueError(
                    f"--sam_rho={self.sam_rho} with {name} is not supported by SAMTrainer: the ascent needs each "
                    f"process's full gradient and weights. Use DDP (or one process), or --sam_rho 0."
                )

    @property
    def sam_rho(self) -> float:
        """The SAM radius of this run (`args.sam_rho`; 0 when the arguments have no SAM flags)."""
        return float(getattr(self.args, "sam_rho", 0.0))

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        if self.sam_rho == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        accumulated = [p.grad for p in params]  # earlier micro-batches' gradients of this step
        for p in params:
            p.grad = None
        with self.accelerator.no_sync(model):  # the ascent uses this worker's own gradient
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        saved = ascend(params, self.sam_rho, bool(getattr(self.args, "sam_adaptive", False)))
        for p, g in zip(params, accumulated):
            p.grad = g
        # under the loop's own sync decision; lsgd elects on the loss at the weights, not at the perturbed point
        with frozen_running_stats(self.model), self.dppf_loss_unobserved():
            super().training_step(model, dict(inputs), num_items_in_batch)
        restore(saved)
        return loss
