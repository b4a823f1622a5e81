"""
The machinery shared by the sharpness measures (`valley.py`, `reference.py`) and the loss-landscape slices
(`landscape.py`):

- `EvalSet`: a fixed evaluation set (materialised once, on the model's device) and the mean loss over it;
- `random_direction`: filter-normalised random directions (Li et al., 2018), deterministic for a seed;
- `WeightPerturbation`: moves the weights to `x0 + sum_j c_j * d_j` and restores them bit for bit afterwards;
- `map_over_ranks`: splits independent work items (directions, grid points) across torch.distributed ranks and
  gathers the results so that every rank returns what a single process would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Batch = Any
# `loss_fn(model, batch)` returns the mean loss of the batch as a scalar tensor.
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

BIAS_MODES = ("norm", "zero")


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The Hugging Face convention: `model(**batch).loss` for a dict batch that holds the labels."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"Without loss_fn a batch must be a dict of model inputs with labels (Hugging Face style), got a "
            f"{type(batch).__name__}; pass loss_fn=lambda model, batch: ... for other batches."
        )
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            f"model(**batch) returned no loss (batch keys: {sorted(batch)}): include the labels in the batch or "
            "pass loss_fn."
        )
    return loss


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_size(batch: Batch) -> int:
    """Examples in a batch: the leading dimension of its first tensor (1 when it holds no tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return _batch_size(value)
    return 1


class EvalSet:
    """
    A fixed evaluation set and the loss averaged over it.

    The batches are read once (a shuffling `DataLoader` is frozen in the order of that one pass) and moved to the
    model's device. The loss of the set is the mean of the batch losses weighted by the batch sizes, i.e. the mean
    over examples when `loss_fn` returns a per-batch mean.

    Args:
        model (`nn.Module`): the model whose loss is measured.
        data (`Iterable`): batches: dicts of model inputs with labels (Hugging Face models) or anything `loss_fn`
            understands, e.g. `(inputs, targets)` tuples.
        loss_fn (`Callable[[nn.Module, Any], torch.Tensor]`, *optional*):
            `loss_fn(model, batch)` -> mean loss of the batch. Defaults to `model(**batch).loss`.
    """

    def __init__(self, model: nn.Module, data: Iterable[Batch], loss_fn: LossFn | None = None) -> None:
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to perturb or measure.")
        self.model = model
        self.loss_fn = loss_fn or default_loss
        self.batches = [_to_device(b, first.device) for b in data]
        if not self.batches:
            raise ValueError("The evaluation data yielded no batch; pass a non-empty list or DataLoader.")
        sizes = [_batch_size(b) for b in self.batches]
        self.num_examples = sum(sizes)
        self.weights = [s / self.num_examples for s in sizes]

    def weighted_losses(self) -> Iterator[tuple[float, torch.Tensor]]:
        """`(weight, loss)` for every batch, with the autograd graph when grad mode is on."""
        for weight, batch in zip(self.weights, self.batches):
            yield weight, self.loss_fn(self.model, batch)

    @torch.no_grad()
    def loss(self) -> float:
        """The mean loss over the set at the model's current weights."""
        return math.fsum(w * float(loss) for w, loss in self.weighted_losses())


def trainable_parameters(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> list[nn.Parameter]:
    """`params` as a list, or every parameter of `model` with `requires_grad=True`."""
    chosen = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not chosen:
        raise ValueError(f"No parameter to perturb in {type(model).__name__}: all are frozen (requires_grad=False).")
    return chosen


def direction_seed(seed: int, index: int) -> int:
    """A 63-bit seed for direction `index`, independent of how many directions are drawn or on which rank."""
    digest = hashlib.blake2b(f"hf_dppf:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_direction(
    params: Sequence[torch.Tensor], seed: int = 0, index: int = 0, bias_mode: str = "norm"
) -> list[torch.Tensor]:
    """
    A filter-normalised Gaussian direction (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

    A Gaussian tensor is drawn for every parameter; for a parameter with 2 or more dimensions each filter (a slice
    along dimension 0: an output row of a `Linear`, an output channel of a `Conv`, a row of an `Embedding`) is
    rescaled to the norm of the same filter of the weights, so a unit step moves every filter by its own norm and
    the direction follows any rescaling that leaves a ReLU or normalised network's function unchanged.
    One-dimensional parameters (biases, normalisation gains) follow `bias_mode`: `"norm"` rescales the whole
    vector to the parameter's norm (then `||d|| = ||x||` exactly, so a step `t` moves the weights by `t * ||x||`),
    `"zero"` leaves them unperturbed (the choice of Li et al.'s plots).

    The Gaussian draws come from a CPU `torch.Generator` seeded with `direction_seed(seed, index)`, so a direction
    is the same on every device, rank and run.

    Args:
        params (`Sequence[torch.Tensor]`): the weights `x` the direction is normalised against.
        seed (`int`, defaults to 0): the seed of the family of directions.
        index (`int`, defaults to 0): which direction of the family.
        bias_mode (`str`, defaults to `"norm"`): `"norm"` or `"zero"`, the rule for 1-D parameters.

    Returns:
        `list[torch.Tensor]`: one tensor per parameter, same shape, dtype and device.
    """
    if bias_mode not in BIAS_MODES:
        raise ValueError(f"bias_mode={bias_mode!r} is invalid: use one of {list(BIAS_MODES)}.")
    generator = torch.Generator().manual_seed(direction_seed(seed, index))
    direction = []
    for p in params:
        x = p.detach()
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        g = torch.randn(x.shape, generator=generator).to(x.device, compute_dtype)
        if x.dim() <= 1 and bias_mode == "zero":
            d = torch.zeros_like(g)
        else:
            rows = 1 if x.dim() <= 1 else x.shape[0]
            g2, x2 = g.reshape(rows, -1), x.to(compute_dtype).reshape(rows, -1)
            scale = x2.norm(dim=1, keepdim=True) / g2.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
            d = (g2 * scale).reshape(x.shape)
        direction.append(d.to(x.dtype))
    return direction


class WeightPerturbation:
    """
    Context manager that moves the weights along directions and puts them back exactly.

    On entry it saves a copy of the parameters and every submodule's train/eval flag and switches the model to
    eval mode (no dropout; BatchNorm uses its running statistics). `move(directions, coefficients)` sets the
    weights to `x0 + sum_j c_j * d_j` (always from the saved `x0`, so nothing drifts); on exit the saved tensors are
    copied back bit for bit and the flags restored, even when an exception is raised.

    Args:
        model (`nn.Module`): the model.
        params (`Sequence[nn.Parameter]`): the parameters to move (see `trainable_parameters`).
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        self.model = model
        self.params = list(params)

    def __enter__(self) -> WeightPerturbation:
        self.origin = [p.detach().clone() for p in self.params]
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    @torch.no_grad()
    def move(self, directions: Sequence[Sequence[torch.Tensor]], coefficients: Sequence[float]) -> None:
        """Set the parameters to `x0 + sum_j coefficients[j] * directions[j]`."""
        for i, (p, x0) in enumerate(zip(self.params, self.origin)):
            p.copy_(x0)
            for d, c in zip(directions, coefficients):
                p.add_(d[i], alpha=c)

    @torch.no_grad()
    def restore(self) -> None:
        for p, x0 in zip(self.params, self.origin):
            p.copy_(x0)

    def __exit__(self, *exc: object) -> None:
        self.restore()
        for module, training in self._modes:
            module.training = training


@contextmanager
def measurement(
    model: nn.Module,
    data: Iterable[Batch],
    loss_fn: LossFn | None = None,
    params: Iterable[nn.Parameter] | None = None,
) -> Iterator[tuple[EvalSet, WeightPerturbation]]:
    """
    What every measure starts with: the fixed evaluation set, and a `WeightPerturbation` of the chosen parameters
    (`moved.params`, `moved.origin`) that holds the model in eval mode and restores it on exit.
    """
    evalset = EvalSet(model, data, loss_fn)
    with WeightPerturbation(model, trainable_parameters(model, params)) as moved:
        yield evalset, moved


def map_over_ranks(
    count: int,
    fn: Callable[[int], Sequence[float]],
    width: int,
    process_group: dist.ProcessGroup | None = None,
    progress: str | None = None,
) -> torch.Tensor:
    """
    Evaluate `fn(i)` for `i in range(count)`, split round-robin across ranks when torch.distributed is initialised.

    Every item is computed by exactly one rank into a zero-filled table; one all-reduce (SUM) then hands the full
    table to every rank. Adding zeros is exact, so the result equals a single-process run's bit for bit, as long as
    `fn(i)` itself does not depend on the rank.

    Args:
        count (`int`): number of items.
        fn (`Callable[[int], Sequence[float]]`): item index -> `width` numbers.
        width (`int`): numbers per item.
        process_group (`ProcessGroup`, *optional*): the group to split over (default: the world).
        progress (`str`, *optional*): show a tqdm progress bar with this description on rank 0.

    Returns:
        `torch.Tensor`: float64 `[count, width]`, the same on every rank.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(process_group) if distributed else 0
    world = dist.get_world_size(process_group) if distributed else 1
    table = torch.zeros(count, width, dtype=torch.float64)
    items = range(rank, count, world)
    if progress is not None and rank == 0:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=progress, unit="item")
    for i in items:
        table[i] = torch.tensor(list(fn(i)), dtype=torch.float64)
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if _backend(process_group) == "nccl" else "cpu"
        buffer = table.to(device)
        dist.all_reduce(buffer, group=process_group)
        table = buffer.cpu()
    return table


def _backend(process_group: dist.ProcessGroup | None) -> str:
    return str(dist.get_backend(process_group)).lower()
