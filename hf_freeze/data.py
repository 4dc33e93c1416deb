"""Datasets for fine-tuning runs (`hf_freeze.training`, the recipes, the benchmarks): load, split, tokenize.

A dataset spec is one of:

- `"rotten_tomatoes"`: the packaged Rotten Tomatoes snippets (`hf_freeze.assets`), text + label.
- `"presidential_debates"`: the packaged 2016 debate statements, text + the speaker's party (3 classes).
- `"convention_speeches"`: the packaged 2012 convention speeches (189 long documents), text + the party (2 classes).
- `"hamlet"`: the packaged Hamlet text, one example per non-empty line.
- a path ending in .csv/.json/.jsonl/.txt (or several, comma-separated): `datasets.load_dataset(<format>, ...)`.
- anything else: `datasets.load_dataset(name)` from the Hub.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from . import assets

_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}


def load_raw(spec: str, seed: int = 0, test_fraction: float = 0.2) -> datasets.DatasetDict:
    """A `DatasetDict` with `train` and `test` splits for a dataset spec (see module docstring).

    Args:
        spec (`str`): `"rotten_tomatoes"`, `"hamlet"`, local files (comma-separated) or a Hub name.
        seed (`int`, defaults to 0): seed of the split, where the data has no `test` split of its own.
        test_fraction (`float`, defaults to 0.2): share of the examples held out for `test`.

    Returns:
        `datasets.DatasetDict` with `train` and `test`.

    Example:
        ```python
        load_raw("rotten_tomatoes")["train"][0]  # {'text': ..., 'label': 0 or 1}
        ```
    """
    if spec == "rotten_tomatoes":
        return assets.rotten_tomatoes(test_fraction=test_fraction, seed=seed)
    if spec == "presidential_debates":
        return assets.presidential_debates(test_fraction=test_fraction, seed=seed)
    if spec == "convention_speeches":
        return assets.convention_speeches(test_fraction=test_fraction, seed=seed)
    if spec == "hamlet":
        data = datasets.load_dataset("text", data_files=str(assets.hamlet_path()), split="train")
        data = data.filter(lambda row: bool(row["text"].strip()))
        return data.train_test_split(test_size=test_fraction, seed=seed)
    files = spec.split(",")
    suffix = Path(files[0]).suffix
    if suffix in _FORMATS and all(Path(f).exists() for f in files):
        loaded = datasets.load_dataset(_FORMATS[suffix], data_files=files)
    else:
        loaded = datasets.load_dataset(spec)
    if "test" not in loaded:
        loaded = loaded["train"].train_test_split(test_size=test_fraction, seed=seed)
    return loaded


def classification_data(spec: str, tokenizer, text_column: str = "text", label_column: str = "label",
                        max_length: int = 128, seed: int = 0) -> datasets.DatasetDict:
    """Tokenized `input_ids`/`attention_mask`/`labels`, unpadded (the collator pads each batch).

    Args:
        spec (`str`): a dataset spec, see `load_raw`.
        tokenizer: the model's tokenizer.
        text_column (`str`) / label_column (`str`): the columns holding the text and the integer label.
        max_length (`int`, defaults to 128): texts are truncated to this many tokens.
        seed (`int`, defaults to 0): seed of the train/test split.

    Returns:
        `datasets.DatasetDict` with `train` and `test`, columns `input_ids`, `attention_mask`, `labels`.
    """
    raw = load_raw(spec, seed=seed)

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    return raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")


def causal_lm_data(spec: str, tokenizer, text_column: str = "text", max_length: int = 128,
                   seed: int = 0) -> datasets.DatasetDict:
    """Tokenized text examples for causal-LM fine-tuning, one example per text (truncated, unpadded).

    Arguments as in `classification_data` (no label column); texts of fewer than two tokens are dropped (they
    have no next token to predict).

    Returns:
        `datasets.DatasetDict` with `train` and `test`, columns `input_ids` and `attention_mask`.
    """
    raw = load_raw(spec, seed=seed)

    def tokenize(batch):
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
    return tokenized.filter(lambda row: len(row["input_ids"]) > 1)
