"""Freeze metadata and suffix-only checkpoints: round trips on every tiny family and head, and every refusal."""

import json

import pytest
import torch
import transformers
from conftest import CASES, tiny_batch, tiny_model
from safetensors.torch import load_file

from hf_freeze import freeze_prefix, frozen_boundary, get_layout
from hf_freeze.checkpoint import (
    METADATA_NAME,
    SUFFIX_WEIGHTS_NAME,
    BaseMismatchError,
    CheckpointError,
    load_suffix,
    read_metadata,
    save_pretrained,
    save_suffix,
)
from hf_freeze.fingerprint import prefix_fingerprint
from hf_freeze.layout import find_layout

BOUNDARY = 2


def fine_tuned(family, head, boundary=BOUNDARY, seed=0, **freeze_kwargs):
    """A tiny model frozen at `boundary` whose trainable tensors moved away from the base's (seeded the same)."""
    model = tiny_model(family, head, seed=seed)
    freeze_prefix(model, boundary, **freeze_kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def logits(model, head):
    batch = tiny_batch(model, head)
    batch.pop("labels", None)
    with torch.no_grad():
        return model(**batch)[0]


@pytest.fixture
def saved_base(tmp_path):
    def save(family, head, seed=0):
        path = tmp_path / f"base-{family}-{head}-{seed}"
        tiny_model(family, head, seed=seed).save_pretrained(path)
        return path

    return save


@pytest.mark.parametrize("family,head", CASES)
def test_suffix_round_trip_gives_identical_logits(family, head, tmp_path, saved_base):
    base_path = saved_base(family, head)
    model = fine_tuned(family, head)
    save_suffix(model, tmp_path / "suffix", base_model=str(base_path))

    loaded = load_suffix(tmp_path / "suffix")
    assert type(loaded) is type(model) and frozen_boundary(loaded) == BOUNDARY
    assert torch.equal(logits(loaded, head), logits(model, head))
    saved = load_file(tmp_path / "suffix" / SUFFIX_WEIGHTS_NAME)
    layout = get_layout(model)
    block_prefix = f"{layout.blocks_path}.{BOUNDARY - 1}."
    assert not any(name.startswith(block_prefix) for name in saved)  # the frozen blocks stayed out
    assert any(name.startswith(f"{layout.blocks_path}.{BOUNDARY}.") for name in saved)


@pytest.mark.parametrize("family,head", CASES)
def test_full_round_trip_keeps_metadata_and_from_pretrained(family, head, tmp_path):
    model = fine_tuned(family, head)
    save_pretrained(model, tmp_path / "full", timeline=[{"step": 3, "epoch": 0.5, "boundary": 2, "reason": "r"}])
    metadata = read_metadata(tmp_path / "full")
    assert (metadata.suffix_only, metadata.boundary, metadata.timeline[0]["step"]) == (False, BOUNDARY, 3)
    assert metadata.prefix_fingerprint == prefix_fingerprint(model, find_layout(model), BOUNDARY)
    plain = type(model).from_pretrained(tmp_path / "full").eval()
    assert torch.equal(logits(plain, head), logits(model, head))
    loaded = load_suffix(tmp_path / "full")
    assert frozen_boundary(loaded) == BOUNDARY and torch.equal(logits(loaded, head), logits(model, head))


def test_fingerprint_is_the_same_for_the_base_class_and_the_task_class(tmp_path):
    tiny_model("llama", "causal").save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path)
    task = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert prefix_fingerprint(base, find_layout(base), 3) == prefix_fingerprint(task, find_layout(task), 3)


def test_a_base_object_shares_its_prefix_tensors(tmp_path):
    model = fine_tuned("bert", "seq")
    save_suffix(model, tmp_path / "a")
    other = fine_tuned("bert", "seq")
    with torch.no_grad():
        other.classifier.weight.mul_(-1)
    save_suffix(other, tmp_path / "b")
    base = tiny_model("bert", "base")
    first, second = load_suffix(tmp_path / "a", base=base), load_suffix(tmp_path / "b", base=base)
    assert first.bert.embeddings.word_embeddings.weight is base.embeddings.word_embeddings.weight
    first_blocks, second_blocks = first.bert.encoder.layer, second.bert.encoder.layer
    assert first_blocks[1].attention.self.query.weight is second_blocks[1].attention.self.query.weight
    assert first_blocks[BOUNDARY].output.dense.weight is not base.encoder.layer[BOUNDARY].output.dense.weight
    assert torch.equal(logits(first, "seq"), logits(model, "seq"))
    assert torch.equal(logits(second, "seq"), logits(other, "seq"))


@pytest.mark.parametrize("tied_weights", ["untie", "freeze"])
def test_tied_lm_head(tied_weights, tmp_path, saved_base):
    base_path = saved_base("llama", "causal")
    model = fine_tuned("llama", "causal", tied_weights=tied_weights)
    save_suffix(model, tmp_path / "s", base_model=str(base_path))
    metadata = read_metadata(tmp_path / "s")
    saved = load_file(tmp_path / "s" / SUFFIX_WEIGHTS_NAME)
    if tied_weights == "untie":  # lm_head trained on its own: the suffix must hold it
        assert metadata.untied == ["lm_head.weight"] and "lm_head.weight" in saved
    else:  # lm_head IS the frozen embedding: tied again on load
        assert metadata.tied_to_prefix == ["lm_head.weight"] and "lm_head.weight" not in saved
    loaded = load_suffix(tmp_path / "s")
    assert torch.equal(logits(loaded, "causal"), logits(model, "causal"))


def test_another_base_is_refused_naming_both_fingerprints(tmp_path, saved_base):
    model = fine_tuned("gpt2", "seq")
    save_suffix(model, tmp_path / "s", base_model=str(saved_base("gpt2", "seq")))
    wrong = tiny_model("gpt2", "base", seed=7)
    expected = read_metadata(tmp_path / "s").prefix_fingerprint
    actual = prefix_fingerprint(wrong, find_layout(wrong), BOUNDARY)
    with pytest.raises(BaseMismatchError) as error:
        load_suffix(tmp_path / "s", base=wrong)
    message = str(error.value)
    assert expected in message and actual in message and f"[0, {BOUNDARY})" in message and "Pass the base" in message
    with pytest.raises(BaseMismatchError, match="first differs at unit 0"):
        load_suffix(tmp_path / "s", base=str(saved_base("gpt2", "seq", seed=7)))


def test_a_base_changed_only_in_one_block_is_refused_there(tmp_path):
    model = fine_tuned("bert", "seq")
    save_suffix(model, tmp_path / "s")
    base = tiny_model("bert", "base")
    with torch.no_grad():
        base.encoder.layer[1].output.dense.bias.add_(1e-6)
    with pytest.raises(BaseMismatchError, match=r"unit 2 \(block 1\)"):
        load_suffix(tmp_path / "s", base=base)


def test_another_boundary_is_refused(tmp_path):
    save_suffix(fine_tuned("bert", "seq", boundary=1), tmp_path / "s")
    metadata_path = tmp_path / "s" / METADATA_NAME
    values = json.loads(metadata_path.read_text())
    good = prefix_fingerprint(tiny_model("bert", "base"), find_layout(tiny_model("bert", "base")), 2)
    values.update(boundary=2, prefix_fingerprint=good)  # metadata claims boundary 2, the file holds block 1
    metadata_path.write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="another boundary"):
        load_suffix(tmp_path / "s", base=tiny_model("bert", "base"))


def test_a_base_with_fewer_blocks_is_refused(tmp_path):
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "s")
    config = tiny_model("bert", "base").config
    config.num_hidden_layers = 3
    smaller = transformers.BertModel(config)
    with pytest.raises(BaseMismatchError, match="4 blocks; this base .* has 3"):
        load_suffix(tmp_path / "s", base=smaller)


def test_no_metadata_and_newer_format_are_refused(tmp_path):
    tiny_model("bert", "seq").save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match=f"no {METADATA_NAME}"):
        load_suffix(tmp_path / "plain")
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "s")
    path = tmp_path / "s" / METADATA_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99.*Upgrade hf_freeze"):
        read_metadata(tmp_path / "s")


def test_a_truncated_suffix_file_is_refused(tmp_path):
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "s")
    weights = tmp_path / "s" / SUFFIX_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_suffix(tmp_path / "s", base=tiny_model("bert", "base"))
    metadata_path = tmp_path / "s" / METADATA_NAME
    values = json.loads(metadata_path.read_text())
    values["weights"] = {}  # without the recorded size, safetensors' own check must still catch it
    metadata_path.write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="truncated"):
        load_suffix(tmp_path / "s", base=tiny_model("bert", "base"))


def test_saving_needs_a_frozen_prefix(tmp_path):
    with pytest.raises(ValueError, match="nothing is frozen"):
        save_suffix(tiny_model("bert", "seq"), tmp_path / "s")


def test_an_interrupted_save_leaves_no_folder_and_no_metadata(tmp_path, monkeypatch):
    model = fine_tuned("bert", "seq")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_freeze.checkpoint.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_suffix(model, tmp_path / "new")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_suffix(model, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr("hf_freeze.checkpoint.save_file", fail)
    with pytest.raises(OSError):
        save_suffix(model, tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before  # the old save is intact
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
