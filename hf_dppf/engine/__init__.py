"""
The DPPF engine: `DPPFConsensus` runs consensus rounds over torch.distributed. Pure torch; it imports only
`hf_dppf.config` and `hf_dppf.strategies`, never an integration.
"""

from .consensus import DPPFConsensus
from .health import FINGERPRINT_BYTES
from .stats import DPPFStats

__all__ = ["DPPFConsensus", "DPPFStats", "FINGERPRINT_BYTES"]
