"""
Inverse Mean Valley (IMV): the sharpness measure of DPPF, reconstructed from the paper's abstract.

Definition used here. From the weights `x` draw `K` random directions `d_k`, filter-normalised (each filter of
`d_k` has the norm of the matching filter of `x`, see `hf_dppf.sharpness.perturbation.random_direction`). Along each
direction and each sign `s = +1, -1`, the valley wall is the smallest step `t > 0` at which the loss on a fixed
evaluation set exceeds the threshold, `L(x + s * t * d_k) > L(x) + delta` (or `> L(x) * (1 + ratio)`). The
**Mean Valley** is the mean of those `2K` widths and **IMV = 1 / MV**: larger means sharper. Because a unit step
moves every filter by its own norm, the widths are invariant to the layer-wise rescalings that leave a ReLU or
normalised network's function unchanged; on a quadratic bowl `L(x + u) = L(x) + u'Hu / 2` the width along `d`
is `sqrt(2 * delta / d'Hd)`.

Each wall is located by bracketing (doubling from `init_step`, up to `max_step`) and bisection down to a relative
precision `rel_tol`; the negative sign starts its bracket at the positive sign's width. The reference measures
(epsilon-sharpness, Hessian top eigenvalue and trace) are in `reference.py`; loss-landscape slices and plots in
`landscape.py`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .perturbation import Batch, LossFn, map_over_ranks, measurement, random_direction

__all__ = ["ValleyResult", "mean_valley", "inverse_mean_valley", "valley_threshold"]

DEFAULT_DELTA = 0.1


@dataclass
class ValleyResult:
    """
    The outcome of `mean_valley` / `inverse_mean_valley`.

    Attributes:
        value (`float`): the measure that was asked for (MV for `mean_valley`, IMV for `inverse_mean_valley`).
        mean_valley (`float`): mean of the `2K` widths, in units of filter-normalised steps.
        inverse_mean_valley (`float`): `1 / mean_valley`.
        widths (`torch.Tensor`): float64 `[K, 2]`, the width along `+d_k` (column 0) and `-d_k` (column 1).
        base_loss (`float`): the loss at the unperturbed weights.
        threshold (`float`): the loss level that defines a valley wall.
        capped (`int`): walls not found before `max_step` (their width counts as `max_step`).
        evaluations (`int`): passes over the evaluation set, summed over directions (and ranks).
    """

    value: float
    mean_valley: float
    inverse_mean_valley: float
    widths: torch.Tensor
    base_loss: float
    threshold: float
    capped: int
    evaluations: int

    def __float__(self) -> float:
        return self.value


def valley_threshold(base_loss: float, delta: float | None = None, ratio: float | None = None) -> float:
    """
    The loss level of a valley wall: `base_loss + delta`, or `base_loss * (1 + ratio)`; `delta=0.1` if neither.

    Raises:
        `ValueError`: both given, a non-positive or non-finite value, or `ratio` with a non-positive `base_loss`.
    """
    if delta is not None and ratio is not None:
        raise ValueError(f"Give delta or ratio, not both (got delta={delta!r}, ratio={ratio!r}).")
    for name, value in (("delta", delta), ("ratio", ratio)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} is invalid: it must be a finite number > 0.")
    if not math.isfinite(base_loss):
        raise ValueError(f"The loss at the weights is {base_loss}: a valley needs a finite loss to start from.")
    if ratio is None:
        return base_loss + (DEFAULT_DELTA if delta is None else delta)
    if base_loss <= 0:
        raise ValueError(f"ratio={ratio} needs a positive loss at the weights, got {base_loss}; use delta instead.")
    return base_loss * (1 + ratio)


@dataclass(frozen=True)
class _Search:
    init_step: float
    max_step: float
    rel_tol: float

    def __post_init__(self) -> None:
        if not 0 < self.init_step <= self.max_step or not math.isfinite(self.max_step):
            raise ValueError(
                f"init_step={self.init_step!r}, max_step={self.max_step!r} are invalid: "
                "need 0 < init_step <= max_step < inf."
            )
        if not 0 < self.rel_tol < 1:
            raise ValueError(f"rel_tol={self.rel_tol!r} is invalid: it must be in (0, 1).")

    def first_crossing(self, above: Callable[[float], bool], guess: float) -> tuple[float, bool]:
        """
        The smallest `t > 0` with `above(t)`, to a relative precision `rel_tol`, and whether `max_step` capped it.

        The bracket `[lo, hi]` (`not above(lo)`, `above(hi)`) is found by halving or doubling from `guess`, then
        narrowed by bisection; the midpoint of the final bracket is returned.
        """
        lo, hi = 0.0, min(guess, self.max_step)
        if above(hi):
            floor = self.max_step * self.rel_tol * 1e-9
            while hi > floor and above(hi / 2):
                hi /= 2
            lo = hi / 2 if hi > floor else 0.0
        else:
            while not above(hi):
                if hi >= self.max_step:
                    return self.max_step, True
                lo, hi = hi, min(2 * hi, self.max_step)
        while hi - lo > self.rel_tol * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if above(mid) else (mid, hi)
        return (lo + hi) / 2, False


def mean_valley(
    model: nn.Module,
    data: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    num_directions: int = 10,
    delta: float | None = None,
    ratio: float | None = None,
    seed: int = 0,
    bias_mode: str = "norm",
    init_step: float = 0.1,
    max_step: float = 10.0,
    rel_tol: float = 1e-2,
    params: Iterable[nn.Parameter] | None = None,
    process_group: dist.ProcessGroup | None = None,
    progress: bool = False,
) -> ValleyResult:
    """
    Mean Valley: the mean width of the loss valley around the weights along random filter-normalised directions.

    See the module docstring for the definition. Runs under `torch.no_grad()` in eval mode; the model's weights and
    train/eval flags are restored exactly afterwards. When torch.distributed is initialised the directions are
    split across the ranks of `process_group` (every rank must hold the same weights and evaluation data) and every
    rank returns the same result, equal to a single-process run's.

    Args:
        model (`nn.Module`): a Hugging Face model (dict batches with labels, `.loss`) or any module with `loss_fn`.
        data (`Iterable`): the fixed evaluation set, as batches on any device (moved to the model's).
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*):
            `loss_fn(model, batch)` -> mean loss of the batch; defaults to `model(**batch).loss`.
        num_directions (`int`, defaults to 10): `K`, the number of random directions (each used in both signs).
        delta (`float`, *optional*): the wall is at `loss(x) + delta` (default 0.1 when `ratio` is not given).
        ratio (`float`, *optional*): the wall is at `loss(x) * (1 + ratio)` instead.
        seed (`int`, defaults to 0): seed of the directions; the same seed gives the same value.
        bias_mode (`str`, defaults to `"norm"`): rule for 1-D parameters, `"norm"` or `"zero"` (see
            `random_direction`).
        init_step (`float`, defaults to 0.1): first step tried when bracketing, in filter-normalised units.
        max_step (`float`, defaults to 10.0): widths are capped here (and counted in `capped`).
        rel_tol (`float`, defaults to 0.01): relative precision of each width.
        params (`Iterable[nn.Parameter]`, *optional*): the parameters to perturb; defaults to the trainable ones.
        process_group (`ProcessGroup`, *optional*): the ranks to split the directions over.
        progress (`bool`, defaults to `False`): show a tqdm progress bar over the directions (rank 0).

    Returns:
        `ValleyResult` with `value` = MV.

    Example:
        ```python
        >>> from hf_dppf.sharpness import inverse_mean_valley
        >>> result = inverse_mean_valley(model, eval_batches, num_directions=20, delta=0.1)
        >>> result.value, result.widths.shape
        (2.31, torch.Size([20, 2]))
        ```
    """
    if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions={num_directions!r} is invalid: it must be an integer >= 1.")
    search = _Search(init_step, max_step, rel_tol)
    with torch.no_grad(), measurement(model, data, loss_fn, params) as (evalset, moved):
        base_loss = evalset.loss()
        threshold = valley_threshold(base_loss, delta, ratio)

        def widths_along(k: int) -> tuple[float, float, float, float]:
            direction = [random_direction(moved.origin, seed, k, bias_mode)]
            calls = 0

            def above(t: float) -> bool:
                nonlocal calls
                calls += 1
                moved.move(direction, [t])
                return not evalset.loss() <= threshold  # a NaN / inf loss is above every wall

            plus, capped_plus = search.first_crossing(above, init_step)
            minus, capped_minus = search.first_crossing(lambda t: above(-t), plus)
            return plus, minus, capped_plus + capped_minus, calls

        table = map_over_ranks(num_directions, widths_along, 4, process_group, "valley" if progress else None)
    widths = table[:, :2].clone()
    mv = widths.mean().item()
    return ValleyResult(
        value=mv,
        mean_valley=mv,
        inverse_mean_valley=1.0 / mv if mv > 0 else math.inf,
        widths=widths,
        base_loss=base_loss,
        threshold=threshold,
        capped=int(table[:, 2].sum().item()),
        evaluations=int(table[:, 3].sum().item()) + 1,
    )


def inverse_mean_valley(
    model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None, **kwargs: Any
) -> ValleyResult:
    """
    Inverse Mean Valley, `1 / mean_valley(...)`: larger means a sharper minimum.

    Takes exactly the arguments of `mean_valley` and returns its `ValleyResult` with `value` = IMV.
    """
    result = mean_valley(model, data, loss_fn, **kwargs)
    return replace(result, value=result.inverse_mean_valley)


inverse_mean_valley.__signature__ = inspect.signature(mean_valley).replace(return_annotation="ValleyResult")
