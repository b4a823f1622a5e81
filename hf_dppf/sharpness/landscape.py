"""
Loss-landscape slices and their pictures: the loss along one or two filter-normalised random directions around a
model (Li et al., 2018), or along the line through two models, e.g. a DPPF worker and the workers' average, which
shows the valley the workers span. `loss_landscape` is also importable from `hf_dppf.sharpness`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .perturbation import Batch, LossFn, map_over_ranks, measurement, random_direction

MODES = ("1d", "2d", "line")

_AXIS_LABELS = {
    "1d": "step along a filter-normalised direction (x filter norm)",
    "2d": "step along direction 1 (x filter norm)",
    "line": "t along the line between the models (0 = model, 1 = other)",
}
_TITLES = {
    "1d": "Loss along a random filter-normalised direction",
    "2d": "Loss on a random filter-normalised 2-D slice",
    "line": "Loss along the line through two models",
}


@dataclass
class LandscapeResult:
    """
    A loss-landscape slice.

    Attributes:
        mode (`str`): `"1d"`, `"2d"` or `"line"`.
        x (`torch.Tensor`): float64 coordinates along the first axis (always containing 0, and 1 for `"line"`).
        y (`torch.Tensor`, *optional*): coordinates along the second axis (`"2d"` only).
        losses (`torch.Tensor`): float64 `[len(x)]`, or `[len(x), len(y)]` for `"2d"` (`losses[i, j]` at
            `(x[i], y[j])`).
        base_loss (`float`): the loss at the model's weights (coordinate 0).
        other_loss (`float`, *optional*): the loss at the other model (`"line"`, coordinate 1).
    """

    mode: str
    x: torch.Tensor
    y: torch.Tensor | None
    losses: torch.Tensor
    base_loss: float
    other_loss: float | None = None

    def plot(self, path: str | Path, title: str | None = None, labels: Sequence[str] = ("model", "other")) -> Path:
        """
        Draw the slice to a PNG file (matplotlib, no display needed): a line plot for `"1d"` / `"line"`, filled
        contours for `"2d"` (log10 of the loss when it spans more than two decades).

        Args:
            path (`str` or `Path`): the PNG to write (parent folders are created).
            title (`str`, *optional*): the plot title; a description of the slice by default.
            labels (`Sequence[str]`, defaults to `("model", "other")`): names of the two marked points.

        Returns:
            `Path`: the file written.
        """
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.add_subplot()
        if self.mode == "2d":
            self._draw_contours(fig, ax)
            ax.plot([0], [0], "r*", markersize=12, label=labels[0])
            ax.set_ylabel("step along direction 2 (x filter norm)")
        else:
            ax.plot(self.x.numpy(), self.losses.numpy(), "o-", markersize=3, color="tab:blue")
            ax.axvline(0.0, color="tab:red", linestyle="--", label=f"{labels[0]}: {self.base_loss:.4g}")
            if self.other_loss is not None:
                ax.axvline(1.0, color="tab:green", linestyle="--", label=f"{labels[1]}: {self.other_loss:.4g}")
            ax.set_ylabel("loss")
        ax.set_xlabel(_AXIS_LABELS[self.mode])
        ax.set_title(title or _TITLES[self.mode])
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path

    def _draw_contours(self, fig, ax) -> None:
        z = self.losses.T.numpy()
        low, high = float(z.min()), float(z.max())
        logarithmic = low > 0 and math.isfinite(high) and high / low > 100
        filled = ax.contourf(
            self.x.numpy(), self.y.numpy(), torch.log10(self.losses.T).numpy() if logarithmic else z, 30
        )
        fig.colorbar(filled, ax=ax, label="log10 loss" if logarithmic else "loss")


def _grid(low: float, high: float, points: int, fixed: Iterable[float]) -> torch.Tensor:
    values = {round(low + (high - low) * i / (points - 1), 12) for i in range(points)} | set(fixed)
    return torch.tensor(sorted(values), dtype=torch.float64)


def _line_direction(
    model: nn.Module, params: Sequence[nn.Parameter], other: nn.Module | Mapping[str, torch.Tensor]
) -> list[torch.Tensor]:
    """`x_other - x` for every parameter in `params`, matched by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    theirs = dict(other.named_parameters()) if isinstance(other, nn.Module) else dict(other)
    direction = []
    for p in params:
        name = names.get(id(p))
        if name not in theirs:
            raise ValueError(f"The other model has no parameter {name!r}; it must have the same architecture.")
        q = theirs[name].detach()
        if q.shape != p.shape:
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(q.shape)} in the other model, {tuple(p.shape)} here."
            )
        direction.append(q.to(p.device, p.dtype) - p.detach())
    return direction


def loss_landscape(
    model: nn.Module,
    data: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    mode: str | None = None,
    other: nn.Module | Mapping[str, torch.Tensor] | None = None,
    span: float = 1.0,
    points: int = 21,
    seed: int = 0,
    bias_mode: str = "norm",
    params: Iterable[nn.Parameter] | None = None,
    output: str | Path | None = None,
    title: str | None = None,
    process_group: dist.ProcessGroup | None = None,
    progress: bool = False,
) -> LandscapeResult:
    """
    The loss on a 1-D or 2-D slice of weight space through the model, and optionally its picture.

    - `"1d"`: `L(x + a * d)` for `a` in `[-span, span]`, `d` the filter-normalised direction number 0 of `seed`
      (the same as `mean_valley`'s first direction).
    - `"2d"`: `L(x + a * d0 + b * d1)` on a `points x points` grid over `[-span, span]^2`.
    - `"line"`: `L(x + t * (x_other - x))` for `t` in `[-span / 2, 1 + span / 2]`: 0 is the model, 1 the other.

    The grid always contains 0 (and 1 for `"line"`) exactly. Weights and train/eval flags are restored exactly; grid
    points are split across ranks when torch.distributed is initialised, and every rank gets the whole slice.

    Args:
        model (`nn.Module`): a Hugging Face model (dict batches with labels) or any module with `loss_fn`.
        data (`Iterable`): the fixed evaluation set, as batches.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*): `loss_fn(model, batch)` -> mean loss;
            defaults to `model(**batch).loss`.
        mode (`str`, *optional*): `"1d"`, `"2d"` or `"line"`; `"line"` when `other` is given, `"1d"` otherwise.
        other (`nn.Module` or `Mapping[str, torch.Tensor]`, *optional*): the second model of a `"line"` slice (same
            architecture), or its `named_parameters()` / state dict.
        span (`float`, defaults to 1.0): the extent of the slice (see above).
        points (`int`, defaults to 21): grid points per axis (before 0 and 1 are added).
        seed (`int`, defaults to 0): seed of the random directions.
        bias_mode (`str`, defaults to `"norm"`): rule for 1-D parameters, `"norm"` or `"zero"`.
        params (`Iterable[nn.Parameter]`, *optional*): the parameters that move; defaults to the trainable ones.
        output (`str` or `Path`, *optional*): write the plot to this PNG.
        title (`str`, *optional*): the plot's title.
        process_group (`ProcessGroup`, *optional*): the ranks to split the grid over.
        progress (`bool`, defaults to `False`): show a tqdm progress bar (rank 0).

    Returns:
        `LandscapeResult`.
    """
    mode = mode or ("line" if other is not None else "1d")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: use one of {list(MODES)}.")
    if (mode == "line") != (other is not None):
        raise ValueError(f"mode={mode!r} with other={'given' if other is not None else None}: 'line' needs other.")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span={span!r} is invalid: it must be a finite number > 0.")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points={points!r} is invalid: it must be an integer >= 2.")
    with torch.no_grad(), measurement(model, data, loss_fn, params) as (evalset, moved):
        if mode == "line":
            directions = [_line_direction(model, moved.params, other)]
            axes = [_grid(-span / 2, 1 + span / 2, points, (0.0, 1.0))]
        else:
            directions = [random_direction(moved.origin, seed, k, bias_mode) for k in range(1 if mode == "1d" else 2)]
            axes = [_grid(-span, span, points, (0.0,)) for _ in directions]
        grid = torch.cartesian_prod(*axes).reshape(-1, len(axes))

        def loss_at(i: int) -> tuple[float]:
            moved.move(directions, grid[i].tolist())
            return (evalset.loss(),)

        losses = map_over_ranks(len(grid), loss_at, 1, process_group, f"landscape {mode}" if progress else None)
    losses = losses.reshape(*(len(a) for a in axes))
    origin = [int(torch.nonzero(a == 0.0)[0]) for a in axes]
    result = LandscapeResult(
        mode=mode,
        x=axes[0],
        y=axes[1] if mode == "2d" else None,
        losses=losses,
        base_loss=float(losses[tuple(origin)]),
        other_loss=float(losses[int(torch.nonzero(axes[0] == 1.0)[0])]) if mode == "line" else None,
    )
    if output is not None:
        result.plot(output, title)
    return result
