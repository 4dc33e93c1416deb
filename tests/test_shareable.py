"""Shareable automatic freezing: the frozen prefix is the base's bit for bit, saves suffix-only on the base, serves
through the base's shared prefix, and resumes from a checkpoint."""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from helpers import PadCollator, token_dataset, training_args
from transformers import Trainer

from hf_freeze import FreezeCallback, FreezeConfig, FreezeTrainer, frozen_boundary, get_layout
from hf_freeze.checkpoint import BaseMismatchError, load_suffix, save_suffix
from hf_freeze.serving import Request, ServingEngine
from hf_freeze.shareable import BasePrefix, ShareablePrefixError, unit_tensors

POLICIES = {"gradnorm": {"policy": "gradnorm", "interval_steps": 3},
            "schedule": {"policy": "schedule", "interval_steps": 3}}


def train(model, tmp_path, knobs, shareable, trainer_class=Trainer, **arguments):
    causal = "CausalLM" in type(model).__name__
    config = FreezeConfig(**knobs, shareable_prefix=shareable)
    values = {"num_train_epochs": 3, **arguments}
    kwargs = {"freeze_config": config} if trainer_class is FreezeTrainer else {"callbacks": [FreezeCallback(config)]}
    trainer = trainer_class(model=model, args=training_args(tmp_path / "run", **values),
                            train_dataset=token_dataset(size=48, labels=None if causal else "seq"),
                            data_collator=PadCollator(causal=causal), **kwargs)
    return trainer


def callback_of(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FreezeCallback))


def same_units(model, base, units):
    """Whether units `units` of `model` equal `base`'s, bit for bit."""
    layout, base_layout = get_layout(model), get_layout(base)
    return all(torch.equal(a, b) for u in units for a, b in zip(unit_tensors(layout, u), unit_tensors(base_layout, u),
                                                                 strict=True))


def logits(model, head):
    batch = tiny_batch(model, head)
    batch.pop("labels", None)
    with torch.no_grad():
        return model.eval()(**batch)[0]


@pytest.mark.parametrize("family,head,policy,trainer_class", [
    ("bert", "seq", "gradnorm", Trainer),
    ("bert", "seq", "schedule", FreezeTrainer),  # the cache reads the restored prefix, never the trained one
    ("llama", "causal", "gradnorm", FreezeTrainer),  # lm_head tied to the embeddings: untied, keeps training
])
def test_an_automatic_policy_leaves_the_base_prefix_and_saves_suffix_only_on_the_base(
        family, head, policy, trainer_class, tmp_path):
    base = tiny_model(family, head).eval()
    model = tiny_model(family, head)
    trainer = train(model, tmp_path, POLICIES[policy], shareable=True, trainer_class=trainer_class)
    trainer.train()
    boundary, timeline = frozen_boundary(model), callback_of(trainer).timeline
    assert boundary is not None and any(e["step"] > 0 for e in timeline), timeline  # froze after training began
    assert all(e["base_restored"] for e in timeline)
    assert same_units(model, base, range(boundary + 1))  # embeddings and blocks [0, boundary): the base's
    assert not same_units(model, base, [boundary + 1])  # the first active block trained
    assert callback_of(trainer)._base_prefix.nbytes == 0  # every copy released at train end

    save_suffix(model, tmp_path / "suffix", timeline=timeline)
    loaded = load_suffix(tmp_path / "suffix", base=tiny_model(family, head).eval())
    torch.testing.assert_close(logits(loaded, head), logits(model, head), rtol=0, atol=0)


def test_without_the_option_the_prefix_trained_and_the_base_is_refused(tmp_path):
    base = tiny_model("bert", "seq").eval()
    model = tiny_model("bert", "seq")
    trainer = train(model, tmp_path, POLICIES["gradnorm"], shareable=False)
    trainer.train()
    boundary = frozen_boundary(model)
    assert boundary is not None and not same_units(model, base, range(boundary + 1))
    assert all("base_restored" not in e for e in callback_of(trainer).timeline)
    save_suffix(model, tmp_path / "suffix", timeline=callback_of(trainer).timeline)
    with pytest.raises(BaseMismatchError):
        load_suffix(tmp_path / "suffix", base=base)


def test_the_engine_serves_a_shareable_fine_tune_through_the_base_prefix(tmp_path):
    base = tiny_model("bert", "seq").eval()
    model = tiny_model("bert", "seq")
    trainer = train(model, tmp_path, POLICIES["gradnorm"], shareable=True)
    trainer.train()
    save_suffix(model, tmp_path / "suffix", timeline=callback_of(trainer).timeline)
    engine = ServingEngine(base)
    served = engine.load_model("sentiment", tmp_path / "suffix")
    assert served.boundary == frozen_boundary(model) and engine._shares(served)
    ids = [5, 17, 42, 8, 9, 30]
    answer = engine.predict([Request(ids, model="sentiment")])[0]
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(answer, expected, rtol=1e-5, atol=1e-5)


def test_copies_are_released_as_units_freeze():
    model = tiny_model("bert", "seq")
    layout = get_layout(model)
    copies = BasePrefix.capture(layout, range(0, 4))
    before = copies.nbytes
    with torch.no_grad():
        for tensor in unit_tensors(layout, 1):
            tensor.add_(1.0)
    assert copies.restore(layout, range(0, 2)) == [0, 1]
    assert same_units(model, tiny_model("bert", "seq"), [0, 1])
    assert 0 < copies.nbytes < before and sorted(copies.copies) == [2, 3]
    copies.release()
    assert copies.nbytes == 0


def saved_base(tmp_path, family="bert", head="seq", seed=0):
    path = tmp_path / f"base-{seed}"
    tiny_model(family, head, seed=seed).save_pretrained(path)
    return path


def from_base(path):
    return type(tiny_model("bert", "seq")).from_pretrained(path)


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    base_path = saved_base(tmp_path)
    arguments = {"save_strategy": "steps", "save_steps": 1, "num_train_epochs": 4}
    uninterrupted = from_base(base_path)
    reference = train(uninterrupted, tmp_path, POLICIES["gradnorm"], shareable=True, **arguments)
    reference.train()
    timeline = callback_of(reference).timeline
    assert len(timeline) >= 2 and timeline[0]["step"] + 1 < timeline[1]["step"], timeline
    checkpoint = tmp_path / "run" / f"checkpoint-{timeline[0]['step'] + 1}"  # after the first freeze only

    resumed_model = from_base(base_path)
    resumed = train(resumed_model, tmp_path, POLICIES["gradnorm"], shareable=True, **arguments)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert frozen_boundary(resumed_model) == frozen_boundary(uninterrupted)
    expected, actual = uninterrupted.state_dict(), resumed_model.state_dict()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert same_units(resumed_model, from_base(base_path), range(frozen_boundary(resumed_model) + 1))


def test_resuming_without_the_base_or_from_another_base_is_refused(tmp_path):
    base_path = saved_base(tmp_path)
    arguments = {"save_strategy": "steps", "save_steps": 1, "num_train_epochs": 2}
    first = train(from_base(base_path), tmp_path, POLICIES["gradnorm"], shareable=True, **arguments)
    first.train()
    checkpoint = str(tmp_path / "run" / f"checkpoint-{callback_of(first).timeline[0]['step'] + 1}")

    nameless = tiny_model("bert", "seq")  # built from a config: no base folder to read the copies from
    with pytest.raises(ShareablePrefixError, match="does not say where it was loaded from"):
        train(nameless, tmp_path, POLICIES["gradnorm"], shareable=True, **arguments).train(
            resume_from_checkpoint=checkpoint)
    other = from_base(saved_base(tmp_path, seed=5))
    with pytest.raises(ShareablePrefixError, match="differs from the base"):
        train(other, tmp_path, POLICIES["gradnorm"], shareable=True, **arguments).train(
            resume_from_checkpoint=checkpoint)
