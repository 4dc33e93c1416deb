"""BatchCache: per batch, what is read, computed, advanced and stored; the cache changes speed, never results
(losses and gradients from cached states equal a full forward, also under gradient checkpointing and in bf16)."""

import pytest
import torch
from conftest import TRAINABLE_CASES, tiny_batch, tiny_model

from hf_freeze import PrefixCache, freeze_prefix, get_layout
from hf_freeze.cache import store as store_module
from hf_freeze.cache.batch import BatchCache, CacheVerdict, TrainingProgress, synchronize, will_see_again
from hf_freeze.cache.keys import example_digests
from hf_freeze.cache.runner import PrefixRunner

RTOL = 1e-5


def provider_for(model):
    layout = get_layout(model)
    return BatchCache(PrefixRunner(model, layout), PrefixCache(model, layout), label_names=["labels"])


def loss_and_grads(model, batch, provider=None, keys=None, boundary=None):
    model.zero_grad()
    torch.manual_seed(0)  # same dropout draws in the active blocks
    if provider is None:
        loss = model(**batch).loss
    else:
        states = provider.states_for(batch, keys, boundary)
        with provider.runner.inject_states(states, boundary):
            loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_close(reference, candidate):
    (loss_a, grads_a), (loss_b, grads_b) = reference, candidate
    assert torch.allclose(loss_a, loss_b, rtol=RTOL, atol=0), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    # Relative error of all gradients together, and of each tensor. Tensors whose true gradient is zero (attention
    # key biases, which softmax ignores) hold only rounding noise, so a tensor's scale is floored at a thousandth of
    # the largest tensor's gradient norm.
    flat_a = torch.cat([g.flatten() for g in grads_a.values()])
    flat_b = torch.cat([grads_b[n].flatten() for n in grads_a])
    assert (flat_a - flat_b).norm() / flat_a.norm() <= RTOL
    floor = 1e-3 * max(g.norm() for g in grads_a.values())
    for name in grads_a:
        error = (grads_a[name] - grads_b[name]).norm() / max(grads_a[name].norm(), floor)
        assert error <= RTOL, (name, float(error))


def reorder(batch, order, length):
    """The same examples in another order, padded to another length (right padding)."""
    out = {}
    for key, value in batch.items():
        value = value[order]
        if value.dim() == 2:
            pad = 0 if key == "attention_mask" else (-100 if key == "labels" else int(batch["input_ids"][-1, -1]))
            value = torch.cat([value, torch.full((len(order), length - value.shape[1]), pad)], dim=1)
        out[key] = value
    return out


@pytest.mark.parametrize(("family", "head"), TRAINABLE_CASES)
def test_cached_loss_and_gradients_equal_a_full_forward(family, head):
    model = tiny_model(family, head)
    freeze_prefix(model, 2)
    model.train()
    first = tiny_batch(model, head, batch=3, length=9)
    provider = provider_for(model)
    keys = torch.tensor([10, 11, 12])
    provider.states_for(first, keys, 2)  # fills the cache, padded to length 9
    assert provider.stats.misses == 3

    # Hits re-padded into another batch: other order, longer padding.
    second = reorder(first, [2, 0, 1], length=12)
    assert_close(loss_and_grads(model, second), loss_and_grads(model, second, provider, keys[[2, 0, 1]], 2))
    assert provider.stats.hits == 3 and provider.stats.misses == 3


@pytest.mark.parametrize(("family", "head"), [("bert", "seq"), ("llama", "causal"), ("gpt2", "token")])
def test_advancing_the_boundary_reuses_older_states(family, head):
    model = tiny_model(family, head)
    freeze_prefix(model, 1)
    model.train()
    batch = tiny_batch(model, head)
    keys = torch.tensor([0, 1, 2])
    provider = provider_for(model)
    provider.states_for(batch, keys, 1)
    freeze_prefix(model, 3)
    calls = []
    handle = get_layout(model).blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    cached = loss_and_grads(model, batch, provider, keys, 3)
    handle.remove()
    assert provider.stats.advanced == 3 and not calls  # block 0 never ran again: only blocks 1 and 2 did
    assert_close(loss_and_grads(model, batch), cached)
    assert all(provider.cache.get(int(k), d, 3).boundary == 3 for k, d in zip(keys, example_digests(
        {k: v for k, v in batch.items() if k != "labels"}, ())))


def test_a_lockstep_batch_fingerprints_every_boundary_first_whatever_entries_this_rank_holds(monkeypatch):
    # Under FSDP2 a fingerprint gathers sharded weights (collectives every rank must call in the same order), but
    # which entries a rank finds is its own: a lockstep batch pins all its boundaries before any lookup or store.
    model = tiny_model("bert")
    freeze_prefix(model, 1)
    layout = get_layout(model)
    provider = BatchCache(PrefixRunner(model, layout), PrefixCache(model, layout), ["labels"], lockstep=True)
    batch, keys = tiny_batch(model, "seq"), torch.tensor([0, 1, 2])
    provider.states_for({k: v[:1] for k, v in batch.items()}, keys[:1], 1)  # this rank holds one entry, at 1
    freeze_prefix(model, 3)
    pinned = []
    real = store_module.prefix_fingerprints
    monkeypatch.setattr(store_module, "prefix_fingerprints",
                        lambda *a, **k: pinned.append(sorted(a[2])) or real(*a, **k))
    monkeypatch.setattr(store_module, "prefix_fingerprint", lambda *a, **k: pytest.fail("fingerprint outside the pins"))
    provider.states_for(batch, keys, 3)
    assert pinned == [[1, 2, 3]] and provider.stats.misses == 1 + 3  # not every row hit: all computed


def test_changed_inputs_miss_instead_of_reading_a_wrong_entry():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    provider = provider_for(model)
    batch = tiny_batch(model, "seq")
    keys = torch.tensor([0, 1, 2])
    provider.states_for(batch, keys, 2)
    masked = dict(batch, input_ids=batch["input_ids"].clone())
    masked["input_ids"][1, 0] = 4  # e.g. a random-masking collator changed one token of example 1
    model.train()
    assert_close(loss_and_grads(model, masked), loss_and_grads(model, masked, provider, keys, 2))
    assert provider.stats.hits == 2 and provider.stats.misses == 4


def test_left_padding_shift_is_part_of_the_identity():
    model = tiny_model("llama", "causal")
    freeze_prefix(model, 2)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    short = {"input_ids": ids[:1, 2:], "attention_mask": mask[:1, 2:]}
    left = {"input_ids": ids[:1], "attention_mask": mask[:1]}
    assert example_digests(short, ()) != example_digests(left, ())
    right = {"input_ids": torch.tensor([[5, 6, 7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    assert example_digests(short, ()) == example_digests(right, ())


def test_duplicated_examples_in_one_batch_are_fine():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    model.train()
    batch = tiny_batch(model, "seq")
    batch = {k: torch.cat([v, v[:1]]) for k, v in batch.items()}  # a padded last batch repeats examples
    keys = torch.tensor([0, 1, 2, 0])
    provider = provider_for(model)
    assert_close(loss_and_grads(model, batch), loss_and_grads(model, batch, provider, keys, 2))
    assert_close(loss_and_grads(model, batch), loss_and_grads(model, batch, provider, keys, 2))
    assert len(provider.cache) == 3


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_cached_path_under_gradient_checkpointing_trains_the_active_blocks(family, reentrant):
    model = tiny_model(family, "seq")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    freeze_prefix(model, 2)
    model.train()
    batch = tiny_batch(model, "seq")
    keys = torch.tensor([0, 1, 2])
    provider = provider_for(model)
    provider.states_for(batch, keys, 2)
    cached = loss_and_grads(model, batch, provider, keys, 2)
    assert provider.stats.hits == 3
    active = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(cached[1]) == active and all(g.abs().sum() > 0 for g in cached[1].values())
    assert_close(loss_and_grads(model, batch), cached)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("family", "head"), [("bert", "seq"), ("llama", "causal")])
def test_half_precision_model_cached_equals_recomputed_to_its_tolerance(family, head, dtype):
    model = tiny_model(family, head).to(dtype)
    freeze_prefix(model, 2)
    model.train()
    first = tiny_batch(model, head, batch=3, length=9)
    provider = provider_for(model)
    keys = torch.tensor([10, 11, 12])
    provider.states_for(first, keys, 2)
    assert provider.cache.dtype == dtype  # the model's dtype: nothing rounded on the way in
    second = reorder(first, [2, 0, 1], length=12)
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(model, second), loss_and_grads(
        model, second, provider, keys[[2, 0, 1]], 2)
    assert provider.stats.hits == 3
    assert torch.allclose(loss_a.float(), loss_b.float(), rtol=2e-2, atol=0)
    flat_a = torch.cat([g.float().flatten() for g in grads_a.values()])
    flat_b = torch.cat([grads_b[n].float().flatten() for n in grads_a])
    assert (flat_a - flat_b).norm() / flat_a.norm() <= 2e-2


def test_a_batch_with_nothing_to_read_or_store_runs_the_plain_forward():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    provider = provider_for(model)
    provider.mode = "auto"
    batch, keys = tiny_batch(model, "seq"), torch.tensor([0, 1, 2])
    last_epoch = TrainingProgress(step=9, max_steps=12, steps_per_epoch=4)
    assert provider.states_for(batch, keys, 2, training=True, progress=last_epoch) is None
    assert provider.stats.misses == 0 and len(provider.cache) == 0
    early = TrainingProgress(step=1, max_steps=12, steps_per_epoch=4)
    assert provider.states_for(batch, keys, 2, training=True, progress=early) is not None
    assert len(provider.cache) == 3
    assert provider.states_for(batch, keys, 2, training=True, progress=last_epoch) is not None  # hits are read
    assert provider.stats.hits == 3


@pytest.mark.parametrize(("step", "expected"), [(0, True), (7, True), (8, False), (11, False)])
def test_store_rule_counts_epochs_in_optimizer_steps(step, expected):
    # max_steps 12 with 4 steps per epoch: the batch of step s + 1 comes back at step s + 5
    assert will_see_again(TrainingProgress(step=step, max_steps=12, steps_per_epoch=4)) is expected
    assert will_see_again(TrainingProgress(step=step, max_steps=12, steps_per_epoch=None))


def test_auto_verdict_waits_for_three_batches_of_each_and_compares_medians():
    verdict = CacheVerdict()
    for cost in (5.0, 0.1, 0.1):  # one slow outlier read (a cold page cache) does not decide
        assert verdict.record(2, read=cost) is None
    assert verdict.record(2, compute=1.0) is None and verdict.record(2, compute=1.0) is None
    assert verdict.allows(2)
    assert verdict.record(2, compute=0.2) is True and verdict.allows(2)
    slow = CacheVerdict()
    for _ in range(3):
        slow.record(3, read=2.0, compute=1.0)
    assert not slow.allows(3) and slow.allows(2)


def test_timings_synchronise_an_accelerator_but_not_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: calls.append(device))
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_only_a_pending_auto_verdict_synchronises_the_device(monkeypatch, mode):
    calls = []
    monkeypatch.setattr("hf_freeze.cache.batch.synchronize", lambda device: calls.append(device))
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    provider = provider_for(model)
    provider.mode = mode
    batch, keys = tiny_batch(model, "seq"), torch.tensor([0, 1, 2])
    for step in range(8):  # a miss, then hits; "auto" judges once three of each are timed
        if step in (1, 2):  # two more misses: other keys
            provider.states_for(batch, keys + 10 * step, 2)
        provider.states_for(batch, keys, 2)
    if mode == "on":
        assert calls == []
    else:
        assert 2 in provider.verdict.verdicts and calls  # timed with the device synchronised until judged
        judged = len(calls)
        provider.states_for(batch, keys, 2)
        assert len(calls) == judged


def test_saved_seconds_prices_each_hit_at_its_own_boundary():
    from hf_freeze.cache.batch import CacheStats

    stats = CacheStats(seconds_per_token={1: 1.0, 4: 4.0}, read_seconds=2.0)
    stats.hit_tokens_by_boundary = {1: 10}
    assert stats.saved_seconds() == pytest.approx(10 * 1.0 - 2.0)  # not 10 * 4.0 (the costliest boundary)
    stats.hit_tokens_by_boundary = {1: 10, 2: 5}  # boundary 2 never computed: boundary 1's cost, scaled by 2
    assert stats.saved_seconds() == pytest.approx(10 * 1.0 + 5 * 2.0 - 2.0)


def test_a_run_logs_hits_at_their_boundary():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    provider = provider_for(model)
    batch, keys = tiny_batch(model, "seq"), torch.tensor([0, 1, 2])
    provider.states_for(batch, keys, 2)
    provider.states_for(batch, keys, 2)
    tokens = int(batch["attention_mask"].sum())
    assert provider.stats.hit_tokens_by_boundary == {2: tokens} and provider.stats.hit_tokens == tokens


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_left_padded_causal_lm_keeps_the_padding_states_it_predicts_from(family):
    # The last left-padding position predicts the first real token, so its state counts in the loss.
    model = tiny_model(family, "causal")
    freeze_prefix(model, 2)
    model.train()
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    provider = provider_for(model)
    keys = torch.tensor([0, 1, 2])
    provider.states_for(batch, keys, 2)
    reordered = {k: v[[2, 0, 1]] for k, v in batch.items()}
    assert_close(loss_and_grads(model, reordered), loss_and_grads(model, reordered, provider, keys[[2, 0, 1]], 2))
    assert provider.stats.hits == 3


@pytest.mark.parametrize("directory", [False, True])
def test_an_example_with_no_real_token_is_stored_and_read_back(tmp_path, directory):
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)
    layout = get_layout(model)
    cache = PrefixCache(model, layout, directory=tmp_path if directory else None)
    provider = BatchCache(PrefixRunner(model, layout), cache, label_names=["labels"])
    batch = tiny_batch(model, "seq")
    batch["attention_mask"][2] = 0  # an empty example: a zero-length entry
    keys = torch.tensor([0, 1, 2])
    first = provider.states_for(batch, keys, 2)
    second = provider.states_for(batch, keys, 2)
    assert provider.stats.hits == 3 and torch.equal(first, second)
    (digest,) = example_digests({k: v[2:] for k, v in batch.items() if k != "labels"}, ())
    assert cache.get(2, digest, 2).states.shape == (0, 32)
