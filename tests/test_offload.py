"""Models spread with Accelerate's `dispatch_model` (`cpu` and `disk` entries), and the frozen blocks moved off
their device (`offload_frozen`): layout, freezing, fingerprints, cache, training, saving."""

import copy

import pytest
import torch
from accelerate import dispatch_model
from conftest import tiny_batch, tiny_model
from helpers import PadCollator, token_dataset, training_args
from transformers import AutoModelForSequenceClassification

from hf_freeze import FreezeConfig, FreezeTrainer, freeze_prefix, frozen_boundary, get_layout
from hf_freeze.fingerprint import prefix_fingerprint
from hf_freeze.layout import execution_device
from hf_freeze.offload import (
    check_trainable_placement,
    materialized_state_dict,
    offload_frozen_blocks,
    offloaded_blocks,
    onload_frozen_blocks,
)


def dispatched(model, offload_dir, disk_blocks=(0, 1)):
    """`model` placed by `dispatch_model`: the blocks in `disk_blocks` offloaded to disk, the rest on `cpu`."""
    device_map = {"bert.embeddings": "cpu", "bert.pooler": "cpu", "classifier": "cpu"}
    device_map.update({f"bert.encoder.layer.{i}": "disk" if i in disk_blocks else "cpu" for i in range(4)})
    return dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir))


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_dispatched_model_with_disk_blocks_has_the_same_layout_forward_and_fingerprint(tmp_path):
    reference = tiny_model("bert", "seq")
    model = dispatched(copy.deepcopy(reference), tmp_path / "offload")
    assert model.bert.encoder.layer[0].attention.self.query.weight.device.type == "meta"
    layout, ref_layout = get_layout(model), get_layout(reference)
    assert layout.blocks_path == ref_layout.blocks_path and layout.embedding_names == ref_layout.embedding_names
    freeze_prefix(model, 2)
    freeze_prefix(reference, 2)
    batch = tiny_batch(model, "seq")
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    for k in (0, 1, 2):  # offloaded weights are read from the hook's weights map
        assert prefix_fingerprint(model, layout, k) == prefix_fingerprint(reference, ref_layout, k)


def test_trainable_block_on_disk_is_refused(tmp_path):
    model = dispatched(tiny_model("bert", "seq"), tmp_path / "offload", disk_blocks=(2,))
    with pytest.raises(ValueError, match="offloaded by Accelerate.*bert.encoder.layer.2"):
        check_trainable_placement(model)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / "out", num_train_epochs=1),
                            train_dataset=token_dataset(size=16), data_collator=PadCollator(),
                            freeze_config=FreezeConfig(policy="fixed", boundary=2, cache="off"))
    with pytest.raises(ValueError, match="Put the blocks that train on a GPU or on 'cpu'"):
        trainer.train()
    freeze_prefix(model, 3)  # once frozen, the offloaded block is fine
    check_trainable_placement(model)


def train(model, out, **config):
    trainer = FreezeTrainer(model=model, args=training_args(out, num_train_epochs=3, per_device_train_batch_size=8),
                            train_dataset=token_dataset(size=32, seed=3), data_collator=PadCollator(),
                            freeze_config=FreezeConfig(policy="fixed", boundary=2, cache="on", **config))
    trainer.train()
    return trainer


@pytest.mark.parametrize("where", ["device_map", "offload_cpu", "offload_disk"])
def test_training_with_offloaded_frozen_blocks_matches_the_plain_model_and_saves(tmp_path, where):
    reference = tiny_model("bert", "seq")
    model = copy.deepcopy(reference)
    config = {}
    if where == "device_map":
        model = dispatched(model, tmp_path / "offload")
    else:
        config = {"offload_frozen": where.split("_")[1], "offload_dir": str(tmp_path / "frozen")}
    trainer = train(model, tmp_path / "a", **config)
    expected = train(reference, tmp_path / "b")
    assert frozen_boundary(model) == 2
    assert trainer.boundary_states.stats.hits > 0  # epochs 2 and 3 read the cache
    if where != "device_map":
        assert offloaded_blocks(model) == [0, 1]
        assert trainer.freeze_callback.timeline[0]["offloaded_bytes"] > 0
        assert model.bert.encoder.layer[1].output.dense.weight.device.type == "meta"
    actual, wanted = materialized_state_dict(model), expected.model.state_dict()
    assert actual.keys() == wanted.keys()
    for name in wanted:  # frozen blocks untouched, trained blocks trained exactly as without offloading
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-5, atol=1e-6, msg=name)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    batch = tiny_batch(reloaded, "seq")
    torch.testing.assert_close(logits(reloaded, batch), logits(expected.model, batch), rtol=1e-5, atol=1e-6)


def test_offload_then_onload_gives_back_the_same_weights_and_forward(tmp_path):
    model = tiny_model("bert", "seq")
    layout = get_layout(model)
    freeze_prefix(model, 3)
    batch = tiny_batch(model, "seq")
    before, fingerprint = logits(model, batch), prefix_fingerprint(model, layout, 3)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    moved = offload_frozen_blocks(model, layout, 3, "disk", str(tmp_path))
    block_bytes = sum(p.numel() * 4 for i in range(3) for p in layout.blocks[i].parameters())
    assert moved == {"offloaded_bytes": block_bytes, "accelerator_bytes_freed": 0}  # CPU is not an accelerator
    assert all(p.device.type == "meta" for i in range(3) for p in layout.blocks[i].parameters())
    assert all(execution_device(layout.blocks[i]) == torch.device("cpu") for i in range(3))
    assert layout.blocks[2]._hf_hook.execution_device == torch.device("cpu")  # where injected states go
    assert prefix_fingerprint(model, layout, 3) == fingerprint
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)
    assert offload_frozen_blocks(model, layout, 3, "disk", str(tmp_path)) == {"offloaded_bytes": 0,
                                                                              "accelerator_bytes_freed": 0}
    assert onload_frozen_blocks(model) == 3
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)


def test_offload_config_is_validated():
    with pytest.raises(ValueError, match="offload_dir"):
        FreezeConfig(offload_frozen="disk")
    with pytest.raises(ValueError, match="offload_frozen"):
        FreezeConfig(offload_frozen="gpu")


def test_a_resumed_run_offloads_the_restored_prefix(tmp_path):
    config = {"offload_frozen": "cpu"}
    first = train(tiny_model("bert", "seq"), tmp_path / "run", **config)
    first.save_model(str(tmp_path / "unused"))  # saving an offloaded model works mid-life too
    first.args.save_strategy = "steps"
    first._save_checkpoint(first.model, trial=None)
    resumed = FreezeTrainer(model=tiny_model("bert", "seq", seed=1), args=first.args,
                            train_dataset=token_dataset(size=32, seed=3), data_collator=PadCollator(),
                            freeze_config=FreezeConfig(policy="fixed", boundary=2, cache="on", **config))
    resumed.train(resume_from_checkpoint=True)
    assert frozen_boundary(resumed.model) == 2 and offloaded_blocks(resumed.model) == [0, 1]
