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
    is_hub_id,
    load_pretrained,
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
    path.write_text(path.read_text()[:40])  # cut short
    with pytest.raises(CheckpointError, match="not valid JSON.*corrupt"):
        read_metadata(tmp_path / "s")
    path.write_text(json.dumps({"boundary": 2, "num_blocks": 4}))
    with pytest.raises(CheckpointError, match=r"lacks \['blocks_path', 'suffix_only', 'architecture'\]"):
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


# ---- the real packaged models ----

REVIEWS = ["A gorgeous, witty, seductive movie.", "Unwatchable.",
           "The plot is nothing but a tired rehash of better films, and it drags on for far too long."]


def perturb_trainable(model, scale=1e-3):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def test_minilm_suffix_round_trip(tmp_path):
    from hf_freeze import assets

    path = assets.model_path("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    freeze_prefix(model, 4)
    perturb_trainable(model)
    model.eval()
    save_suffix(model, tmp_path / "suffix", tokenizer=tokenizer)
    metadata = read_metadata(tmp_path / "suffix")
    assert metadata.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # the Hub id, not the local folder
    batch = tokenizer(REVIEWS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        loaded = load_suffix(tmp_path / "suffix")  # the base from the metadata (the packaged offline copy)
        assert torch.equal(loaded(**batch).logits, expected)
        base = transformers.AutoModel.from_pretrained(path)
        shared = load_suffix(tmp_path / "suffix", base=base)
        assert shared.bert.encoder.layer[3].output.dense.weight is base.encoder.layer[3].output.dense.weight
        assert torch.equal(shared(**batch).logits, expected)
    save_pretrained(model, tmp_path / "full", tokenizer=tokenizer)
    with torch.no_grad():
        full = load_suffix(tmp_path / "full")
        assert frozen_boundary(full) == 4 and torch.equal(full(**batch).logits, expected)
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "suffix")
    assert reloaded_tokenizer(REVIEWS)["input_ids"] == tokenizer(REVIEWS)["input_ids"]


def test_smollm2_suffix_round_trip_and_a_mismatched_base(tmp_path):
    from hf_freeze import assets

    path = assets.model_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    freeze_prefix(model, 20)
    perturb_trainable(model)
    model.eval()
    save_suffix(model, tmp_path / "suffix")
    metadata = read_metadata(tmp_path / "suffix")
    assert metadata.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and metadata.untied == ["lm_head.weight"]
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314], [1, 2683, 1032, 288, 5, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = load_suffix(tmp_path / "suffix", dtype=torch.float32)
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    del loaded
    save_pretrained(model, tmp_path / "full")
    with torch.no_grad():
        full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
        assert torch.equal(full(input_ids=ids).logits, expected)
    del full
    other = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        other.layers[19].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(BaseMismatchError, match=r"unit 20 \(block 19\)"):
        load_suffix(tmp_path / "suffix", base=other)


def test_a_full_checkpoint_shares_a_matching_base_object_and_refuses_another(tmp_path):
    model = fine_tuned("qwen2", "causal")
    save_pretrained(model, tmp_path / "full")
    base = tiny_model("qwen2", "base")
    loaded = load_suffix(tmp_path / "full", base=base)
    assert loaded.model.layers[1].mlp.up_proj.weight is base.layers[1].mlp.up_proj.weight
    assert torch.equal(logits(loaded, "causal"), logits(model, "causal"))
    with pytest.raises(BaseMismatchError):
        load_suffix(tmp_path / "full", base=tiny_model("qwen2", "base", seed=3))


def test_a_folder_that_is_neither_local_nor_downloadable(tmp_path):
    with pytest.raises(CheckpointError, match="not a local folder, and downloading it as a Hub repo failed"):
        load_suffix("nobody/nothing-here")  # HF_HUB_OFFLINE=1 in the tests
    with pytest.raises(CheckpointError, match="neither a folder nor a Hub repo id"):
        load_suffix(str(tmp_path / "missing" / "folder"))


def test_is_hub_id(tmp_path, monkeypatch):
    assert is_hub_id("sentence-transformers/all-MiniLM-L6-v2")
    for name in ("./out/suffix", "/abs/path", "~/model", "a/b/c", "gpt2", "", None, 3):
        assert not is_hub_id(name), name
    (tmp_path / "me" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("me/model")  # a local folder of that name wins


def test_load_pretrained_uses_the_class_the_config_names(tmp_path):
    tiny_model("bert", "seq").save_pretrained(tmp_path / "seq")
    tiny_model("bert", "base").save_pretrained(tmp_path / "base")
    assert type(load_pretrained(tmp_path / "seq")).__name__ == "BertForSequenceClassification"
    assert type(load_pretrained(tmp_path / "base")).__name__ == "BertModel"


def test_a_prefix_that_trained_before_it_froze_is_named_when_saving_a_suffix(tmp_path, caplog):
    """An automatic policy freezes after training began: the suffix then cannot bind to the original base."""
    model = fine_tuned("bert", "seq")
    with caplog.at_level("WARNING", logger="hf_freeze.checkpoint"):
        save_suffix(model, tmp_path / "fixed", timeline=[{"step": 0, "boundary": BOUNDARY}])
    assert not caplog.records
    with caplog.at_level("WARNING", logger="hf_freeze.checkpoint"):
        save_suffix(model, tmp_path / "late", timeline=[{"step": 128, "boundary": BOUNDARY}])
    assert "trained for 128 optimizer steps before it froze" in caplog.text and "policy='fixed'" in caplog.text


def _flip_bytes(path, offset_from_end=64):
    """Change bytes inside a file's tensor data, keeping its size."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_suffix_are_refused_naming_the_file(tmp_path):
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "s")
    metadata = read_metadata(tmp_path / "s")
    assert set(metadata.sha256) == {SUFFIX_WEIGHTS_NAME}
    weights = tmp_path / "s" / SUFFIX_WEIGHTS_NAME
    size = weights.stat().st_size
    _flip_bytes(weights)
    assert weights.stat().st_size == size
    with pytest.raises(CheckpointError, match=rf"{SUFFIX_WEIGHTS_NAME} is corrupt: its sha256 .*Download it again"):
        load_suffix(tmp_path / "s", base=tiny_model("bert", "base"))


def test_flipped_bytes_in_a_full_checkpoint_are_refused_naming_the_file(tmp_path):
    save_pretrained(fine_tuned("bert", "seq"), tmp_path / "full")
    assert set(read_metadata(tmp_path / "full").sha256) == {"model.safetensors"}
    assert load_suffix(tmp_path / "full") is not None  # intact: loads
    _flip_bytes(tmp_path / "full" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_suffix(tmp_path / "full")


def test_a_mismatched_base_without_a_path_is_named_by_its_class(tmp_path):
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "s")
    wrong = tiny_model("bert", "base", seed=7)
    wrong.config._name_or_path = ""
    with pytest.raises(BaseMismatchError) as error:
        load_suffix(tmp_path / "s", base=wrong)
    assert "this base (BertModel built in memory (no path or Hub id))" in str(error.value)
    assert "()" not in str(error.value).replace("(no path or Hub id))", "")


def test_a_base_from_a_hub_cache_snapshot_is_recorded_by_its_hub_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / "0123abcd"
    tiny_model("bert", "seq").save_pretrained(snapshot)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(snapshot)
    freeze_prefix(model, BOUNDARY)
    save_suffix(model, tmp_path / "s")
    metadata = read_metadata(tmp_path / "s")
    assert (metadata.base_model, metadata.base_revision) == ("someone/tiny-bert", "0123abcd")
    assert metadata.base_model_path == str(snapshot.resolve())
    assert frozen_boundary(load_suffix(tmp_path / "s")) == BOUNDARY  # the base loads from its local folder
