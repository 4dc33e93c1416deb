"""PrefixRunner: a forward stopped at a boundary gives the block's own output, and a forward resumed from those
states gives the model's own output, on every family and head, right- and left-padded."""

import types

import pytest
import torch
from conftest import CASES, tiny_model
from helpers import token_dataset
from test_trainer import assert_same_weights, train_pair

from hf_freeze import get_layout
from hf_freeze.cache.runner import PrefixRunner
from hf_freeze.layout import execution_device


def padded_batch(model, side, batch=3, length=9, seed=0):
    """Random ids with different real lengths per example, padded on `side`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        if side == "right":
            mask[i, length - 2 * i :] = 0
        else:
            mask[i, : 2 * i] = 0
    return {"input_ids": ids.masked_fill(mask == 0, model.config.pad_token_id), "attention_mask": mask}


def first_output(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("family", "head"), CASES)
def test_stop_at_and_resume_from_a_boundary_match_the_full_forward(family, head, side):
    model = tiny_model(family, head).eval()
    inputs = padded_batch(model, side)
    layout = get_layout(model)
    runner = PrefixRunner(model, layout)
    seen = {}
    handle = layout.blocks[1].register_forward_hook(lambda module, args, out: seen.update(out=first_output(out)))
    with torch.no_grad():
        full = model(**inputs)
    handle.remove()

    ran = []
    for i in range(4):
        layout.blocks[i].register_forward_pre_hook(lambda *a, i=i: ran.append(i))
    states = runner.boundary_states(inputs, 2)
    assert ran == [0, 1]  # stopped after block 1: blocks 2, 3 and the head never ran
    assert torch.allclose(states, seen["out"], rtol=0, atol=1e-6)
    ran.clear()
    with torch.no_grad(), runner.inject_states(states, 2):
        resumed = model(**inputs)
    assert ran == [2, 3]  # blocks 0 and 1 were skipped
    for name in ("logits", "last_hidden_state"):
        if name in full:
            assert torch.allclose(resumed[name], full[name], rtol=0, atol=1e-5), name
    assert [type(b) for b in layout.blocks] == [type(layout.blocks[0])] * 4  # the real blocks are back


def test_resuming_from_an_earlier_boundary_runs_only_the_blocks_between():
    model = tiny_model("llama", "causal").eval()
    inputs = padded_batch(model, "left")
    runner = PrefixRunner(model, get_layout(model))
    at_one = runner.boundary_states(inputs, 1)
    assert torch.allclose(runner.boundary_states(inputs, 3, start=(1, at_one)), runner.boundary_states(inputs, 3),
                          rtol=0, atol=1e-6)


@pytest.mark.parametrize("boundary", [0, 5])
def test_boundaries_outside_the_blocks_are_refused(boundary):
    model = tiny_model("bert", "seq")
    runner = PrefixRunner(model, get_layout(model))
    with pytest.raises(ValueError, match="1 <= boundary <= 4"):
        runner.boundary_states(padded_batch(model, "right"), boundary)


class LeftPadCollator:
    """Left-pads every batch to a fixed length (so an example's digest is the same in every batch)."""

    def __init__(self, length=14, pad_id=0):
        self.length, self.pad_id = length, pad_id

    def __call__(self, features):
        ids = torch.full((len(features), self.length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, self.length - n :] = torch.tensor(f["input_ids"])
            mask[i, self.length - n :] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_training_through_the_trainer_gives_the_same_weights(tmp_path, family):
    (cached, plain), (trainer, _) = train_pair(tmp_path, family, "causal", collator=LeftPadCollator(),
                                               data=token_dataset(size=40, labels=None))
    assert trainer.boundary_states.stats.hits > 0
    assert_same_weights(cached, plain)


def test_integer_devices_from_accelerate_hooks_name_the_current_accelerator(monkeypatch):
    block = torch.nn.Linear(2, 2)
    block._hf_hook = types.SimpleNamespace(execution_device=1)  # what a device_map of {"": 1} leaves
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: torch.device("xpu"))
    assert execution_device(block) == torch.device("xpu", 1)
    block._hf_hook = types.SimpleNamespace(execution_device="cpu")
    assert execution_device(block) == torch.device("cpu")


def test_a_model_the_tiny_probe_cannot_run_is_checked_on_its_first_real_batch(monkeypatch):
    import hf_freeze.cache.runner as runner_module

    model = tiny_model("llama", "causal")
    runner = PrefixRunner(model, get_layout(model))
    # a probe the model cannot run (here: a token id outside its vocabulary)
    monkeypatch.setattr(runner_module, "_dummy_inputs", lambda model: {"input_ids": torch.tensor([[1000]])})
    with pytest.raises(IndexError):
        runner.check_block_outputs()
    assert runner.check_block_outputs(strict=False) is None
    runner.boundary_states(padded_batch(model, "right"), 2)  # a real batch teaches the format
    assert runner.check_block_outputs() is None  # llama blocks return a tensor
