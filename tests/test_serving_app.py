"""HTTP tests against a real uvicorn server on 127.0.0.1: answers equal each model's own forward, every bad request
gets its 4xx JSON error and the server keeps serving, and a bounded loopback load test answers every request."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from conftest import tiny_model
from serving_helpers import perturbed_finetune, random_ids, wait_until_healthy
from transformers import AutoTokenizer

from hf_freeze import assets, freeze_prefix
from hf_freeze.checkpoint import save_suffix
from hf_freeze.serving import BaseMismatchServingError, Request, ServingEngine, ServingError, schemas
from hf_freeze.serving.app import _encode, create_app, serve_in_thread
from hf_freeze.serving.cli import main

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def classifier_server():
    base = tiny_model("bert", "seq").eval()
    models = {"base": base, "k1": perturbed_finetune("bert", "seq", 1, seed=1, base=base),
              "k3": perturbed_finetune("bert", "seq", 3, seed=3, base=base)}
    engine = ServingEngine(base, cache_bytes=16 * 1024)  # small: the load test must evict
    for name in ("k1", "k3"):
        engine.add_model(name, models[name])
    app = create_app(engine, max_wait_ms=2, max_batch_tokens=512, max_client_batch_size=8, max_queue=256,
                     max_body_bytes=4096)
    with serve_in_thread(app) as url:
        yield url, engine, models


def _decoder_server(**limits):
    """A server of a decoder base and a fine-tune of it: (url, engine, models)."""
    base = tiny_model("llama", "causal").eval()
    models = {"base": base, "k2": perturbed_finetune("llama", "causal", 2, seed=2, base=base)}
    engine = ServingEngine(base)
    engine.add_model("k2", models["k2"])
    with serve_in_thread(create_app(engine, **limits)) as url:
        yield url, engine, models


@pytest.fixture(scope="module")
def decoder_server():
    yield from _decoder_server(max_wait_ms=2, max_queue=1)


@torch.no_grad()
def _probs(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)


def test_predict_over_http_equals_each_models_own_forward(classifier_server):
    url, _, models = classifier_server
    inputs = random_ids(4, 0)
    for name in ("k1", "k3", None):
        body = {"inputs": inputs} if name is None else {"inputs": inputs, "model": name}
        answer = httpx.post(f"{url}/predict", json=body).json()
        model = models[name or "base"]
        for ids, labels in zip(inputs, answer, strict=True):
            expected = _probs(model, ids)
            order = expected.argsort(descending=True)
            assert [x["label"] for x in labels] == [model.config.id2label[int(i)] for i in order]
            got = torch.tensor([x["score"] for x in sorted(labels, key=lambda x: x["label"])])
            torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    single = httpx.post(f"{url}/predict", json={"inputs": inputs[0], "model": "k1", "raw_scores": True}).json()
    logits = models["k1"](input_ids=torch.tensor([inputs[0]])).logits[0].detach()
    assert single[0]["score"] == pytest.approx(float(logits.max()), abs=TOL)


def test_score_and_generate_over_http(decoder_server):
    url, _, models = decoder_server
    ids = random_ids(1, 4)[0]
    scored = httpx.post(f"{url}/score", json={"inputs": ids, "model": "k2"}).json()
    logits = models["k2"](input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scored["logprobs"]), expected, rtol=TOL, atol=TOL)
    answer = httpx.post(f"{url}/generate", json={"inputs": ids, "model": "k2",
                                                 "parameters": {"max_new_tokens": 5}}).json()
    own = models["k2"].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert answer["token_ids"] == own[: len(answer["token_ids"])]
    assert answer["details"]["generated_tokens"] == len(answer["token_ids"])


def _error(response, status, error_type):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_type"] == error_type and body["error"]
    return body["error"]


def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(classifier_server, decoder_server):
    url, _, _ = classifier_server
    ok = {"inputs": [5, 6, 7], "model": "k1"}
    assert "k3" in _error(httpx.post(f"{url}/predict", json={**ok, "model": "nope"}), 404, "unknown_model")
    assert "cannot generate" in _error(httpx.post(f"{url}/generate", json=ok), 424, "wrong_task")
    assert "512 positions" in _error(httpx.post(f"{url}/predict", json={**ok, "inputs": [5] * 600}), 422,
                                     "validation")
    first_and_last = [5] * 300 + [6] * 300  # truncation keeps the first 512 tokens, not the last
    truncated = httpx.post(f"{url}/predict", json={**ok, "inputs": first_and_last, "truncate": True})
    assert truncated.status_code == 200
    assert truncated.json() == httpx.post(f"{url}/predict", json={**ok, "inputs": first_and_last[:512]}).json()
    assert truncated.json() != httpx.post(f"{url}/predict", json={**ok, "inputs": first_and_last[-512:]}).json()
    assert "truncate" in _error(httpx.post(f"{url}/predict", json={**ok, "truncate": "false"}), 422, "validation")
    assert "inputs" in _error(httpx.post(f"{url}/predict", json={**ok, "inputs": []}), 422, "validation")
    assert "vocabulary" in _error(httpx.post(f"{url}/predict", json={**ok, "inputs": [5, 10**6]}), 422,
                                  "validation")
    _error(httpx.post(f"{url}/predict", json={**ok, "inputs": [-1, 5]}), 422, "validation")
    assert "at most 8" in _error(httpx.post(f"{url}/predict", json={**ok, "inputs": [[5, 6]] * 9}), 413,
                                 "payload_too_large")
    _error(httpx.post(f"{url}/predict", json={**ok, "inputs": [[5, 6]] * 600}), 413, "payload_too_large")
    assert "Malformed JSON" in _error(httpx.post(f"{url}/predict", content=b'{"inputs": [1, 2'), 422, "validation")
    _error(httpx.post(f"{url}/predict", json=[1, 2]), 422, "validation")
    assert "tokenizer" in _error(httpx.post(f"{url}/predict", json={"inputs": "text"}), 422, "validation")
    _error(httpx.post(f"{url}/predict", json={"inputs": [[1.5, 2]]}), 422, "validation")
    dec_url = decoder_server[0]
    _error(httpx.post(f"{dec_url}/generate", json={"inputs": [5, 6], "parameters": {"max_new_tokens": 0}}), 422,
           "validation")
    positions = decoder_server[1].models["base"].max_input_tokens
    long_prompt = {"inputs": [7] * positions + [5, 6], "parameters": {"max_new_tokens": 3}}
    _error(httpx.post(f"{dec_url}/generate", json=long_prompt), 422, "validation")
    cut = httpx.post(f"{dec_url}/generate", json={**long_prompt, "truncate": True})
    assert cut.status_code == 200, cut.text  # the prompt's last positions - 3 tokens, ending in 5, 6
    same = {"inputs": [7] * (positions - 5) + [5, 6], "parameters": {"max_new_tokens": 3}}
    assert cut.json()["token_ids"] == httpx.post(f"{dec_url}/generate", json=same).json()["token_ids"]
    cut = httpx.post(f"{dec_url}/generate", json={"inputs": long_prompt["inputs"], "truncate": True})
    assert cut.status_code == 200 and len(cut.json()["token_ids"]) == 1  # no max_new_tokens: room for one is left
    _error(httpx.post(f"{dec_url}/generate", json={"inputs": [5, 6], "parameters": {"beams": 2}}), 422,
           "validation")
    for bad in ({"temperature": "hot", "do_sample": True}, {"top_p": 2.0, "do_sample": True}, {"seed": 1.5},
                {"stop_token_ids": "eos"}, {"do_sample": "yes"}):
        _error(httpx.post(f"{dec_url}/generate", json={"inputs": [5, 6], "parameters": bad}), 422, "validation")
    # the decoder server queues at most 1 input: a client batch of 2 is refused as overload
    assert "overloaded" in _error(httpx.post(f"{dec_url}/score", json={"inputs": [[5, 6], [7, 8]]}), 429,
                                  "overloaded")
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{dec_url}/health").status_code == 200
    assert httpx.post(f"{url}/predict", json=ok).status_code == 200
    assert httpx.post(f"{dec_url}/score", json={"inputs": [5, 6, 7]}).status_code == 200


def test_a_stopped_batcher_answers_503_instead_of_hanging():
    app = create_app(ServingEngine(tiny_model("bert", "seq").eval()))
    with serve_in_thread(app) as url:
        assert httpx.post(f"{url}/predict", json={"inputs": [5, 6]}).status_code == 200
        app.state.batcher.stop()
        assert "not running" in _error(httpx.post(f"{url}/predict", json={"inputs": [5, 6]}, timeout=10), 503,
                                       "unhealthy")
        assert httpx.get(f"{url}/health").status_code == 503
    with pytest.raises(ValueError, match="max_client_batch_size >= 1"):
        create_app(ServingEngine(tiny_model("bert", "seq").eval()), max_client_batch_size=0)


def test_info_and_metrics(classifier_server):
    url, engine, _ = classifier_server
    info = httpx.get(f"{url}/info").json()
    assert info["fingerprint"] == engine.fingerprint
    assert {m["name"]: m["boundary"] for m in info["models"]} == {"base": 4, "k1": 1, "k3": 3}
    assert all(m["tasks"] == ["predict"] for m in info["models"]) and info["limits"]["max_client_batch_size"] == 8
    ids = random_ids(1, 9)[0]
    for _ in range(2):
        httpx.post(f"{url}/predict", json={"inputs": ids, "model": "k3"})
    metrics = httpx.get(f"{url}/metrics").text
    assert 'hf_freeze_requests_total{route="/predict",status="200"}' in metrics
    assert "hf_freeze_batch_size_bucket" in metrics and "hf_freeze_request_duration_seconds_bucket" in metrics
    hits = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("hf_freeze_cache_hits"))
    assert hits >= 1 and hits == engine.cache.hits


def _bad_requests(classifier: str, generator: str) -> list[tuple[str, str, str, dict, int, str]]:
    """(url, method, path, httpx arguments, status, error_type) of requests that must fail alone."""
    as_json = {"content-type": "application/json"}
    return [
        (classifier, "POST", "/predict", {"json": {"inputs": [5, 6], "model": "nope"}}, 404, "unknown_model"),
        (classifier, "POST", "/predict", {"json": {"inputs": [5] * 600}}, 422, "validation"),
        (classifier, "POST", "/predict", {"json": {"inputs": [5, 10**6]}}, 422, "validation"),
        (classifier, "POST", "/predict", {"json": {"inputs": "text"}}, 422, "validation"),
        (classifier, "POST", "/predict", {"json": {"inputs": [[5, 6]] * 9}}, 413, "payload_too_large"),
        (classifier, "POST", "/predict", {"content": b'{"inputs": [1, 2', "headers": as_json}, 422, "validation"),
        (classifier, "POST", "/predict", {"content": b"[" * 4000, "headers": as_json}, 422, "validation"),
        (classifier, "POST", "/predict", {"content": b"x" * 5000, "headers": as_json}, 413, "payload_too_large"),
        (classifier, "GET", "/predict", {}, 405, "method_not_allowed"),
        (classifier, "POST", "/nope", {"json": {}}, 404, "not_found"),
        (classifier, "POST", "/generate", {"json": {"inputs": [5, 6]}}, 424, "wrong_task"),
        (generator, "POST", "/generate", {"json": {"inputs": [5, 6], "parameters": {"do_sample": True,
                                                                                      "seed": 2**70}}},
         422, "validation"),
        (generator, "POST", "/generate", {"json": {"inputs": [5, 6], "parameters": {"do_sample": True,
                                                                                      "temperature": 1e-300}}},
         422, "validation"),
        (generator, "POST", "/generate", {"json": {"inputs": [5] * 5000}}, 422, "validation"),
        (generator, "POST", "/generate_stream", {"json": {"inputs": [5, 6], "parameters": {"seed": 2**70}}},
         422, "validation"),
        (generator, "POST", "/generate_stream", {"json": {"inputs": [[5, 6], [7, 8]]}}, 422, "validation"),
        (generator, "POST", "/generate_stream", {"json": {"inputs": [5, 6], "model": "nope"}}, 404, "unknown_model"),
    ]


def test_loopback_load_mixing_good_and_bad_requests(classifier_server, generation_server):
    """2,000 requests from 32 concurrent clients on two servers: 5 in 8 good /predict, 1 in 8 good generations
    (/generate and /generate_stream in turn, continuously batched), 1 in 4 bad (each kind above in turn). Every
    good one gets its model's own answer (a stream: its events' tokens), every bad one its 4xx with the error body;
    the servers stay up, the cache within its budget, and the process's memory bounded."""
    url, engine, models = classifier_server
    gen_url, _, gen_models = generation_server
    inputs, prompts = random_ids(40, 11), random_ids(8, 31)
    names = ["k1", "k3", "base"]
    expected = {(n, i): _probs(models[n], ids) for n in names for i, ids in enumerate(inputs)}
    expected_tokens = {(n, i): _greedy(gen_models[n], ids, 4) for n in ("k2", "base") for i, ids in enumerate(prompts)}
    bad = _bad_requests(url, gen_url)
    total, clients = 2000, 32

    def plan(r: int) -> tuple[str, Any]:
        kind = r % 8
        if kind < 5:
            return "predict", (names[r % 3], (r * 7) % len(inputs))
        if kind == 5:
            return ["generate", "stream"][r // 8 % 4 // 2], (["k2", "base"][r // 8 % 2], r // 32 % len(prompts))
        return "bad", bad[(r // 8 * 2 + kind - 6) % len(bad)]

    answers: dict[int, httpx.Response] = {}

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        for r in range(worker, total, clients):
            kind, what = plan(r)
            if kind == "predict":
                answers[r] = await http.post(f"{url}/predict", json={"inputs": inputs[what[1]], "model": what[0]})
            elif kind in ("generate", "stream"):
                body = {"inputs": prompts[what[1]], "model": what[0], "parameters": {"max_new_tokens": 4}}
                route = "/generate" if kind == "generate" else "/generate_stream"
                answers[r] = await http.post(f"{gen_url}{route}", json=body)
            else:
                base_url, method, path, kwargs, _, _ = what
                answers[r] = await http.request(method, f"{base_url}{path}", **kwargs)

    async def load() -> None:
        # connections idle for 1 s are not reused: never one that uvicorn is closing (its keep-alive is 5 s)
        limits = httpx.Limits(max_connections=2 * clients, keepalive_expiry=1)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            await asyncio.gather(*(client(w, http) for w in range(clients)))

    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.monotonic()
    asyncio.run(load())
    elapsed = time.monotonic() - started
    growth = process.memory_info().rss - rss_before
    assert len(answers) == total
    for r, response in answers.items():
        kind, what = plan(r)
        if kind == "bad":
            _error(response, what[4], what[5])
            continue
        assert response.status_code == 200, response.text
        if kind == "predict":
            labels = response.json()
            got = torch.tensor([x["score"] for x in sorted(labels, key=lambda x: x["label"])])
            torch.testing.assert_close(got, expected[what], rtol=TOL, atol=TOL)
        elif kind == "generate":
            assert response.json()["token_ids"] == expected_tokens[what]
        else:
            events = [json.loads(line[len("data: "):]) for line in response.text.splitlines()
                      if line.startswith("data: ")]
            assert [e["token"]["id"] for e in events] == expected_tokens[what]
            assert events[-1]["details"]["generated_tokens"] == len(events)
    assert elapsed < 60, f"{total} requests took {elapsed:.1f} s"
    assert growth < 200 * 2**20, f"the process grew by {growth / 2**20:.0f} MiB"
    assert all(httpx.get(f"{u}/health").status_code == 200 for u in (url, gen_url))
    assert engine.cache.evictions > 0 and engine.cache.nbytes <= engine.cache.max_bytes
    assert engine.cache.hits > 0
    metrics = httpx.get(f"{url}/metrics").text
    sums = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("hf_freeze_batch_size_")}
    assert sums['hf_freeze_batch_size_sum{task="predict"}'] > sums['hf_freeze_batch_size_count{task="predict"}']
    print(f"load: {total} requests in {elapsed:.1f} s, RSS +{growth / 2**20:.0f} MiB")


def _serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hf_freeze.serving.cli", "serve", *args]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_cli_serves_suffix_checkpoints_and_refuses_one_of_another_base(tmp_path, capsys):
    base = tiny_model("bert", "seq").eval()
    base.save_pretrained(tmp_path / "base")
    finetune = perturbed_finetune("bert", "seq", 2, seed=5, base=base)
    save_suffix(finetune, tmp_path / "ft", base_model=str(tmp_path / "base"))
    stranger = tiny_model("bert", "seq", seed=1)
    freeze_prefix(stranger, 2)
    save_suffix(stranger, tmp_path / "stranger")

    refused = subprocess.run(_serve_command("--base", str(tmp_path / "base"), "--model", f"x={tmp_path / 'stranger'}",
                                            "--port", str(_free_port())),
                             capture_output=True, text=True, env=_env(), timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert str(tmp_path / "stranger") in refused.stderr
    fingerprints = set(re.findall(r"\b[0-9a-f]{32}\b", refused.stderr))
    assert len(fingerprints) >= 2, refused.stderr  # both fingerprints named

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "hf_freeze.json").write_text("{")
    assert main(["serve", "--base", str(tmp_path / "base"), "--model", f"b={tmp_path / 'broken'}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err

    port = _free_port()
    process = subprocess.Popen(_serve_command("--base", str(tmp_path / "base"), "--model", f"ft={tmp_path / 'ft'}",
                                              "--port", str(port)), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, url)
        info = httpx.get(f"{url}/info").json()
        assert {m["name"]: m["boundary"] for m in info["models"]} == {"base": 4, "ft": 2}
        ids = [5, 9, 33, 2]
        answer = httpx.post(f"{url}/predict", json={"inputs": ids, "model": "ft", "raw_scores": True}).json()
        got = torch.tensor([x["score"] for x in sorted(answer, key=lambda x: x["label"])])
        with torch.no_grad():
            expected = finetune(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    finally:
        process.terminate()
        process.wait(30)


def test_load_model_shares_the_base_tensors_and_detects_the_boundary_of_plain_folders(tmp_path):
    base = tiny_model("bert", "seq").eval()
    engine = ServingEngine(base)
    finetune = perturbed_finetune("bert", "seq", 2, seed=5, base=base)
    save_suffix(finetune, tmp_path / "suffix")
    finetune.save_pretrained(tmp_path / "plain")  # no hf_freeze metadata: the shared units are found by digests
    served = engine.load_model("suffix", tmp_path / "suffix")
    plain = engine.load_model("plain", tmp_path / "plain")
    assert served.boundary == plain.boundary == 2
    embedding = served.model.get_input_embeddings().weight
    assert embedding.data_ptr() == engine.base.get_input_embeddings().weight.data_ptr()  # one prefix in memory
    ids = random_ids(4, 2)
    answers = engine.predict([Request(i, model=m) for m in ("suffix", "plain") for i in ids])
    with torch.no_grad():
        for answer, i in zip(answers, ids + ids, strict=True):
            torch.testing.assert_close(answer, finetune(input_ids=torch.tensor([i])).logits[0], rtol=TOL, atol=TOL)
    stranger = tiny_model("bert", "seq", seed=1)
    stranger.save_pretrained(tmp_path / "stranger")
    with pytest.raises(BaseMismatchServingError, match="stranger.*not fine-tuned from this base"):
        engine.load_model("stranger", tmp_path / "stranger")


@pytest.fixture(scope="module")
def text_server():
    """A tiny BERT classifier over the packaged MiniLM tokenizer's vocabulary, with 16 positions."""
    import transformers as T

    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("minilm"))
    config = T.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=37, max_position_embeddings=16, num_labels=2,
                          initializer_range=0.5)  # large weights: every token moves the logits
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config).eval()
    with serve_in_thread(create_app(ServingEngine(model), tokenizer=tokenizer, max_wait_ms=1)) as url:
        yield url, model, tokenizer


def test_text_is_truncated_at_its_end_keeping_the_closing_special_token(text_server):
    url, model, tokenizer = text_server
    text = "the first words differ from " + "the last ones " * 10 + "at the very end"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 16
    _error(httpx.post(f"{url}/predict", json={"inputs": text}), 422, "validation")
    answer = httpx.post(f"{url}/predict", json={"inputs": text, "truncate": True, "raw_scores": True}).json()
    kept = ids[:15] + [tokenizer.sep_token_id]  # [CLS] the first words ... [SEP]
    with torch.no_grad():
        expected, cut, last = (model(input_ids=torch.tensor([i])).logits[0]
                               for i in (kept, ids[:16], ids[:1] + ids[-15:]))
    got = torch.tensor([x["score"] for x in sorted(answer, key=lambda x: x["label"])])
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    assert not torch.allclose(got, cut, atol=1e-3) and not torch.allclose(got, last, atol=1e-3)


@pytest.mark.parametrize("text", ["", "   ", ["fine", ""], ["fine", " "]])
def test_an_empty_text_is_a_422_not_a_prediction(text_server, text):
    url = text_server[0]
    assert "empty" in _error(httpx.post(f"{url}/predict", json={"inputs": text}), 422, "validation")


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_an_empty_text_is_refused_whatever_the_tokenizer_adds(name):
    """An encoder's tokenizer turns "" into [CLS] [SEP], a Llama one into <s>: neither is an input."""
    tokenizer = AutoTokenizer.from_pretrained(assets.model_path(name))
    for text in ("", " " if name == "minilm" else ""):
        with pytest.raises(ServingError, match="empty"):
            _encode(tokenizer, text, None, keep_last=False)
    ids = tokenizer("a text")["input_ids"]
    assert _encode(tokenizer, "a text", None, keep_last=False) == ids
    assert _encode(tokenizer, "a text " * 20, 6, keep_last=True)[-1] == tokenizer("a text " * 20)["input_ids"][-1]


@pytest.fixture(scope="module")
def generation_server():
    """The decoder server; batches wait 50 ms so that concurrent requests share them."""
    yield from _decoder_server(max_wait_ms=50)


def _greedy(model, ids, max_new_tokens):
    own = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return own[: own.index(eos) + 1] if eos in own else own


_BAD_GENERATIONS = {  # each passed validation once, or crashed its batch, or both
    "seed over uint64": {"parameters": {"do_sample": True, "seed": 2**70}},
    "negative seed": {"parameters": {"do_sample": True, "seed": -1}},
    "tiny temperature": {"parameters": {"do_sample": True, "temperature": 1e-300}},
    "zero temperature": {"parameters": {"temperature": 0}},
    "top_p 0": {"parameters": {"do_sample": True, "top_p": 0}},
    "negative top_k": {"parameters": {"do_sample": True, "top_k": -1}},
    "huge max_new_tokens": {"parameters": {"max_new_tokens": 10**12}},
    "negative stop id": {"parameters": {"stop_token_ids": [-1]}},
    "token outside the vocabulary": {"inputs": [5, 10**6]},
    "huge token id": {"inputs": [5, 2**70]},
    "no tokens": {"inputs": []},
    "too long": {"inputs": [5] * 5000},
}


@pytest.mark.parametrize("bad", list(_BAD_GENERATIONS))
def test_good_generations_batched_with_a_bad_one_get_their_answers(generation_server, bad):
    url, _, models = generation_server
    prompts = random_ids(6, 21)
    good = [{"inputs": ids, "model": ["k2", None][i % 2], "parameters": {"max_new_tokens": 4}}
            for i, ids in enumerate(prompts)]
    bad_body = {"inputs": [5, 6, 7], **_BAD_GENERATIONS[bad]}

    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(http.post("/generate", json=body) for body in [*good[:3], bad_body,
                                                                                           *good[3:]]))

    responses = asyncio.run(send())
    _error(responses[3], 422, "validation")
    for body, response in zip(good, responses[:3] + responses[4:], strict=True):
        assert response.status_code == 200, response.text
        model = models[body["model"] or "base"]
        assert response.json()["token_ids"] == _greedy(model, body["inputs"], 4)


@pytest.mark.parametrize("stage", ["parse", "tokenize"])
def test_health_answers_while_a_megabyte_body_is_parsed_and_tokenized(stage, monkeypatch):
    """The body's parsing and validation, then its tokenization, are held until /health has answered: were either on
    the event loop, /health would wait for it."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        entered.set()
        release.wait(30)

    class SlowTokenizer:
        def __call__(self, text, **kwargs):
            if stage == "tokenize":
                hold()
            return {"input_ids": [5, 6, 7], "special_tokens_mask": [0, 0, 0]}

    if stage == "parse":
        parse = schemas.PredictBody.model_validate_json
        monkeypatch.setattr(schemas.PredictBody, "model_validate_json", lambda raw: (hold(), parse(raw))[1])
    app = create_app(ServingEngine(tiny_model("bert", "seq").eval()), tokenizer=SlowTokenizer())
    with serve_in_thread(app) as url:
        text = "word " * 200_000  # 1 MB
        pool = ThreadPoolExecutor(1)
        pending = pool.submit(httpx.post, f"{url}/predict", json={"inputs": text}, timeout=60)
        try:
            assert entered.wait(30)
            started = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.monotonic() - started < 2
        finally:
            release.set()
        assert pending.result().status_code == 200
        pool.shutdown()
