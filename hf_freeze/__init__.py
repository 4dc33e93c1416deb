"""hf_freeze: freeze converged blocks of Hugging Face models as a growing prefix, and skip them with a cache."""

from .callback import FreezeCallback
from .config import FreezeConfig
from .freezing import FreezeResult, freeze_prefix, frozen_boundary, frozen_parameters, get_layout, unfreeze
from .layout import BlockLayout, UnsupportedModelError, find_layout
from .policy import FreezeDecision, FreezePolicy, Progress, build_policy

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "FreezeCallback",
    "FreezeConfig",
    "FreezeDecision",
    "FreezePolicy",
    "FreezeResult",
    "Progress",
    "UnsupportedModelError",
    "build_policy",
    "find_layout",
    "freeze_prefix",
    "frozen_boundary",
    "frozen_parameters",
    "get_layout",
    "unfreeze",
]
