"""Fingerprints of the frozen prefix: per-unit digests, chained; remembered only for frozen units, and only while
their weights are unchanged."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from hf_freeze import find_layout, freeze_prefix, unfreeze
from hf_freeze.fingerprint import chain_digests, prefix_fingerprint, prefix_fingerprints, unit_digest, unit_digests


def tiny_bert(cls=BertForSequenceClassification, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=20)
    return cls(config)


def test_the_prefix_fingerprint_chains_the_unit_digests_and_covers_exactly_the_prefix():
    model = tiny_bert()
    layout = find_layout(model)
    digests = [unit_digest(layout, unit) for unit in range(layout.num_units)]
    assert len(set(digests)) == layout.num_units
    assert prefix_fingerprint(model, layout, 2) == chain_digests(digests[:3])
    before = {k: prefix_fingerprint(model, layout, k) for k in range(layout.num_blocks + 1)}
    with torch.no_grad():
        layout.blocks[1].output.dense.weight[0, 0] += 1e-3  # block 1 is unit 2: inside boundaries >= 2
    after = {k: prefix_fingerprint(model, layout, k) for k in range(layout.num_blocks + 1)}
    assert [before[k] == after[k] for k in range(layout.num_blocks + 1)] == [True, True, False, False]


def test_the_head_and_class_do_not_change_it_but_the_seed_does():
    task, base = tiny_bert(), tiny_bert(BertModel)
    base.load_state_dict({k.removeprefix("bert."): v for k, v in task.state_dict().items() if k.startswith("bert.")},
                         strict=False)
    assert prefix_fingerprint(task, find_layout(task), 3) == prefix_fingerprint(base, find_layout(base), 3)
    assert prefix_fingerprint(task, find_layout(task), 3, seed="x") != prefix_fingerprint(task, find_layout(task), 3)


def test_frozen_units_are_hashed_once_while_unchanged(monkeypatch):
    model = tiny_bert()
    freeze_prefix(model, 2)
    layout = find_layout(model)
    calls = []
    monkeypatch.setattr("hf_freeze.fingerprint.unit_digest",
                        lambda lay, unit: calls.append(unit) or unit_digest(lay, unit))
    unit_digests(model, layout, 3, frozen_boundary=2)
    unit_digests(model, layout, 3, frozen_boundary=2)
    assert calls == [0, 1, 2, 3, 3]  # frozen units 0..2 once; unit 3 (block 2, trainable) every time
    unfreeze(model)
    calls.clear()
    unit_digests(model, layout, 1, frozen_boundary=1)
    assert calls == [0, 1]


def test_under_fsdp2_a_unit_is_hashed_again_when_another_rank_does_not_remember_it(monkeypatch):
    # Hashing a sharded unit gathers it (a collective): every rank must hash the same units, so a digest this rank
    # still remembers is recomputed when another rank's stamp no longer holds (the all-reduce says so).
    model = tiny_bert()
    freeze_prefix(model, 2)
    layout = find_layout(model)
    reference = prefix_fingerprints(model, layout, [1, 2], frozen_boundary=2)
    assert reference == {b: prefix_fingerprint(model, layout, b) for b in (1, 2)}
    calls, asked = [], []
    monkeypatch.setattr("hf_freeze.fingerprint.unit_digest",
                        lambda lay, unit: calls.append(unit) or unit_digest(lay, unit))
    monkeypatch.setattr("hf_freeze.fingerprint._sharded", lambda m: True)
    monkeypatch.setattr("hf_freeze.fingerprint.all_ranks_agree",  # the other rank remembers unit 0 only
                        lambda *holds: asked.append(holds) or (holds[0], False, False))
    assert prefix_fingerprints(model, layout, [1, 2], frozen_boundary=2) == reference
    assert asked == [(True, True, True)] and calls == [1, 2]
    assert prefix_fingerprint(model, layout, 2, frozen_boundary=2) == reference[2]  # no chain memo: agreed too
    assert len(asked) == 2 and calls == [1, 2, 1, 2]


def test_a_boundary_outside_the_model_is_refused():
    model = tiny_bert()
    with pytest.raises(ValueError, match="0 <= boundary <= 3"):
        prefix_fingerprint(model, find_layout(model), 4)


def test_a_frozen_prefix_is_chained_once_until_unfrozen(monkeypatch):
    model = tiny_bert()
    freeze_prefix(model, 2)
    layout = find_layout(model)
    chains = []
    monkeypatch.setattr("hf_freeze.fingerprint.chain_digests",
                        lambda digests, seed="": chains.append(seed) or chain_digests(digests, seed))
    first = prefix_fingerprint(model, layout, 2, seed="m", frozen_boundary=2)
    assert prefix_fingerprint(model, layout, 2, seed="m", frozen_boundary=2) == first
    prefix_fingerprint(model, layout, 3, seed="m", frozen_boundary=2)  # block 2 trains: never remembered
    prefix_fingerprint(model, layout, 3, seed="m", frozen_boundary=2)
    assert chains == ["m", "m", "m"]
    unfreeze(model)
    with torch.no_grad():
        layout.blocks[0].output.dense.weight[0, 0] += 1e-3
    assert prefix_fingerprint(model, layout, 2, seed="m", frozen_boundary=None) != first


def _edits():
    """Ways to change block 0's weights (unit 1) behind the fingerprint's back."""
    def copy_in_place(model, layout):
        with torch.no_grad():
            layout.blocks[0].output.dense.weight.mul_(1.5)

    def load_state_dict(model, layout):
        block = layout.blocks[0]
        block.load_state_dict({k: v * 1.5 for k, v in block.state_dict().items()})

    def load_state_dict_assign(model, layout):
        block = layout.blocks[0]
        block.load_state_dict({k: v * 1.5 for k, v in block.state_dict().items()}, assign=True)

    def swap_data(model, layout):
        weight = layout.blocks[0].output.dense.weight
        weight.data = weight.data * 1.5

    def new_parameter(model, layout):
        dense = layout.blocks[0].output.dense
        dense.weight = torch.nn.Parameter(dense.weight.detach() * 1.5, requires_grad=False)

    return [copy_in_place, load_state_dict, load_state_dict_assign, swap_data, new_parameter]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_any_change_to_frozen_weights_invalidates_what_was_remembered(edit):
    model = tiny_bert()
    freeze_prefix(model, 2)
    layout = find_layout(model)
    before = prefix_fingerprint(model, layout, 2, seed="m", frozen_boundary=2)
    before_units = unit_digests(model, layout, 2, frozen_boundary=2)
    edit(model, layout)
    fresh = chain_digests([unit_digest(layout, unit) for unit in range(3)], "m")
    assert fresh != before
    assert prefix_fingerprint(model, layout, 2, seed="m", frozen_boundary=2) == fresh
    units = unit_digests(model, layout, 2, frozen_boundary=2)
    assert units[0] == before_units[0] and units[1] != before_units[1]


def test_nothing_is_remembered_on_the_model_object():
    model = tiny_bert()
    freeze_prefix(model, 2)
    names = set(model.__dict__)
    prefix_fingerprint(model, find_layout(model), 2, frozen_boundary=2)
    assert set(model.__dict__) == names


def test_metadata_saved_after_an_in_place_load_records_the_new_fingerprint(tmp_path):
    from hf_freeze.checkpoint import full_metadata

    model = tiny_bert()
    freeze_prefix(model, 2)
    layout = find_layout(model)
    first = full_metadata(model).prefix_fingerprint
    other = tiny_bert(seed=1).state_dict()
    model.load_state_dict({n: other[n] for n, p in model.named_parameters() if not p.requires_grad}, strict=False)
    assert full_metadata(model).prefix_fingerprint == chain_digests([unit_digest(layout, u) for u in range(3)]) != first


@pytest.mark.parametrize("target", ["cpu", "disk"])
def test_offloaded_frozen_units_are_remembered_and_an_edit_of_their_cpu_copy_is_seen(target, tmp_path, monkeypatch):
    from hf_freeze.offload import offload_frozen_blocks

    model = tiny_bert()
    freeze_prefix(model, 3)
    layout = find_layout(model)
    before = prefix_fingerprint(model, layout, 3, frozen_boundary=3)
    offload_frozen_blocks(model, layout, 3, target, offload_dir=str(tmp_path))
    calls = []
    monkeypatch.setattr("hf_freeze.fingerprint.unit_digest",
                        lambda lay, unit: calls.append(unit) or unit_digest(lay, unit))
    assert prefix_fingerprint(model, layout, 3, frozen_boundary=3) == before  # read from the hooks' weights
    calls.clear()
    assert prefix_fingerprint(model, layout, 3, frozen_boundary=3) == before
    assert calls == []  # remembered: the stamps of offloaded tensors are stable
    if target == "cpu":
        with torch.no_grad():
            layout.blocks[0].output.dense._hf_hook.weights_map["weight"].add_(1.0)
        assert prefix_fingerprint(model, layout, 3, frozen_boundary=3) != before
