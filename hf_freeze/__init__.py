"""hf_freeze: freeze converged blocks of Hugging Face models as a growing prefix, and skip them with a cache."""

from .cache import PrefixCache, StaleCacheError
from .callback import FreezeCallback
from .checkpoint import BaseMismatchError, FreezeMetadata, load_suffix, read_metadata, save_suffix
from .config import FreezeConfig
from .freezing import FreezeResult, freeze_prefix, frozen_boundary, frozen_parameters, get_layout, unfreeze
from .layout import BlockLayout, UnsupportedModelError, find_layout
from .policy import FreezeDecision, FreezePolicy, Progress, build_policy
from .trainer import FreezeTrainer

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "BlockLayout",
    "FreezeCallback",
    "FreezeConfig",
    "FreezeDecision",
    "FreezeMetadata",
    "FreezePolicy",
    "FreezeResult",
    "FreezeTrainer",
    "PrefixCache",
    "Progress",
    "StaleCacheError",
    "UnsupportedModelError",
    "build_policy",
    "find_layout",
    "freeze_prefix",
    "frozen_boundary",
    "frozen_parameters",
    "get_layout",
    "load_suffix",
    "read_metadata",
    "save_suffix",
    "unfreeze",
]
