"""GenerationScheduler (continuous batching): rows joining at different steps and leaving when done still decode
token-identically to each model's own `generate`, the model's `generation_config` is followed, a cancelled or
failing row leaves alone, and other tasks wait about one decoding step behind a long generation."""

from __future__ import annotations

import ast
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import CONFIGS, UNSUPPORTED, tiny_model
from serving_helpers import perturbed_finetune, random_ids

from hf_freeze import get_layout
from hf_freeze.serving import DynamicBatcher, GenerationRequest, Request, ServingEngine
from hf_freeze.serving.app import create_app, serve_in_thread
from hf_freeze.serving.generation import DecodeBatch, RowSampler
from hf_freeze.serving.scheduler import GenerationScheduler

CAUSAL = [f for f in CONFIGS if (f, "causal") not in UNSUPPORTED]


def _engine(family: str, boundaries=(1, 3)):
    base = tiny_model(family, "causal").eval()
    engine = ServingEngine(base)
    models = {None: base}
    for k in boundaries:
        models[f"k{k}"] = perturbed_finetune(family, "causal", k, seed=30 + k, base=base)
        engine.add_model(f"k{k}", models[f"k{k}"])
    return engine, models


def _own_generate(model, request: GenerationRequest, logprobs: bool = False):
    """The model's own `generate` on the prompt alone, cut after its first stop token (as the engine reports); with
    `logprobs`, also each chosen token's log-probability under its processed scores."""
    ids = torch.tensor([request.input_ids])
    kwargs = {} if request.max_new_tokens is None else {"max_new_tokens": request.max_new_tokens}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    stops = set([eos] if isinstance(eos, int) else (eos or []))
    end = next((i + 1 for i, token in enumerate(tokens) if token in stops), len(tokens))
    scores = [float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.scores, tokens[:end])]
    return (tokens[:end], scores) if logprobs else tokens[:end]


@pytest.mark.parametrize("family", CAUSAL)
def test_rows_joining_at_different_steps_decode_like_their_own_generate(family):
    engine, models = _engine(family)
    scheduler = GenerationScheduler(engine)
    names = list(models)
    prompts = random_ids(7, seed=4, min_len=2, max_len=12)
    lengths = [12, 3, 9, 1, 6, 10, 4]  # short rows leave while long ones run; later rows join a running batch
    join_at = [0, 0, 1, 3, 3, 5, 8]
    requests = [GenerationRequest(p, model=names[i % len(names)], max_new_tokens=n)
                for i, (p, n) in enumerate(zip(prompts, lengths))]
    futures: dict[int, object] = {}
    sizes = []
    step = 0
    while len(futures) < len(requests) or scheduler.busy:
        for i, at in enumerate(join_at):
            if at == step:
                futures[i] = scheduler.submit(requests[i])
        scheduler.step()
        sizes.append(scheduler.running)
        step += 1
    for i, request in enumerate(requests):
        result = futures[i].result()
        tokens, logprobs = _own_generate(models[request.model], request, logprobs=True)
        assert result.token_ids == tokens, (i, request.model)
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), rtol=1e-4, atol=1e-4)
    assert max(sizes) >= 4  # rows really ran together ...
    assert any(b < a for a, b in zip(sizes, sizes[1:]))  # ... finished ones left ...
    assert any(b > a > 0 for a, b in zip(sizes, sizes[1:]))  # ... and newcomers joined a running batch


def test_a_step_runs_the_shared_prefix_once_for_running_rows_and_once_for_newcomers():
    engine, _ = _engine("qwen2", boundaries=(1, 2))
    scheduler = GenerationScheduler(engine)
    scheduler.generate([GenerationRequest([5, 6], model=m, max_new_tokens=1) for m in ("k1", "k2", None)])  # warm-up
    calls = []
    handle = get_layout(engine.base).blocks[0].register_forward_hook(lambda *a: calls.append(a[2].shape[0]))
    own = [get_layout(engine.models[n].model).blocks[0].register_forward_hook(lambda *a: calls.append(-1))
           for n in ("k1", "k2")]
    for i, ids in enumerate(random_ids(3, 8)):
        scheduler.submit(GenerationRequest(ids, model=["k1", "k2", None][i], max_new_tokens=6))
    scheduler.step()  # prefill of the three rows
    scheduler.step()  # decoding of the three
    scheduler.submit(GenerationRequest([7, 8, 9], model="k1", max_new_tokens=6))
    scheduler.step()  # prefill of the newcomer + decoding of the three
    for h in [handle, *own]:
        h.remove()
    assert calls == [3, 3, 1, 3]  # base blocks [0, 1) once per forward for all its rows; no fine-tune's own prefix


def test_generation_follows_the_models_generation_config():
    engine, models = _engine("llama", boundaries=(2,))
    for model in (engine.models["k2"].model, models["k2"]):  # the served copy and the user's own
        model.generation_config.no_repeat_ngram_size = 2
        model.generation_config.repetition_penalty = 1.8
        model.generation_config.min_new_tokens = 3
        model.generation_config.max_new_tokens = 9
        model.generation_config.eos_token_id = [2, 17]
    requests = [GenerationRequest(ids, model="k2") for ids in random_ids(4, seed=9, min_len=3)]
    requests.append(GenerationRequest([5, 5, 5, 5], model="k2", max_new_tokens=14))  # the request's length wins
    results = GenerationScheduler(engine).generate(requests)
    plain = GenerationScheduler(_engine("llama", boundaries=(2,))[0]).generate(
        [GenerationRequest(r.input_ids, model="k2", max_new_tokens=r.max_new_tokens or 9) for r in requests])
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == _own_generate(models["k2"], request)
        assert len(result.token_ids) == (request.max_new_tokens or 9) or result.token_ids[-1] in (2, 17)
    assert any(r.token_ids != p.token_ids for r, p in zip(results, plain))  # the config changed the output


def test_a_cancelled_row_stops_and_leaves_the_batch():
    engine, _ = _engine("llama", boundaries=(2,))
    scheduler = GenerationScheduler(engine)
    long = scheduler.submit(GenerationRequest([5, 6, 7], model="k2", max_new_tokens=200))
    other = scheduler.submit(GenerationRequest([8, 9], max_new_tokens=6))
    for _ in range(3):
        scheduler.step()
    assert scheduler.running == 2
    assert long.cancel()
    scheduler.step()
    assert scheduler.running == 1  # the cancelled row left at the next step
    while scheduler.busy:
        scheduler.step()
    assert scheduler.steps < 10 and len(other.result().token_ids) == 6


def test_a_row_whose_sampling_raises_fails_alone():
    engine, models = _engine("llama", boundaries=(2,))
    good = [GenerationRequest(ids, model="k2", max_new_tokens=5) for ids in random_ids(3, seed=2)]
    bad = [GenerationRequest([5, 6], model="k2", max_new_tokens=5, do_sample=True, seed=2**70),  # generator
           GenerationRequest([5, 6], model="k2", max_new_tokens=5, do_sample=True, temperature=1e-300)]  # inf/nan
    scheduler = GenerationScheduler(engine)
    with pytest.raises(ValueError, match="seed"):
        scheduler.submit(bad[0])  # refused up front today: submitted below as if validation had missed them
    futures = [scheduler.submit(r, validated=True) for r in [good[0], bad[0], good[1], bad[1], good[2]]]
    while scheduler.busy:
        scheduler.step()
    assert futures[1].exception() is not None and futures[3].exception() is not None
    for future, request in zip([futures[0], futures[2], futures[4]], good):
        assert future.result().token_ids == _own_generate(models["k2"], request)


def test_a_row_whose_prefill_raises_fails_alone(monkeypatch):
    """A prefill that raises is retried row by row: the row that fails gets the error, the rows prefilled with it
    decode like their own generate, alongside rows that were already running."""
    engine, models = _engine("llama", boundaries=(2,))
    poison = [9, 9, 9]
    prefill = DecodeBatch.forward

    def forward(batch):
        if batch.mask.shape[1] == 0 and any(list(r.request.input_ids) == poison for r in batch.sequences):
            raise RuntimeError("this row cannot be prefilled")
        return prefill(batch)

    monkeypatch.setattr(DecodeBatch, "forward", forward)
    names = ["k2", None]
    good = [GenerationRequest(ids, model=names[i % 2], max_new_tokens=6) for i, ids in enumerate(random_ids(5, 3))]
    scheduler = GenerationScheduler(engine)
    futures = [scheduler.submit(good[0])]
    scheduler.step()  # one row running before the others join
    futures += [scheduler.submit(r) for r in [good[1], good[2], GenerationRequest(poison, max_new_tokens=6),
                                              good[3], good[4]]]
    while scheduler.busy:
        scheduler.step()
    with pytest.raises(RuntimeError, match="cannot be prefilled"):
        futures[3].result()
    for future, request in zip(futures[:3] + futures[4:], good, strict=True):
        assert future.result().token_ids == _own_generate(models[request.model], request)


def test_a_finetune_whose_decoding_forward_raises_fails_only_its_rows():
    """A fine-tune that breaks mid-generation (its last block raises from its third call on, after the blocks below
    it wrote their KV caches) fails its own rows; rows of the base and of another fine-tune decoded in the same steps
    finish like their own generate."""
    engine, models = _engine("llama", boundaries=(1, 2))
    broken, calls = engine.models["k1"].model, []  # the engine serves its own copy

    def breaking_block(module, args, kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("this fine-tune broke")

    get_layout(broken).blocks[-1].register_forward_pre_hook(breaking_block, with_kwargs=True)
    prompts = random_ids(6, seed=5)
    requests = [GenerationRequest(ids, model=[None, "k1", "k2"][i % 3], max_new_tokens=6)
                for i, ids in enumerate(prompts)]
    scheduler = GenerationScheduler(engine)
    futures = [scheduler.submit(r) for r in requests]
    while scheduler.busy:
        scheduler.step()
    assert len(calls) == 3  # prefill, one decoding step, then the failure: its rows left the batch
    for future, request in zip(futures, requests, strict=True):
        if request.model == "k1":
            with pytest.raises(RuntimeError, match="broke"):
                future.result()
        else:
            assert future.result().token_ids == _own_generate(models[request.model], request)


def test_a_row_that_breaks_its_models_prefill_fails_alone_in_a_mixed_batch():
    """A fine-tune whose prefill raises on one prompt, in a prefill batch that mixes models: that prompt's request
    fails, and the fine-tune's other rows prefilled with it (run again alone) and the base's rows finish."""
    engine, models = _engine("llama", boundaries=(2,))
    poison = [9, 9, 9]

    def refuse_poison(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and any(row[-3:].tolist() == poison for row in ids):
            raise RuntimeError("this prompt breaks the fine-tune")

    engine.models["k2"].model.register_forward_pre_hook(refuse_poison, with_kwargs=True)
    names = ["k2", None]
    good = [GenerationRequest(ids, model=names[i % 2], max_new_tokens=5) for i, ids in enumerate(random_ids(4, 6))]
    requests = [*good[:2], GenerationRequest([5, *poison], model="k2", max_new_tokens=5), *good[2:]]
    scheduler = GenerationScheduler(engine)
    futures = [scheduler.submit(r) for r in requests]
    while scheduler.busy:
        scheduler.step()
    with pytest.raises(RuntimeError, match="breaks the fine-tune"):
        futures[2].result()
    for future, request in zip(futures[:2] + futures[3:], good, strict=True):
        assert future.result().token_ids == _own_generate(models[request.model], request)


def test_a_short_request_waits_about_one_decoding_step_behind_a_long_generation():
    engine, _ = _engine("llama", boundaries=(2,))
    batcher = DynamicBatcher(engine, max_wait_ms=1)
    batcher.start()
    try:
        tokens: list[int] = []
        started = threading.Event()

        def on_token(token, logprob, result):
            tokens.append(token)
            started.set()

        long = batcher.submit("generate", [GenerationRequest([5, 6, 7], max_new_tokens=400)], on_token=on_token)[0]
        assert started.wait(30)
        before = batcher.scheduler.steps
        score = batcher.submit("score", [Request([5, 6, 7, 8])])[0]
        score.result(timeout=30)
        waited = batcher.scheduler.steps - before
        assert not long.done()  # the generation was still running ...
        assert waited <= 2  # ... and the score was answered within about one decoding step
        long.cancel()
    finally:
        batcher.stop()
    assert len(tokens) < 400  # the cancelled generation stopped


def test_the_engine_does_not_import_generation():
    source = Path(__file__).resolve().parents[1] / "hf_freeze" / "serving" / "engine.py"
    imported = {node.module for node in ast.walk(ast.parse(source.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"generation", "scheduler", "batching", "app"}


def _events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def test_the_stream_sends_the_tokens_of_the_non_streamed_result(monkeypatch):
    engine, models = _engine("llama", boundaries=(2,))
    body = {"inputs": random_ids(1, seed=12)[0], "model": "k2", "parameters": {"max_new_tokens": 9}}
    with serve_in_thread(create_app(engine, max_wait_ms=1)) as url:
        whole = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = _events(response)
        refused = httpx.post(f"{url}/generate_stream", json={**body, "inputs": [[5, 6], [7, 8]]}, timeout=60)
        assert httpx.post(f"{url}/generate_stream", json={**body, "parameters": {"seed": 2**70}}).status_code == 422

        def failing(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(RowSampler, "__call__", failing)  # sampling fails after the stream has started
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
            failed = _events(response)
    assert [e["token"]["id"] for e in events] == whole["token_ids"]
    assert whole["token_ids"] == _own_generate(models["k2"], GenerationRequest(body["inputs"], max_new_tokens=9))
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["details"] is None and e["generated_text"] is None for e in events[:-1])
    assert events[-1]["details"] == whole["details"]
    assert all(isinstance(e["token"]["logprob"], float) and e["token"]["logprob"] <= 0 for e in events)
    assert refused.status_code == 422 and "one input" in refused.json()["error"]
    assert len(failed) == 1 and failed[0]["error_type"] == "generation" and failed[0]["error"]
    assert "secret" not in failed[0]["error"]  # internals stay in the server's log


def test_a_client_that_leaves_the_stream_stops_its_row():
    engine, _ = _engine("llama", boundaries=(2,))
    app = create_app(engine, max_wait_ms=1)
    body = {"inputs": [5, 6, 7], "parameters": {"max_new_tokens": 500}}
    with serve_in_thread(app) as url:
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # the first token came: leave
        scheduler = app.state.batcher.scheduler
        deadline = time.monotonic() + 30
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not scheduler.busy  # the row stopped long before its 500 tokens
        assert scheduler.steps < 400


def test_a_client_that_leaves_generate_stops_its_row_and_is_counted_as_499():
    engine, _ = _engine("llama", boundaries=(2,))
    app = create_app(engine, max_wait_ms=1)
    with serve_in_thread(app) as url:
        with pytest.raises(httpx.TimeoutException):  # the client gives up long before 1,500 tokens
            httpx.post(f"{url}/generate", json={"inputs": [5, 6, 7], "parameters": {"max_new_tokens": 1500}},
                       timeout=0.5)
        scheduler = app.state.batcher.scheduler
        deadline = time.monotonic() + 30
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not scheduler.busy and scheduler.steps < 1400
        assert httpx.post(f"{url}/generate", json={"inputs": [5, 6], "parameters": {"max_new_tokens": 2}}).json()
        assert 'route="/generate",status="499"' in httpx.get(f"{url}/metrics").text


def test_serve_takes_a_dtype():
    import argparse

    from hf_freeze.serving.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve", "--base", "b"]).dtype == "float32"
    assert parser.parse_args(["serve", "--base", "b", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--base", "b", "--dtype", "int8"])
