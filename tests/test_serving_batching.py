"""DynamicBatcher: batches stay within the token budget, mix models, every input is answered; a full queue is
refused; an engine failure is reported to its clients and the worker keeps serving."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model
from serving_helpers import perturbed_finetune, random_ids

from hf_freeze.serving import Request, ServingEngine, ServingError, UnavailableError
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
