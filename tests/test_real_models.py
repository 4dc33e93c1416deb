"""Integration tests on the real packaged models (MiniLM: 6 blocks, BERT; SmolLM2-135M: 30 blocks, Llama)."""

import pytest
import torch
from helpers import training_args
from test_batch import assert_close, loss_and_grads, provider_for
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
)

from hf_freeze import FreezeCallback, FreezeConfig, assets, find_layout, freeze_prefix
from hf_freeze.data import classification_data

REVIEWS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but a tired rehash of better films, and it drags on for far too long.",
    "Unwatchable.",
    "Funny and touching, with a great cast that clearly enjoyed every minute of it.",
]


@pytest.fixture(scope="module")
def minilm():
    path = assets.model_path("minilm")
    return AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def smollm2():
    path = assets.model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_layouts_of_the_packaged_models(minilm, smollm2):
    model = AutoModelForSequenceClassification.from_pretrained(minilm[1], num_labels=2)
    layout = find_layout(model)
    assert (layout.blocks_path, layout.num_blocks, layout.embedding_names) == ("bert.encoder.layer", 6,
                                                                              ("bert.embeddings",))
    layout = find_layout(smollm2[1])
    assert (layout.blocks_path, layout.num_blocks) == ("model.layers", 30)
    assert set(layout.embedding_names) == {"model.embed_tokens", "model.rotary_emb"}


def test_minilm_cached_loss_and_gradients_equal_a_full_forward(minilm):
    tokenizer, path = minilm
    # The classifier is initialised at random: seed it, so the test does not depend on what ran before it (with
    # some draws the classifier bias's gradient nearly cancels over the batch and its relative error is all noise).
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    freeze_prefix(model, 4)
    model.train()
    batch = dict(tokenizer(REVIEWS, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0, 0, 1]))
    provider = provider_for(model)
    keys = torch.arange(4)
    provider.states_for(dict(tokenizer(REVIEWS[::-1], padding="max_length", max_length=40, return_tensors="pt"),
                             labels=torch.tensor([1, 0, 0, 1])), keys.flip(0), 4)  # cached from another batch
    assert_close(loss_and_grads(model, batch), loss_and_grads(model, batch, provider, keys, 4))
    assert provider.stats.hits == 4


def test_smollm2_cached_loss_with_padded_batches_equals_a_full_forward(smollm2):
    tokenizer, model = smollm2
    freeze_prefix(model, 20)
    model.train()
    encoded = tokenizer(REVIEWS, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any(), "the batch must be padded"
    batch = dict(encoded, labels=encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100))
    provider = provider_for(model)
    keys = torch.arange(4)
    provider.states_for({k: v[:2] for k, v in batch.items()}, keys[:2], 20)  # two cached, two computed
    assert_close(loss_and_grads(model, batch), loss_and_grads(model, batch, provider, keys, 20))
    assert provider.stats.hits == 2 and provider.stats.misses == 4


def test_gradnorm_freezes_minilm_blocks_on_rotten_tomatoes(minilm, tmp_path):
    tokenizer, path = minilm
    data = classification_data("rotten_tomatoes", tokenizer, max_length=64)["train"].select(range(768))
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    callback = FreezeCallback(FreezeConfig(policy="gradnorm"))
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=32,
                                                      learning_rate=5e-5),
                      train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer), callbacks=[callback])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)  # the rest of the suite runs single-threaded
    assert callback.timeline and callback.timeline[-1]["boundary"] >= 1, callback.timeline
