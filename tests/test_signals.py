"""Per-unit gradient norms: what the `gradnorm` policy reads."""

import pytest
import torch
from conftest import NUM_BLOCKS, tiny_batch, tiny_model

from hf_freeze import find_layout, freeze_prefix
from hf_freeze.signals import unit_gradient_norms


def expected_norm(modules):
    grads = [p.grad.flatten() for m in modules for p in m.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


@pytest.mark.parametrize(("family", "head"), [("bert", "seq"), ("gpt2", "causal"), ("llama", "causal")])
def test_one_norm_per_unit_matches_the_gradients(family, head):
    model = tiny_model(family, head)
    layout = find_layout(model)
    model(**tiny_batch(model, head)).loss.backward()
    norms = unit_gradient_norms(layout, None)
    assert len(norms) == NUM_BLOCKS + 1 == layout.num_units
    for unit, norm in enumerate(norms):
        assert norm == pytest.approx(expected_norm(layout.unit_modules(unit)), rel=1e-5)
        assert norm > 0


def test_frozen_units_are_none_and_active_units_are_still_measured():
    model = tiny_model("bert", "seq")
    layout = find_layout(model)
    freeze_prefix(model, 2)  # embeddings, blocks 0 and 1: units 0..2
    model(**tiny_batch(model, "seq")).loss.backward()
    norms = unit_gradient_norms(layout, 2)
    assert norms[:3] == [None, None, None]
    assert all(n > 0 for n in norms[3:]) and len(norms) == layout.num_units
    assert norms[3] == pytest.approx(expected_norm([layout.blocks[2]]), rel=1e-5)


def test_a_unit_without_gradients_reads_zero():
    model = tiny_model("bert", "seq")
    layout = find_layout(model)
    model(**tiny_batch(model, "seq")).loss.backward()
    for p in layout.blocks[1].parameters():
        p.grad = None
    norms = unit_gradient_norms(layout, None)
    assert norms[2] == 0.0 and norms[1] > 0 and norms[3] > 0
