"""FreezeTrainer: the cache changes speed, never results."""

import logging

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import LogRecorder, PadCollator, state_of, token_dataset, training_args
from huggingface_hub import ModelCard
from transformers import Trainer

from hf_freeze import FreezeCallback, FreezeConfig, FreezeTrainer, StaleCacheError, frozen_boundary
from hf_freeze.checkpoint import load_suffix, read_metadata

SCHEDULE = dict(policy="schedule", interval=0.2, max_boundary=3)


def train_pair(tmp_path, family, head, cache="on", collator=None, data=None, freeze=None, **args):
    """The same run twice: FreezeTrainer with the cache, and Trainer + FreezeCallback (no cache)."""
    causal = head == "causal"
    data = data or token_dataset(size=40, labels=None if causal else "seq")
    collator = collator or PadCollator(causal=causal)
    models, trainers = [], []
    for use_cache in (True, False):
        model = tiny_model(family, head)
        config = FreezeConfig(**(freeze or SCHEDULE), cache=cache if use_cache else "off")
        arguments = training_args(tmp_path / str(use_cache), gradient_accumulation_steps=2, **args)
        if use_cache:
            trainer = FreezeTrainer(model=model, args=arguments, train_dataset=data, eval_dataset=data,
                                    data_collator=collator, freeze_config=config)
        else:
            trainer = Trainer(model=model, args=arguments, train_dataset=data, eval_dataset=data,
                              data_collator=collator, callbacks=[FreezeCallback(config)])
        trainer.train()
        models.append(model)
        trainers.append(trainer)
    return models, trainers


def assert_same_weights(a, b, atol=1e-6):
    for name, value in state_of(a).items():
        assert torch.allclose(value, state_of(b)[name], atol=atol, rtol=0), name


@pytest.mark.parametrize(("family", "head"), [("bert", "seq"), ("llama", "causal"), ("gpt2", "seq")])
def test_training_with_the_cache_ends_with_the_same_weights(tmp_path, family, head):
    (cached, plain), (trainer, _) = train_pair(tmp_path, family, head)
    stats = trainer.boundary_states.stats
    assert stats.hits > 0 and stats.advanced > 0, stats
    assert frozen_boundary(cached) == frozen_boundary(plain) == 3
    assert_same_weights(cached, plain)


def test_boundary_dropout_acts_on_cached_states_as_on_recomputed_ones(tmp_path):
    (cached, plain), (trainer, _) = train_pair(tmp_path, "bert", "seq", freeze={**SCHEDULE, "boundary_dropout": 0.3})
    assert trainer.boundary_states.stats.hits > 0
    assert_same_weights(cached, plain)  # the same dropout masks: the cache still changes nothing
    (undropped, _), _ = train_pair(tmp_path / "none", "bert", "seq")
    top = "bert.encoder.layer.3.output.dense.weight"
    assert not torch.allclose(state_of(cached)[top], state_of(undropped)[top], atol=1e-6)


def test_budget_policy_follows_its_plan_with_and_without_the_cache(tmp_path):
    (cached, plain), (trainer, plain_trainer) = train_pair(
        tmp_path, "bert", "seq", freeze=dict(policy="budget", target_speedup=1.5, max_boundary=3))
    plans = [t.freeze_callback.policy.plan if hasattr(t, "freeze_callback") else
             next(c for c in t.callback_handler.callbacks if isinstance(c, FreezeCallback)).policy.plan
             for t in (trainer, plain_trainer)]
    assert all(p.predicted_speedup >= 1.5 for p in plans)
    # recomputing the prefix costs more than reading it: without the cache the plan must freeze earlier
    assert plans[1].steps[-1] <= plans[0].steps[-1]
    timeline = trainer.freeze_callback.timeline
    assert [e["step"] for e in timeline] == sorted(set(plans[0].steps))
    assert frozen_boundary(cached) == frozen_boundary(plain) == 3


def test_random_masking_collator_misses_instead_of_reading_stale_states(tmp_path):
    class RandomMask(PadCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            noise = torch.rand(batch["input_ids"].shape) < 0.3
            batch["input_ids"] = batch["input_ids"].masked_fill(noise & (batch["attention_mask"] == 1), 4)
            return batch

    (cached, plain), (trainer, _) = train_pair(tmp_path, "bert", "seq", collator=RandomMask())
    assert trainer.boundary_states.stats.hits < 3  # only an input that happens to draw the same mask may hit
    assert_same_weights(cached, plain)


def test_evaluation_reuses_cached_states_with_identical_results(tmp_path):
    (_, _), (trainer, plain) = train_pair(tmp_path, "bert", "seq")
    first = trainer.evaluate()
    hits = trainer.boundary_states.stats.hits
    second = trainer.evaluate()
    assert trainer.boundary_states.stats.hits > hits
    reference = plain.evaluate()
    assert first["eval_loss"] == pytest.approx(second["eval_loss"], rel=1e-6)
    assert first["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)


def test_freeze_and_cache_metrics_reach_reporting_integrations(tmp_path):
    recorder = LogRecorder()
    model = tiny_model("bert", "seq")
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(size=40),
                            data_collator=PadCollator(), callbacks=[recorder],
                            freeze_config=FreezeConfig(**SCHEDULE, cache="on"))
    trainer.callback_handler.callbacks.remove(recorder)
    trainer.callback_handler.callbacks.insert(0, recorder)  # where Trainer puts TensorBoard & co.
    trainer.train()
    assert any("freeze/boundary" in logs for logs in recorder.logs)
    assert any(logs.get("cache/hits", 0) > 0 for logs in recorder.logs)


def test_a_resume_names_a_truncated_checkpoint_file_before_loading_it(tmp_path):
    from hf_freeze.checkpoint import CheckpointError

    def trainer_for():
        args = training_args(tmp_path, save_strategy="steps", save_steps=2, num_train_epochs=1)
        return FreezeTrainer(model=tiny_model("bert", "seq"), args=args, train_dataset=token_dataset(size=32),
                             data_collator=PadCollator(), freeze_config=FreezeConfig(policy="fixed", boundary=1))

    trainer_for().train()  # 4 steps: checkpoint-2 and checkpoint-4
    optimizer = tmp_path / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # torch.load would fail on it with its own error
    with pytest.raises(CheckpointError, match=r"checkpoint-4/optimizer\.pt is corrupt"):
        trainer_for().train(resume_from_checkpoint=True)  # True: the last checkpoint


def test_resume_with_an_existing_disk_cache(tmp_path):
    data = token_dataset(size=40)
    config = FreezeConfig(**SCHEDULE, cache="on", cache_dir=str(tmp_path / "cache"))

    def trainer_for(model):
        args = training_args(tmp_path / "run", save_strategy="steps", save_steps=1, num_train_epochs=3)
        return FreezeTrainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(),
                             freeze_config=config)

    reference_model = tiny_model("bert", "seq")
    reference = trainer_for(reference_model)
    reference.train()
    last_freeze = reference.freeze_callback.timeline[-1]["step"]
    checkpoint = last_freeze + 2  # the cache on disk already holds states at the final boundary

    resumed_model = tiny_model("bert", "seq")
    resumed = trainer_for(resumed_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{checkpoint}"))
    assert resumed.boundary_states.stats.hits > 0
    assert frozen_boundary(resumed_model) == frozen_boundary(reference_model)
    assert_same_weights(reference_model, resumed_model)


def test_cache_directory_of_another_model_is_refused_when_asked(tmp_path):
    directory = str(tmp_path / "cache")
    for family, on_stale in (("bert", "error"), ("roberta", "error")):
        trainer = FreezeTrainer(
            model=tiny_model(family, "seq"), args=training_args(tmp_path / family), train_dataset=token_dataset(),
            data_collator=PadCollator(), freeze_config=FreezeConfig(**SCHEDULE, cache="on", cache_dir=directory,
                                                                      on_stale_cache=on_stale))
        if family == "bert":
            trainer.train()
        else:
            with pytest.raises(StaleCacheError, match="another model"):
                trainer.train()


def test_examples_without_a_stable_index_skip_the_cache_with_a_warning(tmp_path, caplog):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from token_dataset(size=32)

    trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path, max_steps=8),
                            train_dataset=Stream(), data_collator=PadCollator(),
                            freeze_config=FreezeConfig(**SCHEDULE, cache="on"))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "no stable example index" in caplog.text
    assert trainer.boundary_states is None


def test_torch_map_style_datasets_are_keyed_too(tmp_path):
    rows = list(token_dataset(size=32))
    trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path), train_dataset=rows,
                            data_collator=PadCollator(), freeze_config=FreezeConfig(**SCHEDULE, cache="on"))
    trainer.train()
    assert trainer.boundary_states.stats.hits > 0


def test_auto_mode_stores_only_what_training_will_see_again(tmp_path):
    config = FreezeConfig(policy="fixed", boundary=2, cache="auto")
    trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path, num_train_epochs=1),
                            train_dataset=token_dataset(size=32), data_collator=PadCollator(), freeze_config=config)
    trainer.train()
    assert len(trainer.boundary_states.cache) == 0  # a single epoch never revisits an example


def test_auto_mode_judges_from_several_batches_and_turns_the_cache_off_when_reading_is_slower(
        tmp_path, monkeypatch, caplog):
    from hf_freeze.cache.batch import CacheVerdict

    record = CacheVerdict.record

    def slow_reads(self, boundary, *, read=None, compute=None):  # a very slow disk: 1 s per token read
        return record(self, boundary, read=None if read is None else 1.0, compute=compute)

    monkeypatch.setattr(CacheVerdict, "record", slow_reads)
    config = FreezeConfig(policy="fixed", boundary=2, cache="auto")
    trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path),
                            train_dataset=token_dataset(size=32), data_collator=PadCollator(), freeze_config=config)
    with caplog.at_level(logging.INFO, logger="hf_freeze"):
        trainer.train()
    assert "cache at boundary 2 off" in caplog.text and "medians of 3 and 4 batches" in caplog.text
    # 4 batches of 8 per epoch: epoch 1 computes 4, epoch 2 reads 3 batches, then the verdict turns the cache off
    assert trainer.boundary_states.stats.hits == 3 * 8
    assert trainer.boundary_states.stats.misses == 32


def test_precompute_cache_fills_every_example(tmp_path):
    from hf_freeze import freeze_prefix

    model = tiny_model("bert", "seq")
    freeze_prefix(model, 3)
    data = token_dataset(size=30)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path), train_dataset=data,
                            data_collator=PadCollator(), freeze_config=FreezeConfig(cache="on"))
    assert trainer.precompute_cache() == 30


def test_freeze_trainer_rejects_a_second_freeze_callback(tmp_path):
    with pytest.raises(ValueError, match="already freezes"):
        FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path), train_dataset=token_dataset(),
                      data_collator=PadCollator(), callbacks=[FreezeCallback()])


def test_model_card_records_what_was_frozen_and_when(tmp_path):
    base = tmp_path / "base"
    tiny_model("bert", "seq").save_pretrained(base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path / "out", eval_strategy="epoch"),
                            train_dataset=token_dataset(size=40), eval_dataset=token_dataset(size=16, seed=1),
                            data_collator=PadCollator(), freeze_config=FreezeConfig(**SCHEDULE, cache="on"))
    trainer.train()
    assert any(key.startswith("eval_cache/") or key.startswith("cache/") for e in trainer.state.log_history
               for key in e)  # the counters the card must leave out are in the logs
    trainer.create_model_card(model_name="tiny", tasks="text-classification", dataset="tiny-tokens")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    for event in trainer.freeze_callback.timeline:
        assert f"| {event['step']} |" in card.text
    assert "Policy: `schedule`" in card.text and "boundary 3" in card.text
    assert f"a local model (`{base}`)" in card.text and "from scratch" not in card.text
    results = card.data.eval_results
    assert results and {r.metric_type for r in results} == {"loss"}  # no cache/*, runtimes or epochs
    table = card.text[card.text.index("### Evaluation during training"):].splitlines()
    header = next(line for line in table if line.startswith("| epoch"))
    assert all(cell.strip() for cell in header.strip("|").split("|"))  # every column has a header
    assert (tmp_path / "out" / "freeze_timeline.png").stat().st_size > 1000


@pytest.mark.parametrize("head", ["seq", "causal"])  # causal: BERT's LM head shares a bias the untied config drops
def test_freeze_trainer_saves_write_the_metadata(head, tmp_path):
    data = token_dataset(size=40, labels="seq" if head == "seq" else None)
    trainer = FreezeTrainer(model=tiny_model("bert", head), args=training_args(tmp_path), train_dataset=data,
                            data_collator=PadCollator(causal=head == "causal"), freeze_config=FreezeConfig(**SCHEDULE))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    metadata = read_metadata(tmp_path / "final")
    assert metadata.boundary == frozen_boundary(trainer.model) == 3 and not metadata.suffix_only
    assert [e["step"] for e in metadata.timeline] == [e["step"] for e in trainer.freeze_callback.timeline]
    loaded = load_suffix(tmp_path / "final")
    assert frozen_boundary(loaded) == 3
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_the_cache_ends_with_the_same_weights(tmp_path, reentrant):
    (cached, plain), (trainer, _) = train_pair(
        tmp_path, "llama", "seq", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert trainer.boundary_states.stats.hits > 0
    assert_same_weights(cached, plain)
    initial = tiny_model("llama", "seq")  # same seed: the weights before training
    assert not torch.equal(cached.model.layers[3].mlp.up_proj.weight, initial.model.layers[3].mlp.up_proj.weight)


def test_bf16_training_with_the_cache_ends_with_the_same_weights(tmp_path):
    (cached, plain), (trainer, _) = train_pair(tmp_path, "bert", "seq", bf16=True)
    assert trainer.boundary_states.cache.dtype == torch.float32  # the model's dtype; autocast rounds inside blocks
    assert trainer.boundary_states.stats.hits > 0
    assert_same_weights(cached, plain, atol=1e-3)


def cheap_reads(monkeypatch):
    """Make "auto" judge deterministically in favour of the cache (no timing in tests)."""
    from hf_freeze.cache.batch import CacheVerdict

    record = CacheVerdict.record
    monkeypatch.setattr(CacheVerdict, "record", lambda self, boundary, *, read=None, compute=None: record(
        self, boundary, read=None if read is None else 0.0, compute=None if compute is None else 1.0))


@pytest.mark.parametrize(("batch_size", "accumulation"), [(8, 1), (4, 2)])
def test_auto_mode_store_rule_when_max_steps_drives_training(tmp_path, monkeypatch, batch_size, accumulation):
    cheap_reads(monkeypatch)
    # 32 examples, 4 optimizer steps per epoch, 12 steps: 3 epochs although num_train_epochs says 1
    args = training_args(tmp_path, num_train_epochs=1, max_steps=12, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation)
    trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=args, train_dataset=token_dataset(size=32),
                            data_collator=PadCollator(), freeze_config=FreezeConfig(policy="fixed", boundary=2))
    trainer.train()
    stats = trainer.boundary_states.stats
    assert (stats.misses, stats.hits, len(trainer.boundary_states.cache)) == (32, 64, 32)


def test_precompute_cache_keys_each_split_where_it_is_read(tmp_path):
    from hf_freeze import freeze_prefix

    model = tiny_model("bert", "seq")
    freeze_prefix(model, 3)
    train, named, test = token_dataset(size=24, seed=0), token_dataset(size=16, seed=1), token_dataset(size=8, seed=2)
    trainer = FreezeTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=train,
                            eval_dataset={"dev": named}, data_collator=PadCollator(),
                            freeze_config=FreezeConfig(policy="fixed", boundary=3, cache="on"))
    assert trainer.precompute_cache(named) == 16  # found as the evaluation set "dev"
    trainer.boundary_states.cache_eval = False  # precomputing stores whatever cache_eval says of evaluation batches
    assert trainer.precompute_cache(train) == 40
    trainer.boundary_states.cache_eval = True
    assert trainer.precompute_cache() == 40  # the training set by default: already cached, nothing new
    with pytest.raises(ValueError, match="split="):
        trainer.precompute_cache(test)
    assert trainer.precompute_cache(test, split="test") == 48
    stats = trainer.boundary_states.stats
    stats.hits = stats.misses = 0
    trainer.train()
    assert (stats.hits, stats.misses) == (24, 0)
    trainer.evaluate()
    assert (stats.hits, stats.misses) == (40, 0)
    trainer.predict(test)
    assert (stats.hits, stats.misses) == (48, 0)


def test_resume_with_restored_callback_states_keeps_the_live_callback(tmp_path):
    data = token_dataset(size=40)

    def trainer_for(model, **overrides):
        args = training_args(tmp_path / "run", save_strategy="steps", save_steps=1, num_train_epochs=3, **overrides)
        return FreezeTrainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(),
                             freeze_config=FreezeConfig(**SCHEDULE, cache="on"))

    reference_model = tiny_model("bert", "seq")
    reference = trainer_for(reference_model)
    reference.train()
    checkpoint = reference.freeze_callback.timeline[-1]["step"] + 1

    resumed_model = tiny_model("bert", "seq")
    resumed = trainer_for(resumed_model, restore_callback_states_from_checkpoint=True)
    original = resumed.freeze_callback
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{checkpoint}"))
    live = [c for c in resumed.callback_handler.callbacks if isinstance(c, FreezeCallback)]
    assert live == [resumed.freeze_callback] and live[0] is not original  # Trainer replaced the instance
    assert resumed.freeze_callback.timeline == reference.freeze_callback.timeline
    assert resumed.freeze_callback.state()["attributes"]["boundary"] == frozen_boundary(reference_model)
    assert_same_weights(reference_model, resumed_model)


def test_cache_is_refused_up_front_for_blocks_that_pass_more_than_hidden_states(tmp_path):
    import transformers as T

    from hf_freeze import UnsupportedModelError

    config = T.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=3, num_heads=2, pad_token_id=0,
                        decoder_start_token_id=0, eos_token_id=1, num_labels=2)
    with_eos = token_dataset(size=16).map(lambda row: {"input_ids": row["input_ids"] + [1]})  # T5 classifies at eos
    for cache in ("on", "off"):
        torch.manual_seed(0)
        trainer = FreezeTrainer(
            model=T.T5ForSequenceClassification(config), args=training_args(tmp_path / cache, max_steps=2),
            train_dataset=with_eos, data_collator=PadCollator(),
            freeze_config=FreezeConfig(policy="fixed", boundary=1, cache=cache,
                                       blocks_path="transformer.encoder.block"))
        if cache == "on":
            with pytest.raises(UnsupportedModelError, match=r"position bias.*cache='off'"):
                trainer.train()
            assert trainer.state.global_step == 0
        else:
            trainer.train()  # freezing alone works
            assert trainer.state.global_step == 2 and frozen_boundary(trainer.model) == 1


def test_a_disk_cache_reused_with_other_weights_serves_the_new_ones(tmp_path):
    data = token_dataset(size=40)
    directory = str(tmp_path / "cache")
    one_run = sum(len(ids) for ids in data["input_ids"]) * 32 * 4  # float32 states of width 32
    # room for one run's states and a half: the new entries fit only if the stale ones' bytes are reclaimed
    config = FreezeConfig(policy="fixed", boundary=2, cache="on", cache_dir=directory,
                          cache_max_bytes=int(1.5 * one_run))
    runs = []
    for seed in (0, 1):  # same architecture, other weights: the second run reuses the first run's folder
        trainer = FreezeTrainer(model=tiny_model("bert", "seq", seed=seed), args=training_args(tmp_path / str(seed)),
                                train_dataset=data, data_collator=PadCollator(), freeze_config=config)
        trainer.train()
        runs.append(trainer)
    stats = runs[1].boundary_states.stats
    assert (stats.misses, stats.hits) == (40, 80)  # the old entries missed once, the new ones hit
    assert runs[0].boundary_states.cache.nbytes == one_run and runs[1].boundary_states.cache.nbytes <= 1.5 * one_run
    plain = Trainer(model=tiny_model("bert", "seq", seed=1), args=training_args(tmp_path / "plain"),
                    train_dataset=data, data_collator=PadCollator(),
                    callbacks=[FreezeCallback(FreezeConfig(policy="fixed", boundary=2))])
    plain.train()
    assert_same_weights(runs[1].model, plain.model)


# ---- weights changed in place: the cache and the saved fingerprint follow them ----


def _eval_loss_of_the_model_itself(model, data, tmp_path):
    """The model's own evaluation (plain Trainer, no cache)."""
    return Trainer(model=model, args=training_args(tmp_path / "own"), eval_dataset=data,
                   data_collator=PadCollator()).evaluate()["eval_loss"]


class _FirstIsBest:
    """`compute_metrics` whose first evaluation is the best one (`greater_is_better=True`)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prediction):
        self.calls += 1
        return {"rank": -self.calls}


def test_load_best_model_at_end_from_before_a_freeze_evaluates_the_loaded_weights(tmp_path):
    from hf_freeze.fingerprint import prefix_fingerprint
    from hf_freeze.freezing import get_layout

    data = token_dataset(size=24)
    args = training_args(tmp_path / "run", eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                         load_best_model_at_end=True, metric_for_best_model="rank", greater_is_better=True,
                         num_train_epochs=3)
    trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=args, train_dataset=data, eval_dataset=data,
                            data_collator=PadCollator(), compute_metrics=_FirstIsBest(),
                            freeze_config=FreezeConfig(**SCHEDULE, cache="on"))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")  # before the first freeze
    assert trainer.freeze_callback.timeline[0]["step"] > 1 and frozen_boundary(trainer.model) == 3
    cached = trainer.evaluate()["eval_loss"]
    assert trainer.boundary_states.stats.hits > 0  # states recomputed with the loaded weights are read back
    assert cached == pytest.approx(_eval_loss_of_the_model_itself(trainer.model, data, tmp_path), rel=1e-5)
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    saved = read_metadata(tmp_path / "saved").prefix_fingerprint
    assert saved == prefix_fingerprint(reloaded, get_layout(reloaded), 3)


def test_resume_from_a_checkpoint_before_the_last_freeze_does_not_read_stale_states(tmp_path):
    data = token_dataset(size=40)
    runs = []
    for cache in ("on", "off"):
        args = training_args(tmp_path / cache, save_strategy="steps", save_steps=1, num_train_epochs=3)
        trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=args, train_dataset=data, eval_dataset=data,
                                data_collator=PadCollator(), freeze_config=FreezeConfig(**SCHEDULE, cache=cache))
        trainer.train()
        middle = trainer.freeze_callback.timeline[-1]["step"] - 1  # blocks 0..2 frozen there, block 2 still trains
        # resumed in the same process: the model keeps boundary 3, and block 2 gets its weights of step `middle`
        trainer.train(resume_from_checkpoint=str(tmp_path / cache / f"checkpoint-{middle}"))
        runs.append(trainer)
    cached, plain = runs
    assert cached.boundary_states.stats.hits > 0
    assert_same_weights(cached.model, plain.model)
    assert cached.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-5)


class _LoadFrozenWeightsAfterFirstEpoch(transformers.TrainerCallback):
    """Loads other values into the frozen prefix, in place, once the first epoch ended."""

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if round(state.epoch) == 1:
            other = tiny_model("bert", "seq", seed=1).state_dict()
            frozen = {n: other[n] for n, p in model.named_parameters() if not p.requires_grad}
            model.load_state_dict(frozen, strict=False)


def test_an_in_place_load_of_frozen_weights_between_epochs_is_seen_by_the_cache(tmp_path):
    data = token_dataset(size=40)
    runs = []
    for cache in ("on", "off"):
        trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path / cache),
                                train_dataset=data, eval_dataset=data, data_collator=PadCollator(),
                                callbacks=[_LoadFrozenWeightsAfterFirstEpoch()],
                                freeze_config=FreezeConfig(policy="fixed", boundary=2, cache=cache))
        trainer.train()
        runs.append(trainer)
    cached, plain = runs
    assert cached.boundary_states.stats.hits > 0
    assert_same_weights(cached.model, plain.model)
    assert cached.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-5)
