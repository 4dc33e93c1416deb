"""The HTTP schemas (`serving/schemas.py`) against a real uvicorn server on 127.0.0.1: the routes are fuzzed from
their own OpenAPI schema (schemathesis) with no 5xx and the server up after; every 4xx and 5xx has the one error
body; nesting, size and content type are bounded; a 500 is counted in /metrics and says nothing internal."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from serving_helpers import perturb_suffix
from transformers import AutoTokenizer

from hf_freeze import assets
from hf_freeze.serving import ServingEngine
from hf_freeze.serving.app import create_app, serve_in_thread

MAX_EXAMPLES = 30  # per route; a few seconds each on a tiny model


def _llama(head, tokenizer, pad_token_id=0):
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=37, max_position_embeddings=48,
                           pad_token_id=pad_token_id, eos_token_id=tokenizer.sep_token_id, num_labels=2)
    torch.manual_seed(0)
    return head(config).eval()


@pytest.fixture(scope="module")
def fuzz_server():
    """One base (a causal LM: score, generate) with a classifier and an embedding model of it, and a tokenizer,
    so that text inputs, truncation and every task are reached."""
    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("minilm"))
    base = _llama(T.LlamaForCausalLM, tokenizer)
    engine = ServingEngine(base, cache_bytes=1 << 20)
    for name, head, pad in (("clf", T.LlamaForSequenceClassification, None), ("emb", T.LlamaModel, 0)):
        model = _llama(head, tokenizer, pad_token_id=pad)
        model.base_model.load_state_dict(base.base_model.state_dict())
        engine.add_model(name, perturb_suffix(model, 1, seed=1))
    app = create_app(engine, tokenizer=tokenizer, max_wait_ms=1, max_client_batch_size=4, max_body_bytes=1 << 16)
    with serve_in_thread(app) as url:
        yield url


_MODEL_OF_ROUTE = {"/predict": "clf", "/embed": "emb", "/v1/embeddings": "emb", "/v1/completions": "base"}
_CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
           schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]


def test_fuzzed_requests_get_no_5xx_and_conform_to_the_schema(fuzz_server):
    """Every route, `MAX_EXAMPLES` bodies each generated from /openapi.json (valid ones, and schemathesis's edge
    cases of each bound): never a 5xx; 4xx answers carry the error body; 2xx answers match the response schema
    (each server-sent event of /generate_stream its `StreamEvent`)."""
    api = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/embed", "/score", "/generate", "/generate_stream",
                                              "/health", "/info", "/", "/models/{model}", "/v1/models",
                                              "/v1/embeddings", "/v1/completions", "/v1/chat/completions"}
    statuses: dict[str, list[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            body = case.body if isinstance(case.body, dict) else None
            if body is not None and "model" not in body and case.path in _MODEL_OF_ROUTE:
                body["model"] = _MODEL_OF_ROUTE[case.path]  # bodies without a name reach a model that can do the task
            response = case.call(base_url=fuzz_server, timeout=30)
            statuses.setdefault(case.path, []).append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                error = response.json()
                assert set(error) == {"error", "error_type"} and error["error"], error
            case.validate_response(response, checks=_CHECKS)

        check()
    for path in ("/predict", "/generate", "/generate_stream"):  # both kinds reached (stream events checked too)
        assert 200 in statuses[path] and any(400 <= s < 500 for s in statuses[path]), (path, statuses[path])


def test_the_server_is_up_after_fuzzing(fuzz_server):
    assert httpx.get(f"{fuzz_server}/health").json() == {"status": "ok"}
    answer = httpx.post(f"{fuzz_server}/predict", json={"inputs": "a fine film", "model": "clf"})
    assert answer.status_code == 200 and len(answer.json()) == 2


def _error(response, status, error_type):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type and body["error"], body
    return body["error"]


def test_every_error_has_the_error_body(fuzz_server):
    url = fuzz_server
    assert "/docs" in _error(httpx.get(f"{url}/nope"), 404, "not_found")
    assert "POST" in _error(httpx.get(f"{url}/predict"), 405, "method_not_allowed")
    _error(httpx.post(f"{url}/health"), 405, "method_not_allowed")
    assert "at most 65536" in _error(httpx.post(f"{url}/score", json={"inputs": [5] * 40_000}), 413,
                                     "payload_too_large")
    assert "at most 4" in _error(httpx.post(f"{url}/score", json={"inputs": [[5, 6]] * 5}), 413,
                                 "payload_too_large")
    _error(httpx.post(f"{url}/score", content=b'{"inputs": [5, 6]}', headers={"content-type": "text/plain"}), 415,
           "unsupported_media_type")
    nested = httpx.post(f"{url}/score", content=b"[" * 60_000, headers={"content-type": "application/json"})
    assert "Malformed JSON" in _error(nested, 422, "validation")
    deep = httpx.post(f"{url}/score", content=b'{"inputs": ' + b"[" * 150 + b"]" * 150 + b"}",
                      headers={"content-type": "application/json"})
    assert "inputs" in _error(deep, 422, "validation")
    assert "seed" in _error(httpx.post(f"{url}/generate", json={"inputs": [5], "parameters": {"seed": 2**64}}), 422,
                            "validation")
    assert "beams" in _error(httpx.post(f"{url}/generate", json={"inputs": [5], "parameters": {"beams": 2}}), 422,
                             "validation")
    assert "model" in _error(httpx.post(f"{url}/score", json={"inputs": [5, 6], "model": 3}), 422, "validation")
    openapi = httpx.get(f"{url}/openapi.json").json()
    seed = openapi["components"]["schemas"]["GenerateParameters"]["properties"]["seed"]
    assert seed["anyOf"][0]["minimum"] == 0 and seed["anyOf"][0]["maximum"] == float(2**64 - 1)  # bounds published
    stream = openapi["paths"]["/generate_stream"]["post"]["responses"]
    event = stream["200"]["content"]["text/event-stream"]["itemSchema"]["properties"]["data"]["contentSchema"]
    assert {"$ref": "#/components/schemas/StreamEvent"} in event["anyOf"]  # each event's data is a StreamEvent
    assert "application/json" in stream["422"]["content"]  # a refused stream is a JSON error, before any event
    assert httpx.get(f"{url}/docs").status_code == 200


def test_a_500_is_counted_and_says_nothing_internal(fuzz_server, monkeypatch):
    url = fuzz_server

    def internal(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    def count_500():
        return sum(float(line.split()[-1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                   if line.startswith('hf_freeze_requests_total{route="/score",status="500"}'))

    before = count_500()
    monkeypatch.setattr(ServingEngine, "score", internal)
    answer = _error(httpx.post(f"{url}/score", json={"inputs": [5, 6, 7]}), 500, "internal")
    assert "secret" not in answer and "RuntimeError" not in answer
    assert count_500() == before + 1
    monkeypatch.undo()
    assert httpx.post(f"{url}/score", json={"inputs": [5, 6, 7]}).status_code == 200
