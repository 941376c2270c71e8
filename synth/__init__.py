"""PASTA-Gen-style synthetic tumor CT: phantom anatomy, 15 lesion types, structured reports."""
from synth.vocabulary import ATTRIBUTES, HOST_ORGANS, LESION_TYPES, LESION_TYPE_NAMES, PHASES, T_STAGES

__all__ = ["ATTRIBUTES", "HOST_ORGANS", "LESION_TYPES", "LESION_TYPE_NAMES", "PHASES", "T_STAGES"]
