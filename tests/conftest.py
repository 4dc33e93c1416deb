"""Shared fixtures: tiny random models of every supported family and head, and batches for them."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("HF_FREEZE_TEST_THREADS", "1")))  # tiny models: threads only add overhead

VOCAB = 100
DROPOUT = 0.1

CONFIGS = {
    "bert": lambda: T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                 intermediate_size=37, hidden_dropout_prob=DROPOUT, pad_token_id=0),
    "roberta": lambda: T.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                       intermediate_size=37, hidden_dropout_prob=DROPOUT, pad_token_id=1),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=2, hidden_dim=37,
                                             dropout=DROPOUT, pad_token_id=0),
    "mpnet": lambda: T.MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=37, hidden_dropout_prob=DROPOUT, pad_token_id=1),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=2, resid_pdrop=DROPOUT,
                                 embd_pdrop=DROPOUT, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "llama": lambda: T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=37, pad_token_id=0,
                                   tie_word_embeddings=True),
    "qwen2": lambda: T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=37, pad_token_id=0),
}
HEADS = {
    "base": T.AutoModel,
    "seq": T.AutoModelForSequenceClassification,
    "causal": T.AutoModelForCausalLM,
    "token": T.AutoModelForTokenClassification,
}
UNSUPPORTED = {("distilbert", "causal"), ("mpnet", "causal")}  # transformers has no such head
CASES = [(f, h) for f in CONFIGS for h in HEADS if (f, h) not in UNSUPPORTED]
TRAINABLE_CASES = [(f, h) for f, h in CASES if h != "base"]
NUM_BLOCKS = 4


def tiny_model(family: str, head: str = "seq", seed: int = 0) -> torch.nn.Module:
    """A tiny random model (4 blocks of width 32) of `family` with `head`."""
    config = CONFIGS[family]()
    if head == "causal" and family in ("bert", "roberta"):
        config.is_decoder = True
    config.num_labels = 2 if head == "seq" else 3
    torch.manual_seed(seed)
    model = HEADS[head].from_config(config)
    model.config.pad_token_id = config.pad_token_id
    return model


def tiny_batch(model: torch.nn.Module, head: str, batch: int = 3, length: int = 9, seed: int = 0,
               padded: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded random inputs (different real lengths per example) with labels fitting `head`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i in range(1, batch):
            mask[i, length - 2 * i :] = 0
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if head == "seq":
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif head == "token":
        inputs["labels"] = torch.randint(0, 3, (batch, length), generator=g).masked_fill(mask == 0, -100)
    elif head == "causal":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """evaluate copies metric scripts into $HF_HOME/modules: keep that out of the user's cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
