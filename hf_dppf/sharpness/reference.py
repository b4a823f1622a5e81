"""
Reference sharpness measures, to compare Inverse Mean Valley against:

- `epsilon_sharpness`: the worst loss increase in an L2 ball of radius epsilon around the weights (SAM-style,
  found by a few normalised gradient-ascent steps projected onto the ball);
- `hessian_top_eigenvalue`: the largest-magnitude eigenvalue of the Hessian of the loss (power iteration with
  Hessian-vector products);
- `hessian_trace`: the trace of the Hessian (Hutchinson's estimator with Rademacher vectors).

All three take the model, the evaluation batches and `loss_fn` as `mean_valley` does, run the
model in eval mode, and leave its weights and train/eval flags exactly as they were. Unlike IMV they are measured
in absolute parameter units, so they change when a ReLU network's layers are rescaled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .perturbation import Batch, EvalSet, LossFn, direction_seed, measurement

__all__ = ["epsilon_sharpness", "hessian_top_eigenvalue", "hessian_trace"]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return math.fsum(float(torch.sum(x.double() * y.double())) for x, y in zip(a, b))


def _norm(a: Sequence[torch.Tensor]) -> float:
    return math.sqrt(_dot(a, a))


def _scaled(a: Sequence[torch.Tensor], c: float) -> list[torch.Tensor]:
    return [x * c for x in a]


def _grads(output: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _loss_and_gradient(evalset: EvalSet, params: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """The mean loss over the set and its gradient, accumulated batch by batch."""
    total = [torch.zeros_like(p) for p in params]
    loss_sum = []
    with torch.enable_grad():
        for weight, loss in evalset.weighted_losses():
            for t, g in zip(total, _grads(loss, params)):
                t.add_(g, alpha=weight)
            loss_sum.append(weight * float(loss.detach()))
    return math.fsum(loss_sum), total


def _hvp(evalset: EvalSet, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The Hessian of the set's mean loss times `vector`, by double back-propagation, batch by batch."""
    total = [torch.zeros_like(p) for p in params]
    # fused attention kernels (flash / memory-efficient) have no double backward; the math kernel does
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        for weight, loss in evalset.weighted_losses():
            grads = _grads(loss, params, create_graph=True)
            inner = sum((g * v).sum() for g, v in zip(grads, vector))
            for t, hv in zip(total, _grads(inner, params)):
                t.add_(hv.detach(), alpha=weight)
    return total


def _random_vector(
    params: Sequence[torch.Tensor], seed: int, index: int, rademacher: bool = False
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(direction_seed(seed, index))
    draws = [torch.randn(p.shape, generator=generator) for p in params]
    if rademacher:
        draws = [torch.sign(d) + (d == 0) for d in draws]
    return [d.to(p.device, p.dtype) for d, p in zip(draws, params)]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1.")


def epsilon_sharpness(
    model: nn.Module,
    data: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    epsilon: float = 0.05,
    steps: int = 10,
    seed: int = 0,
    params: Iterable[nn.Parameter] | None = None,
) -> float:
    """
    SAM-style epsilon-sharpness: `max_{||e|| <= epsilon} L(x + e) - L(x)`, estimated by projected ascent.

    The ascent starts from a random point on the sphere of radius `epsilon` (at a minimum the gradient vanishes, so
    SAM's gradient-only first step would stay put) and takes `steps` normalised gradient steps of length `epsilon`,
    each projected back onto the ball: `e <- P(e + epsilon * g / ||g||)`. The largest loss seen is returned, minus the
    loss at `x`. On a quadratic bowl this converges to `lambda_max * epsilon^2 / 2`.

    Args:
        model (`nn.Module`), data (`Iterable`), loss_fn (`Callable`, *optional*): as for `mean_valley`.
        epsilon (`float`, defaults to 0.05): radius of the L2 ball, in parameter units (not relative).
        steps (`int`, defaults to 10): ascent steps.
        seed (`int`, defaults to 0): seed of the random start.
        params (`Iterable[nn.Parameter]`, *optional*): the parameters to perturb; defaults to the trainable ones.

    Returns:
        `float`: the loss increase (>= 0).
    """
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon={epsilon!r} is invalid: it must be a finite number > 0.")
    _check_count("steps", steps)
    with measurement(model, data, loss_fn, params) as (evalset, moved):
        params = moved.params
        base_loss = evalset.loss()
        start = _random_vector(params, seed, 0)
        e = _scaled(start, epsilon / _norm(start))
        worst = base_loss
        for step in range(steps + 1):
            moved.move([e], [1.0])
            if step == steps:
                worst = max(worst, evalset.loss())
                break
            loss, grad = _loss_and_gradient(evalset, params)
            worst = max(worst, loss)
            grad_norm = _norm(grad)
            if grad_norm == 0:
                break
            e = [x + g * (epsilon / grad_norm) for x, g in zip(e, grad)]
            e = _scaled(e, min(1.0, epsilon / _norm(e)))
    return worst - base_loss


def hessian_top_eigenvalue(
    model: nn.Module,
    data: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    params: Iterable[nn.Parameter] | None = None,
) -> float:
    """
    The largest-magnitude eigenvalue of the loss Hessian (the top one at a minimum), by power iteration.

    `v <- Hv / ||Hv||` from a random start; the estimate is the Rayleigh quotient `v'Hv`, and the iteration stops when
    it changes by less than `tol` (relative) or after `iterations` Hessian-vector products.

    Args:
        model (`nn.Module`), data (`Iterable`), loss_fn (`Callable`, *optional*): as for `mean_valley`.
        iterations (`int`, defaults to 20): at most this many Hessian-vector products.
        tol (`float`, defaults to 1e-3): relative change of the estimate that ends the iteration.
        seed (`int`, defaults to 0): seed of the starting vector.
        params (`Iterable[nn.Parameter]`, *optional*): the parameters the Hessian is taken over.

    Returns:
        `float`: the eigenvalue estimate.
    """
    _check_count("iterations", iterations)
    with measurement(model, data, loss_fn, params) as (evalset, moved):
        params = moved.params
        v = _random_vector(params, seed, 0)
        v = _scaled(v, 1.0 / _norm(v))
        estimate = math.nan
        for _ in range(iterations):
            hv = _hvp(evalset, params, v)
            previous, estimate = estimate, _dot(v, hv)
            hv_norm = _norm(hv)
            if hv_norm == 0 or abs(estimate - previous) <= tol * abs(estimate):
                break
            v = _scaled(hv, 1.0 / hv_norm)
    return estimate


def hessian_trace(
    model: nn.Module,
    data: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    samples: int = 20,
    seed: int = 0,
    params: Iterable[nn.Parameter] | None = None,
) -> float:
    """
    The trace of the loss Hessian by Hutchinson's estimator, the mean of `v'Hv` over Rademacher vectors `v`.

    The estimator is unbiased; with Rademacher vectors its variance comes only from the off-diagonal entries (a
    diagonal Hessian gives the exact trace with any number of samples).

    Args:
        model (`nn.Module`), data (`Iterable`), loss_fn (`Callable`, *optional*): as for `mean_valley`.
        samples (`int`, defaults to 20): number of random vectors (one Hessian-vector product each).
        seed (`int`, defaults to 0): seed of the vectors.
        params (`Iterable[nn.Parameter]`, *optional*): the parameters the Hessian is taken over.

    Returns:
        `float`: the trace estimate.
    """
    _check_count("samples", samples)
    with measurement(model, data, loss_fn, params) as (evalset, moved):
        params = moved.params
        quadratic_forms = []
        for k in range(samples):
            v = _random_vector(params, seed, k, rademacher=True)
            quadratic_forms.append(_dot(v, _hvp(evalset, params, v)))
    return math.fsum(quadratic_forms) / samples
