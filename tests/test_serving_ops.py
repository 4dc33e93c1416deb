"""Serving operations, live on 127.0.0.1: fine-tunes loaded and removed while serving (admin token), one input
fanned out to several fine-tunes with the prefix run once, per-model labels and per-phase timings in /metrics,
and a load test that hot-loads and removes a fine-tune while 32 clients send requests."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
import torch
from conftest import tiny_model
from fastapi.testclient import TestClient
from serving_helpers import perturbed_finetune, random_ids

from hf_freeze import freeze_prefix
from hf_freeze.checkpoint import SUFFIX_WEIGHTS_NAME, save_suffix
from hf_freeze.serving import Request, ServingEngine
from hf_freeze.serving.admin import TOKEN_ENV, admin_token
from hf_freeze.serving.app import create_app, serve_in_thread
from hf_freeze.serving.batching import DynamicBatcher
from hf_freeze.serving.metrics import PHASES
from hf_freeze.serving.requests import GenerationRequest, UnknownModelError
from hf_freeze.serving.scheduler import GenerationScheduler

TOL = 1e-5
TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A classifier base serving `k1` (in memory), with an admin token, and folders to hot-load: `hot` (k = 2) and
    `hot3` (k = 3) of this base, `stranger` (another base), `corrupt` (flipped bytes in its suffix)."""
    root = tmp_path_factory.mktemp("ops")
    base = tiny_model("bert", "seq").eval()
    models = {"base": base, "k1": perturbed_finetune("bert", "seq", 1, seed=1, base=base),
              "hot": perturbed_finetune("bert", "seq", 2, seed=2, base=base),
              "hot3": perturbed_finetune("bert", "seq", 3, seed=3, base=base)}
    for name in ("hot", "hot3"):
        save_suffix(models[name], root / name)
    save_suffix(models["hot"], root / "corrupt")
    weights = root / "corrupt" / SUFFIX_WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-64:-60] = bytes(b ^ 0xFF for b in data[-64:-60])
    weights.write_bytes(bytes(data))
    stranger = tiny_model("bert", "seq", seed=7)
    freeze_prefix(stranger, 2)
    save_suffix(stranger, root / "stranger")
    engine = ServingEngine(base, cache_bytes=0)  # no cache: every request runs the prefix (counted below)
    engine.add_model("k1", models["k1"])
    app = create_app(engine, max_wait_ms=2, max_batch_tokens=1024, max_queue=512, admin_token=TOKEN)
    with serve_in_thread(app) as url:
        yield url, engine, models, root


@torch.no_grad()
def _probs(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)


def _scores(labels):
    return torch.tensor([x["score"] for x in sorted(labels, key=lambda x: x["label"])])


def _error(response, status, error_type, match=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    if match:
        assert re.search(match, body["error"]), body["error"]


def test_admin_routes_are_off_without_a_token(monkeypatch):
    engine = ServingEngine(tiny_model("bert", "seq"))
    client = TestClient(create_app(engine))
    response = client.post("/admin/models", json={"name": "x", "path": "/tmp"}, headers=AUTH)
    _error(response, 404, "not_found", "--admin-token")
    _error(client.delete("/admin/models/x", headers=AUTH), 404, "not_found", TOKEN_ENV)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert admin_token(None) == "from-env" and admin_token("given") == "given"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert admin_token(None) is None


def test_hot_load_and_remove_with_the_admin_token(server):
    url, engine, models, root = server
    ids = random_ids(3, 5)
    body = {"name": "hot", "path": str(root / "hot")}
    _error(httpx.post(f"{url}/admin/models", json=body), 401, "unauthorized", "Bearer")
    _error(httpx.post(f"{url}/admin/models", json=body, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    _error(httpx.post(f"{url}/admin/models", json={"name": 5}), 401, "unauthorized")  # the token before the body
    huge = json.dumps({"name": "x", "path": "p" * (2 << 20)})  # over the server's 1 MiB bound on every body
    _error(httpx.post(f"{url}/admin/models", content=huge, headers={**AUTH, "Content-Type": "application/json"}),
           413, "payload_too_large")
    _error(httpx.post(f"{url}/predict", json={"inputs": ids[0], "model": "hot"}), 404, "unknown_model")

    loaded = httpx.post(f"{url}/admin/models", json=body, headers=AUTH)
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["name"] == "hot" and loaded.json()["boundary"] == 2 and loaded.json()["shares_prefix"]
    assert "hot" in [m["name"] for m in httpx.get(f"{url}/info").json()["models"]]
    for x in ids:
        answer = httpx.post(f"{url}/predict", json={"inputs": x, "model": "hot"})
        torch.testing.assert_close(_scores(answer.json()), _probs(models["hot"], x), rtol=TOL, atol=TOL)

    # refused, each with its 4xx, and the server keeps serving
    _error(httpx.post(f"{url}/admin/models", json=body, headers=AUTH), 409, "conflict", "already served")
    _error(httpx.post(f"{url}/admin/models", json={"name": "s", "path": str(root / "stranger")}, headers=AUTH),
           409, "conflict", "stranger.*fingerprint|fingerprint.*stranger")
    _error(httpx.post(f"{url}/admin/models", json={"name": "c", "path": str(root / "corrupt")}, headers=AUTH),
           422, "bad_model_source", f"{SUFFIX_WEIGHTS_NAME} is corrupt")
    _error(httpx.post(f"{url}/admin/models", json={"name": "m", "path": str(root / "missing")}, headers=AUTH),
           422, "bad_model_source", "does not exist")
    _error(httpx.post(f"{url}/admin/models", json={"name": "bad name!", "path": str(root / "hot")}, headers=AUTH),
           422, "validation", "name")
    _error(httpx.delete(f"{url}/admin/models/base", headers=AUTH), 409, "conflict", "base")
    assert sorted(engine.models) == ["base", "hot", "k1"]

    assert httpx.delete(f"{url}/admin/models/hot", headers=AUTH).json() == {"removed": "hot"}
    _error(httpx.post(f"{url}/predict", json={"inputs": ids[0], "model": "hot"}), 404, "unknown_model")
    _error(httpx.delete(f"{url}/admin/models/hot", headers=AUTH), 404, "unknown_model")

    # vLLM's route names and payloads
    lora = {"lora_name": "hot3", "lora_path": str(root / "hot3")}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=lora, headers=AUTH).status_code == 201
    answer = httpx.post(f"{url}/predict", json={"inputs": ids[1], "model": "hot3"})
    torch.testing.assert_close(_scores(answer.json()), _probs(models["hot3"], ids[1]), rtol=TOL, atol=TOL)
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot3"}, headers=AUTH)
    assert unloaded.json() == {"removed": "hot3"}
    assert sorted(engine.models) == ["base", "k1"]


def test_fanout_equals_separate_calls_and_runs_the_prefix_once(server):
    url, engine, models, root = server
    rows: list[int] = []

    def count(module, args, kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    inputs = random_ids(2, 77, min_len=9, max_len=9)  # one length: one prefix forward for both
    for name in engine.models:  # each model's first batch learns its blocks' output format (one tiny forward)
        assert httpx.post(f"{url}/predict", json={"inputs": [5, 6, 7], "model": name}).status_code == 200
    handle = engine.base_layout.blocks[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        fanned = httpx.post(f"{url}/predict", json={"inputs": inputs, "models": ["k1", "base"]})
        assert rows == [2], rows  # the base's first block ran once, on each distinct input once
        rows.clear()
        everything = httpx.post(f"{url}/predict", json={"inputs": inputs, "models": "*", "raw_scores": True})
        assert rows == [2], rows
    finally:
        handle.remove()
    assert fanned.status_code == 200, fanned.text
    assert list(fanned.json()) == ["k1", "base"]
    for name in ("k1", "base"):
        alone = httpx.post(f"{url}/predict", json={"inputs": inputs, "model": name}).json()
        for got, want in zip(fanned.json()[name], alone):
            torch.testing.assert_close(_scores(got), _scores(want), rtol=TOL, atol=TOL)
        for x, labels in zip(inputs, alone):
            torch.testing.assert_close(_scores(labels), _probs(models[name], x), rtol=TOL, atol=TOL)
    assert sorted(everything.json()) == sorted(engine.models)
    raw = httpx.post(f"{url}/predict", json={"inputs": inputs[0], "model": "k1", "raw_scores": True}).json()
    torch.testing.assert_close(_scores(everything.json()["k1"][0]), _scores(raw), rtol=TOL, atol=TOL)

    _error(httpx.post(f"{url}/predict", json={"inputs": inputs, "models": ["k1", "nope"]}), 404, "unknown_model")
    _error(httpx.post(f"{url}/predict", json={"inputs": inputs, "models": ["k1"], "model": "k1"}), 422,
           "validation", "either")
    _error(httpx.post(f"{url}/predict", json={"inputs": inputs, "models": []}), 422, "validation", "models")
    _error(httpx.post(f"{url}/predict", json={"inputs": inputs, "models": "all"}), 422, "validation", "models")


def test_fanout_of_embed_and_score_equals_separate_calls():
    base = tiny_model("llama", "causal").eval()
    engine = ServingEngine(base)
    engine.add_model("k2", perturbed_finetune("llama", "causal", 2, seed=2, base=base))
    embedder = ServingEngine(tiny_model("bert", "base"))
    embedder.add_model("e2", perturbed_finetune("bert", "base", 2, seed=4, base=embedder.base))
    inputs = random_ids(3, 9)
    for eng, route in ((engine, "/score"), (embedder, "/embed")):
        with TestClient(create_app(eng)) as client:
            fanned = client.post(route, json={"inputs": inputs, "models": "*"})
            assert fanned.status_code == 200, fanned.text
            assert list(fanned.json()) == list(eng.models)
            for name in eng.models:
                alone = client.post(route, json={"inputs": inputs, "model": name}).json()
                if route == "/score":
                    assert [a["token_ids"] for a in fanned.json()[name]] == [a["token_ids"] for a in alone]
                    fanned_values, alone_values = ([a["logprobs"] for a in x] for x in (fanned.json()[name], alone))
                else:
                    fanned_values, alone_values = fanned.json()[name], alone
                for got, want in zip(fanned_values, alone_values):
                    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=TOL, atol=TOL)


def _samples(metrics: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line and not line.startswith("#")}


def test_metrics_carry_the_model_as_a_label_and_time_each_phase():
    base = tiny_model("bert", "seq").eval()
    engine = ServingEngine(base)
    engine.add_model("k1", perturbed_finetune("bert", "seq", 1, seed=1, base=base))
    engine.add_model("k3", perturbed_finetune("bert", "seq", 3, seed=3, base=base))
    inputs = random_ids(2, 3)
    with TestClient(create_app(engine)) as client:
        for name in ("k1", "k3", "k3"):
            assert client.post("/predict", json={"inputs": inputs, "model": name}).status_code == 200
        assert client.post("/predict", json={"inputs": inputs, "model": "nope"}).status_code == 404
        samples = _samples(client.get("/metrics").text)
        tokens = sum(map(len, inputs))
        assert samples['hf_freeze_model_requests_total{model="k1",route="/predict",status="200"}'] == 1
        assert samples['hf_freeze_model_requests_total{model="k3",route="/predict",status="200"}'] == 2
        assert samples['hf_freeze_model_request_duration_seconds_count{model="k3",route="/predict"}'] == 2
        assert samples['hf_freeze_model_input_tokens_total{model="k3",task="predict"}'] == 2 * tokens
        assert samples['hf_freeze_model_cache_misses_total{model="k3"}'] == 2  # then cached
        assert samples['hf_freeze_model_cache_hits_total{model="k3"}'] == 2
        assert not any('model="nope"' in key for key in samples)  # only served names
        assert not any('model="base"' in key and "requests_total" in key for key in samples)
        for phase in PHASES:
            count = samples[f'hf_freeze_request_phase_seconds_count{{phase="{phase}"}}']
            assert count >= 3, (phase, count)  # per request (tokenize, serialize) or per input (the others)
        engine.remove_model("k1")
        client.app.state.metrics.forget("k1")
        assert 'model="k1"' not in client.get("/metrics").text


def test_generated_tokens_are_counted_per_model_streamed_or_not():
    base = tiny_model("llama", "causal").eval()
    engine = ServingEngine(base)
    engine.add_model("k2", perturbed_finetune("llama", "causal", 2, seed=2, base=base))
    prompts = random_ids(3, 4)
    with TestClient(create_app(engine)) as client:
        answers = client.post("/generate", json={"inputs": prompts[:2], "model": "k2",
                                                 "parameters": {"max_new_tokens": 5}}).json()
        with client.stream("POST", "/generate_stream", json={"inputs": prompts[2], "model": "k2",
                                                              "parameters": {"max_new_tokens": 7}}) as stream:
            streamed = [line for line in stream.iter_lines() if line.startswith("data:")]
        completion = client.post("/v1/completions", json={"prompt": prompts[0], "model": "k2", "max_tokens": 4}).json()
        samples = _samples(client.get("/metrics").text)
    generated = sum(len(a["token_ids"]) for a in answers) + len(streamed) + completion["usage"]["completion_tokens"]
    assert samples['hf_freeze_model_generated_tokens_total{model="k2"}'] == generated
    prompted = sum(map(len, prompts)) + len(prompts[0])  # each prompt once, the completion's included
    assert samples['hf_freeze_model_input_tokens_total{model="k2",task="generate"}'] == prompted


def test_hot_load_and_remove_under_load(server):
    """32 clients send 384 requests to `k1`, the base and `hot2` while `hot2` is loaded and removed again and
    again (and a fine-tune of another base is refused meanwhile): every answer equals its model's own forward, or
    for `hot2` while it is not served, is a clean 404."""
    url, engine, models, root = server
    inputs = random_ids(12, 21)
    names = ["k1", "base", "hot2", "hot2"]
    expected = {(n, i): _probs(models["hot" if n == "hot2" else n], x) for n in set(names)
                for i, x in enumerate(inputs)}
    total, clients = 384, 32
    answers: dict[int, httpx.Response] = {}
    admin: list[httpx.Response] = []
    done = asyncio.Event()

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        for r in range(worker, total, clients):
            name, i = names[r % len(names)], r * 5 % len(inputs)
            answers[r] = await http.post(f"{url}/predict", json={"inputs": inputs[i], "model": name})

    async def operator(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            admin.append(await http.post(f"{url}/admin/models", json={"name": "hot2", "path": str(root / "hot")},
                                         headers=AUTH))
            await asyncio.sleep(0.05)
            admin.append(await http.post(f"{url}/admin/models", json={"name": "x", "path": str(root / "stranger")},
                                         headers=AUTH))
            admin.append(await http.delete(f"{url}/admin/models/hot2", headers=AUTH))
            await asyncio.sleep(0.02)

    async def load() -> None:
        limits = httpx.Limits(max_connections=2 * clients + 2, keepalive_expiry=1)
        async with httpx.AsyncClient(limits=limits, timeout=30) as http:
            ops = asyncio.create_task(operator(http))
            await asyncio.gather(*(client(w, http) for w in range(clients)))
            done.set()
            await ops

    started = time.monotonic()
    asyncio.run(load())
    elapsed = time.monotonic() - started
    assert len(answers) == total
    served = {"hot2": 0, "removed": 0}
    for r, response in answers.items():
        name, i = names[r % len(names)], r * 5 % len(inputs)
        if name == "hot2" and response.status_code == 404:
            _error(response, 404, "unknown_model", "hot2")
            served["removed"] += 1
            continue
        assert response.status_code == 200, (name, response.text)
        torch.testing.assert_close(_scores(response.json()), expected[(name, i)], rtol=TOL, atol=TOL)
        served["hot2"] += name == "hot2"
    statuses = [a.status_code for a in admin]
    assert statuses.count(201) >= 2 and statuses.count(409) >= 2, statuses
    assert set(statuses) <= {200, 201, 409}, [a.text for a in admin]
    assert served["hot2"] > 0 and served["removed"] > 0, served
    assert elapsed < 30, f"{total} requests took {elapsed:.1f} s"
    assert "hot2" not in engine.models
    print(f"hot-load: {total} requests in {elapsed:.1f} s, {statuses.count(201)} loads, {served}")


def test_requests_queued_for_a_model_removed_meanwhile_get_a_404_and_spare_their_batch():
    """Requests validated and queued before their model was removed: a clean `UnknownModelError` (404) for them,
    and the other requests of their batch answered."""
    base = tiny_model("bert", "seq").eval()
    k2 = perturbed_finetune("bert", "seq", 2, seed=2, base=base)
    engine = ServingEngine(base)
    engine.add_model("k2", k2)
    engine.add_model("gone", perturbed_finetune("bert", "seq", 1, seed=1, base=base))
    batcher = DynamicBatcher(engine, max_wait_ms=50)
    inputs = random_ids(4, 8)
    futures = batcher.submit("predict", [Request(x, model=n) for x in inputs for n in ("k2", "gone")])
    engine.remove_model("gone")  # after validation, before the batch runs
    batcher.start()
    try:
        for j, future in enumerate(futures):
            if j % 2:
                with pytest.raises(UnknownModelError, match="Unknown model 'gone'"):
                    future.result(timeout=30)
            else:
                torch.testing.assert_close(future.result(timeout=30).softmax(-1), _probs(k2, inputs[j // 2]),
                                           rtol=TOL, atol=TOL)
    finally:
        batcher.stop()
    assert not engine.cache_counts.get("gone")


def test_generations_waiting_for_a_model_removed_meanwhile_get_a_404_and_running_ones_finish():
    base = tiny_model("llama", "causal").eval()
    engine = ServingEngine(base)
    for name, seed in (("k2", 2), ("gone", 3), ("running", 4)):
        engine.add_model(name, perturbed_finetune("llama", "causal", 2, seed=seed, base=base))
    scheduler = GenerationScheduler(engine)
    prompt = random_ids(1, 4)[0]
    expected = scheduler.generate([GenerationRequest(prompt, model="running", max_new_tokens=6)])[0].token_ids
    running = scheduler.submit(GenerationRequest(prompt, model="running", max_new_tokens=6))
    scheduler.step()  # "running" is decoding
    waiting = [scheduler.submit(GenerationRequest(prompt, model=name, max_new_tokens=3)) for name in ("gone", "k2")]
    engine.remove_model("gone")
    engine.remove_model("running")
    while scheduler.busy:
        scheduler.step()
    with pytest.raises(UnknownModelError, match="Unknown model 'gone'"):
        waiting[0].result(timeout=0)
    assert len(waiting[1].result(timeout=0).token_ids) == 3
    assert running.result(timeout=0).token_ids == expected


def test_loading_reads_files_outside_the_engine_lock(tmp_path, monkeypatch):
    """While a load hashes its files (made slow here), other requests are answered at once."""
    import threading

    import hf_freeze.checkpoint as checkpoint

    base = tiny_model("bert", "seq").eval()
    save_suffix(perturbed_finetune("bert", "seq", 2, seed=2, base=base), tmp_path / "ft")
    engine = ServingEngine(base)
    hashing = threading.Event()
    original = checkpoint.verify_checksums

    def slow(*args, **kwargs):
        hashing.set()
        time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "verify_checksums", slow)
    loader = threading.Thread(target=engine.load_model, args=("ft", tmp_path / "ft"))
    loader.start()
    assert hashing.wait(10)
    started = time.monotonic()
    engine.predict([Request([5, 6, 7])])
    waited = time.monotonic() - started
    loader.join(30)
    assert waited < 1.0, f"a request waited {waited:.1f} s behind a load"
    assert "ft" in engine.models
