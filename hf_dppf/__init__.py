"""hf_dppf: DPPF (Distributed Pull-Push Force) and Inverse Mean Valley for Accelerate and the Hugging Face Trainer."""

from importlib import import_module
from typing import Any

from .config import DPPFConfig
from .engine import DPPFConsensus, DPPFStats

__version__ = "0.1.0"

# Integrations import Accelerate / transformers: load them on first use so `import hf_dppf` stays light.
_LAZY = {
    "DPPF": ".accelerate",
    "DPPFTrainer": ".trainer",
    "DPPFTrainingArguments": ".trainer",
}

__all__ = ["DPPFConfig", "DPPFConsensus", "DPPFStats", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hf_dppf' has no attribute {name!r}")
