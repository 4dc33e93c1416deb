"""The prefix cache: per-example hidden states at the frozen boundary, so training and evaluation skip the frozen
prefix.

- `keys.py`: example identity (a key column that survives `Trainer`, a digest of each example's inputs);
- `runner.py`: `PrefixRunner`, which stops a forward at a boundary or resumes one from given states;
- `store.py`: `PrefixCache`, the memory or disk store (budget, atomic metadata, fingerprints of the frozen weights);
- `batch.py`: `BatchCache`, the one place that decides per batch what to read, compute, advance and store.
"""

from .batch import BatchCache, CacheStats, CacheVerdict, TrainingProgress, will_see_again
from .runner import PrefixRunner
from .store import PrefixCache, StaleCacheError

__all__ = [
    "BatchCache",
    "CacheStats",
    "CacheVerdict",
    "PrefixCache",
    "PrefixRunner",
    "StaleCacheError",
    "TrainingProgress",
    "will_see_again",
]
