"""What a model can take, per family: the input positions it really has, and a pad id for batching a decoder
classifier whose config has none."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn


def usable_positions(model: nn.Module) -> int | None:
    """Tokens an input of `model` may have: `config.max_position_embeddings`, minus the positions a family skips.

    RoBERTa, XLM-R, MPNet, ESM and Longformer number positions from `padding_idx + 1` (their position embedding
    has a `padding_idx`), so `max_position_embeddings - padding_idx - 1` tokens fit (512 of 514). Families that
    offset positions by sizing the table larger (OPT, BART) are already counted right by their config. `None`:
    the config names no positions.
    """
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    for module in model.modules():  # the embeddings' own table of positions, when the family has one
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, nn.Embedding) and table.padding_idx is not None:
            return min(positions, table.num_embeddings) - table.padding_idx - 1
    return positions


@contextlib.contextmanager
def batch_pad_id(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> Iterator[int]:
    """The id to right-pad `sequences` with for one forward of `model` (`pad_id` normally).

    A decoder classifier (`GPT2ForSequenceClassification`, `LlamaForSequenceClassification`, ...) pools the last
    token that is not `config.pad_token_id`, and refuses batches of more than one row when that is `None`. For
    such a model and a batch of several rows, the config's pad id is set, for the duration of the forward, to an
    id that none of the rows contains: every row then pools its own last token, as it does alone.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if len(sequences) < 2 or text_config is None or getattr(text_config, "pad_token_id", 0) is not None:
        yield pad_id
        return
    used = {int(t) for seq in sequences for t in seq}
    free = next(i for i in range(len(used) + 1) if i not in used)
    text_config.pad_token_id = free
    try:
        yield free
    finally:
        text_config.pad_token_id = None
