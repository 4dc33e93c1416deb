"""FreezeCallback inside a plain transformers.Trainer."""

import json

import pytest
import torch
from conftest import tiny_model
from helpers import LogRecorder, PadCollator, PrefixProbe, assert_prefix_shape, state_of, token_dataset, training_args
from transformers import Trainer

from hf_freeze import FreezeCallback, FreezeConfig, frozen_boundary


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "mpnet"])
def test_gradnorm_grows_a_prefix_and_logs_every_freeze(tmp_path, family):
    model = tiny_model(family, "seq")
    probe, recorder = PrefixProbe(), LogRecorder()
    callback = FreezeCallback(FreezeConfig(policy="gradnorm", interval=0.1))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(),
                      data_collator=PadCollator(model.config.pad_token_id), callbacks=[recorder, callback, probe])
    trainer.train()

    boundaries = [assert_prefix_shape(model, frozen) for frozen in probe.frozen_sets]
    assert boundaries == sorted(boundaries), "the frozen prefix must only grow"
    assert callback.timeline, "gradnorm should freeze at least the embeddings on this run"
    assert frozen_boundary(model) == callback.timeline[-1]["boundary"] <= 3  # never the last block by default
    logged = [entry for entry in trainer.state.log_history if "freeze/boundary" in entry]
    assert [e["freeze/boundary"] for e in logged] == [float(e["boundary"]) for e in callback.timeline]
    saved = trainer.state.stateful_callbacks["FreezeCallback"]["attributes"]
    assert saved["timeline"] == callback.timeline and saved["boundary"] == frozen_boundary(model)


def test_fixed_policy_freezes_before_the_first_step_and_prunes_the_optimizer(tmp_path):
    model = tiny_model("bert", "seq")
    probe = PrefixProbe()
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=token_dataset(),
                      data_collator=PadCollator(), callbacks=[FreezeCallback(FreezeConfig(policy="fixed", boundary=3)),
                                                              probe])
    trainer.train()
    assert set(probe.boundaries) == {3}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert not any(id(p) in frozen for g in trainer.optimizer.param_groups for p in g["params"])


def test_model_frozen_by_hand_before_the_trainer_is_respected(tmp_path):
    from hf_freeze import freeze_prefix

    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    before = state_of(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=token_dataset(),
                      data_collator=PadCollator(), callbacks=[FreezeCallback(FreezeConfig(policy="schedule"))])
    trainer.train()
    assert frozen_boundary(model) >= 2
    assert all(torch.equal(before[n], v) for n, v in state_of(model).items() if "layer.0." in n or "layer.1." in n)


@pytest.mark.parametrize(("family", "head", "rates"), [
    ("bert", "seq", {}), ("llama", "causal", {}),
    ("bert", "seq", {"active_lr_scale": 2.0, "active_lr_rewarm": True}),  # rates moved at freezes survive a resume
])
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, family, head, rates):
    causal = head == "causal"  # the tiny llama ties lm_head to the embeddings: resuming must untie it again
    data = token_dataset(size=48, labels=None if causal else "seq")
    config = FreezeConfig(policy="gradnorm", interval_steps=3, **rates)

    def trainer_for(model):
        args = training_args(tmp_path, save_strategy="steps", save_steps=1, num_train_epochs=4)
        return Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(causal=causal),
                       callbacks=[FreezeCallback(config)])

    uninterrupted = tiny_model(family, head)
    reference = trainer_for(uninterrupted)
    reference.train()
    timeline = freeze_callback(reference).timeline
    assert len(timeline) >= 2 and timeline[0]["step"] + 1 < timeline[1]["step"] < 24, timeline
    checkpoint = timeline[0]["step"] + 1  # after the first freeze, before the others

    resumed_model = tiny_model(family, head)
    resumed = trainer_for(resumed_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{checkpoint}"))
    assert frozen_boundary(resumed_model) == frozen_boundary(uninterrupted)
    def without_wall_time(events):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in events]

    assert without_wall_time(freeze_callback(resumed).timeline) == without_wall_time(timeline)
    expected, actual = state_of(uninterrupted), state_of(resumed_model)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_a_resume_refuses_a_checkpoint_whose_files_changed_after_saving(tmp_path):
    from hf_freeze.checkpoint import TRAINER_CHECKSUMS_NAME, CheckpointError

    def trainer_for():
        args = training_args(tmp_path, save_strategy="steps", save_steps=2, num_train_epochs=1)
        callback = FreezeCallback(FreezeConfig(policy="fixed", boundary=1))
        return Trainer(model=tiny_model("bert", "seq"), args=args, train_dataset=token_dataset(size=32),
                       data_collator=PadCollator(), callbacks=[callback])

    trainer_for().train()
    checkpoint = tmp_path / "checkpoint-2"
    recorded = json.loads((checkpoint / TRAINER_CHECKSUMS_NAME).read_text())["sha256"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt"} <= set(recorded)
    trainer_for().train(resume_from_checkpoint=str(checkpoint))  # intact: resumes
    weights = checkpoint / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 1  # one bit of the last tensor: safetensors still loads it
    weights.write_bytes(bytes(damaged))
    resumed = trainer_for()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt.*earlier checkpoint"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2  # refused before its first step


def freeze_callback(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FreezeCallback))


def test_config_accepts_a_dict_as_trainer_restores_it():
    callback = FreezeCallback({**FreezeConfig(policy="fixed", boundary=1).to_dict()})
    assert callback.config.boundary == 1
    assert FreezeCallback(**callback.state()["args"]).config == callback.config


def test_boundary_dropout_reaches_the_first_active_block_in_training_only():
    from hf_freeze import freeze_prefix
    from hf_freeze.callback import FreezeCallback as Callback

    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    blocks = model.bert.encoder.layer
    seen = {}
    blocks[1].register_forward_hook(
        lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    callback = Callback(FreezeConfig(policy="fixed", boundary=2, boundary_dropout=0.5))
    callback._place_boundary_dropout(model)
    blocks[2].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", a[0] if a else k["hidden_states"]),
                                        with_kwargs=True)
    ids = torch.randint(5, 90, (2, 8))
    model.train()
    model(input_ids=ids)
    assert not torch.equal(seen["in"], seen["out"]) and (seen["in"] == 0).any()
    model.eval()
    model(input_ids=ids)
    assert torch.equal(seen["in"], seen["out"])  # evaluation sees the states as they are
    freeze_prefix(model, 3)
    callback._place_boundary_dropout(model)  # moved to block 3: block 2 gets its input untouched again
    model.train()
    model(input_ids=ids)
    assert torch.equal(seen["in"], seen["out"])


def test_active_lr_scale_raises_the_rate_of_what_still_trains_by_the_frozen_share(tmp_path):
    rates = []
    for scale in (1.0, 4.0):
        model, recorder = tiny_model("bert", "seq"), LogRecorder()
        config = FreezeConfig(policy="fixed", boundary=3, active_lr_scale=scale)
        trainer = Trainer(model=model, args=training_args(tmp_path / str(scale), num_train_epochs=1, logging_steps=1),
                          train_dataset=token_dataset(), data_collator=PadCollator(),
                          callbacks=[recorder, FreezeCallback(config)])
        trainer.train()
        rates.append([e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e])
    # 4 of the tiny BERT's 5 units (embeddings + 4 blocks) are frozen: every rate is 4 ** (4 / 5) times larger
    assert len(rates[0]) == len(rates[1]) > 2
    assert all(abs(b / a - 4 ** 0.8) < 1e-6 for a, b in zip(rates[0], rates[1]) if a > 0)


@pytest.mark.parametrize(("rewarm", "scale"), [(False, 1.0), (True, 1.0), (True, 2.0)])
def test_active_lr_rewarm_restarts_the_linear_decay_at_each_freeze(tmp_path, rewarm, scale):
    from hf_freeze.freezing import get_layout
    from hf_freeze.policy import units_of

    config = FreezeConfig(policy="schedule", schedule="linear", freeze_start=0.3, freeze_level=0.75, interval=0.1,
                          active_lr_rewarm=rewarm, active_lr_scale=scale)
    callback = FreezeCallback(config)
    model = tiny_model("bert", "seq")
    units = get_layout(model).num_blocks + 1
    trainer = Trainer(model=model, args=training_args(tmp_path, logging_steps=1),
                      train_dataset=token_dataset(), data_collator=PadCollator(), callbacks=[callback])
    trainer.train()
    freezes = {event["step"]: event["boundary"] for event in callback.timeline}
    total, peak = trainer.state.max_steps, 1e-3
    assert len(freezes) >= 2 and 0 < sorted(freezes)[0] < sorted(freezes)[1] < total
    logged = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    for step, rate in logged.items():  # the rate step `step` trained with
        last = max([s for s in freezes if s < step], default=None)
        # active_lr_scale: the peak of what still trains grows with the frozen share of the units
        top = peak * scale ** (units_of(freezes[last]) / units) if last is not None else peak
        # re-warmed: a fresh linear decay to zero from the last freeze before it; plain: Trainer's one decay
        start = last if rewarm and last is not None else 0
        assert rate == pytest.approx(top * (total - step + 1) / (total - start), rel=1e-6), step
    second = sorted(freezes)[1]
    assert (logged[second + 1] == pytest.approx(peak * scale ** (units_of(freezes[second]) / units))) == rewarm


def test_boundary_dropout_reaches_a_prefix_frozen_before_training(tmp_path):
    from hf_freeze import freeze_prefix

    trained = []
    for dropout in (0.0, 0.5):
        model = tiny_model("bert", "seq")
        freeze_prefix(model, 2)  # by hand: the callback never freezes, so only train begin can place the dropout
        config = FreezeConfig(policy="fixed", boundary=2, boundary_dropout=dropout)
        trainer = Trainer(model=model, args=training_args(tmp_path / str(dropout), num_train_epochs=1),
                          train_dataset=token_dataset(), data_collator=PadCollator(),
                          callbacks=[FreezeCallback(config)])
        trainer.train()
        trained.append(state_of(model)["bert.encoder.layer.3.output.dense.weight"])
    assert not torch.allclose(trained[0], trained[1], atol=1e-6)
