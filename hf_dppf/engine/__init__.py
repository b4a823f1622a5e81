"""
The DPPF engine: `DPPFConsensus` runs consensus rounds over torch.distributed. Pure torch; it imports only
`hf_dppf.config` and `hf_dppf.strategies`, never an integration.
"""

from .consensus import FINGERPRINT_BYTES, DPPFConsensus, DPPFStats

__all__ = ["DPPFConsensus", "DPPFStats", "FINGERPRINT_BYTES"]
