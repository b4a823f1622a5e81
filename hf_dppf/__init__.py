"""
hf_dppf: DPPF (Distributed Pull-Push Force) and Inverse Mean Valley for Accelerate and the Hugging Face Trainer.

The parts, in the order data flows (config -> engine <- integrations):

- `config.py`: `DPPFConfig`, every knob of a run, validated once;
- `strategies.py`: the per-strategy update rules as pure math (dppf, avg, easgd, lsgd, grawa);
- `engine/`: `DPPFConsensus`, the round over torch.distributed (imports config and strategies only);
- `simulate.py`: M workers in one process, the oracle the engine is tested against (never imports the engine);
- `integrations/`: the Accelerate block `DPPF`, `DPPFTrainer`, DeepSpeed replica groups, and their shared helpers;
- `sharpness/`: Inverse Mean Valley, reference measures, loss landscapes (pure torch, independent of the rest);
- `cli/`: the `hf-dppf` command;
- `recipes/`: what the scripts in the repository's `recipes/` folder are built from (data, metrics, SAM, results).
"""

from importlib import import_module
from typing import Any

from .config import DPPFConfig
from .engine import DPPFConsensus, DPPFStats

__version__ = "0.1.0"

# Integrations import Accelerate / transformers: load them on first use so `import hf_dppf` stays light.
_LAZY = {
    "DPPF": ".integrations.accelerate",
    "DPPFTrainer": ".integrations.trainer",
    "DPPFTrainingArguments": ".integrations.trainer",
}

__all__ = ["DPPFConfig", "DPPFConsensus", "DPPFStats", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hf_dppf' has no attribute {name!r}")
