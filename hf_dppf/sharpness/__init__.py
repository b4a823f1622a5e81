"""
Sharpness tools: how flat is the valley a model sits in.

- `valley.py`: Inverse Mean Valley and Mean Valley, the paper's measure (`inverse_mean_valley`, `mean_valley`);
- `reference.py`: the measures to compare it against (epsilon-sharpness, Hessian top eigenvalue and trace);
- `landscape.py`: loss-landscape slices and their pictures (`loss_landscape`);
- `perturbation.py`: what they share: the fixed evaluation set, filter-normalised random directions, moving and
  restoring the weights, and splitting the work across ranks.

Imports: torch (and torch.distributed to share work across ranks) only; nothing else of `hf_dppf`. The measures take
any `nn.Module`, trained with DPPF or not.
"""

from .landscape import LandscapeResult, loss_landscape
from .reference import epsilon_sharpness, hessian_top_eigenvalue, hessian_trace
from .valley import ValleyResult, inverse_mean_valley, mean_valley, valley_threshold

__all__ = [
    "LandscapeResult",
    "ValleyResult",
    "epsilon_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "inverse_mean_valley",
    "loss_landscape",
    "mean_valley",
    "valley_threshold",
]
