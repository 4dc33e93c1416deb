"""DynamicBatcher: batches stay within the token budget, mix models, every input is answered; a full queue is
refused; an engine failure is reported to its clients and the worker keeps serving."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model
from serving_helpers import perturbed_finetune, random_ids

from hf_freeze.serving import GenerationRequest, Request, ServingEngine, ServingError, UnavailableError
from hf_freeze.serving.batching import DynamicBatcher, OverloadedError


@pytest.fixture(scope="module")
def engine():
    base = tiny_model("bert", "seq").eval()
    engine = ServingEngine(base, cache_bytes=0)
    engine.add_model("k2", perturbed_finetune("bert", "seq", 2, seed=2, base=base))
    return engine


def test_batches_respect_the_token_budget_and_answer_every_input(engine):
    batches = []
    batcher = DynamicBatcher(engine, max_wait_ms=50, max_batch_tokens=40,
                             on_batch=lambda task, n, tokens: batches.append((n, tokens)))
    inputs = random_ids(30, 0, min_len=5, max_len=10)
    requests = [Request(ids, model=["k2", None][i % 2]) for i, ids in enumerate(inputs)]
    futures = batcher.submit("predict", requests)  # queued before the worker starts: batches fill up
    batcher.start()
    answers = [f.result(timeout=60) for f in futures]
    batcher.stop()
    expected = engine.predict(requests)
    for got, want in zip(answers, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(n for n, _ in batches) == 30
    assert all(tokens <= 40 for _, tokens in batches)
    assert max(n for n, _ in batches) > 1  # inputs were batched together
    assert batcher.queued == 0


def test_an_input_larger_than_the_budget_runs_alone(engine):
    batches = []
    batcher = DynamicBatcher(engine, max_wait_ms=20, max_batch_tokens=8,
                             on_batch=lambda task, n, tokens: batches.append((n, tokens)))
    futures = batcher.submit("predict", [Request([5] * 20), Request([6, 7])])
    batcher.start()
    answers = [f.result(timeout=60) for f in futures]
    batcher.stop()
    assert batches == [(1, 20), (1, 2)]
    for got, want in zip(answers, engine.predict([Request([5] * 20), Request([6, 7])]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stop_answers_every_waiting_input_including_the_one_held_for_the_next_batch(engine):
    batcher = DynamicBatcher(engine, max_wait_ms=0, max_batch_tokens=8)
    futures = batcher.submit("predict", [Request([5] * 6), Request([6] * 6), Request([7] * 6)])
    batcher._next_batch()  # what the worker does: the second input no longer fits and is held back
    assert batcher._carry is not None
    batcher.stop()
    for future in futures[1:]:
        with pytest.raises(UnavailableError, match="shutting down"):
            future.result(timeout=1)
    assert batcher.queued == 1  # the first input was taken into a batch (and would be answered by it)


def test_a_cancelled_input_is_not_run(engine):
    batches = []
    batcher = DynamicBatcher(engine, max_wait_ms=20, on_batch=lambda task, n, tokens: batches.append(n))
    futures = batcher.submit("predict", [Request([5, 6]), Request([7, 8, 9])])
    futures[0].cancel()  # the client went away
    batcher.start()
    answer = futures[1].result(timeout=60)
    batcher.stop()
    torch.testing.assert_close(answer, engine.predict([Request([7, 8, 9])])[0], rtol=1e-5, atol=1e-5)
    assert batches == [1] and batcher.queued == 0


def test_generate_refuses_a_request_that_is_not_a_generation_request(engine):
    with pytest.raises(ServingError, match="GenerationRequest"):
        engine.validate("generate", [Request([5, 6])])


def test_a_full_queue_is_refused_without_queueing_anything(engine):
    batcher = DynamicBatcher(engine, max_queue=3)
    batcher.submit("predict", [Request([5, 6])] * 2)
    with pytest.raises(OverloadedError, match="overloaded"):
        batcher.submit("predict", [Request([5, 6])] * 2)
    assert batcher.queued == 2
    batcher.start()
    batcher.stop()


def test_an_engine_failure_reaches_its_clients_and_the_worker_keeps_serving(engine, monkeypatch):
    batcher = DynamicBatcher(engine, max_wait_ms=1)
    failing = threading.Event()
    original = engine.predict

    def predict(requests):
        if failing.is_set():
            raise RuntimeError("boom")
        return original(requests)

    monkeypatch.setattr(engine, "predict", predict)
    batcher.start()
    failing.set()
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit("predict", [Request([5, 6])])[0].result(timeout=60)
    failing.clear()
    assert batcher.submit("predict", [Request([5, 6])])[0].result(timeout=60) is not None
    assert batcher.alive and batcher.queued == 0
    batcher.stop()


def _own_greedy(model, ids, max_new_tokens):
    """`model`'s own greedy `generate` of one prompt, cut after its first EOS."""
    own = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return own[: own.index(eos) + 1] if eos in own else own


@pytest.mark.parametrize("bad", [{"seed": 2**70, "do_sample": True}, {"temperature": 1e-300, "do_sample": True}],
                         ids=["seed", "temperature"])
def test_a_generation_input_that_fails_fails_alone(bad, monkeypatch):
    """A generation input that crashes decoding (here: parameters that validation used to let through) gets the
    error; the other inputs admitted with it get their own model's answers (the scheduler isolates its rows)."""
    base = tiny_model("llama", "causal").eval()
    finetune = perturbed_finetune("llama", "causal", 2, seed=2, base=base)
    engine = ServingEngine(base)
    engine.add_model("k2", finetune)
    with pytest.raises(ServingError):
        engine.validate("generate", [GenerationRequest([5, 6], **bad)])  # refused before a batch today
    monkeypatch.setattr(engine, "validate", lambda task, requests: None)  # as if validation had missed it
    prompts = random_ids(6, 4)
    good = [GenerationRequest(ids, model=["k2", None][i % 2], max_new_tokens=4) for i, ids in enumerate(prompts)]
    requests = good[:3] + [GenerationRequest([5, 6, 7], max_new_tokens=4, **bad)] + good[3:]
    batches = []
    batcher = DynamicBatcher(engine, max_wait_ms=50, on_batch=lambda task, n, tokens: batches.append(n))
    futures = batcher.submit("generate", requests)  # queued before the worker starts: admitted together
    batcher.start()
    with pytest.raises(Exception):  # noqa: B017 (whatever the engine raised, it reaches this client only)
        futures[3].result(timeout=60)
    answers = [f.result(timeout=60) for i, f in enumerate(futures) if i != 3]
    assert batcher.alive and batcher.queued == 0
    batcher.stop()
    for request, answer in zip(good, answers, strict=True):
        model = finetune if request.model == "k2" else base
        assert answer.token_ids == _own_greedy(model, list(request.input_ids), 4)
    assert batches == [7]  # all seven were admitted to one running batch


def test_a_classifier_batch_with_an_input_the_engine_cannot_take_answers_the_others(monkeypatch):
    """RoBERTa numbers positions from padding_idx + 1: an input of max_position_embeddings - 1 tokens crashes its
    forward. Validation refuses it now; if it did not, the other inputs of the batch still get their answers."""
    base = tiny_model("roberta", "seq").eval()
    engine = ServingEngine(base, cache_bytes=0)
    positions = base.config.max_position_embeddings
    assert engine.models["base"].max_input_tokens == positions - 2  # padding_idx 1
    too_long = Request([5] * (positions - 1))
    with pytest.raises(ServingError, match=f"exceeds the {positions - 2} positions"):
        engine.validate("predict", [too_long])
    monkeypatch.setattr(engine, "validate", lambda task, requests: None)
    good = [Request(ids) for ids in random_ids(4, 6)]
    batcher = DynamicBatcher(engine, max_wait_ms=50)
    futures = batcher.submit("predict", [good[0], too_long, *good[1:]])
    batcher.start()
    with pytest.raises(RuntimeError, match="out of bounds"):
        futures[1].result(timeout=60)
    answers = [f.result(timeout=60) for i, f in enumerate(futures) if i != 1]
    batcher.stop()
    with torch.no_grad():
        for request, answer in zip(good, answers, strict=True):
            expected = base(input_ids=torch.tensor([request.input_ids])).logits[0]
            torch.testing.assert_close(answer, expected, rtol=1e-5, atol=1e-5)
