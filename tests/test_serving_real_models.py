"""Serving the real packaged models: MiniLM (6 blocks, fine-tunes frozen at 4 and 2) and SmolLM2-135M (30 blocks,
fine-tunes frozen at 20 and 24). Answers through the shared prefix equal each model's own forward (fp32, 1e-5);
greedy generation is token-identical to each model's own `generate`."""

from __future__ import annotations

import httpx
import pytest
import torch
from serving_helpers import perturb_suffix
from test_real_models import REVIEWS
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_freeze import assets
from hf_freeze.serving import EmbedRequest, GenerationRequest, Request, ServingEngine
from hf_freeze.serving.app import create_app, serve_in_thread
from hf_freeze.serving.engine import load_base
from hf_freeze.serving.scheduler import GenerationScheduler

TOL = 1e-5


@pytest.fixture(scope="module")
def minilm():
    path = assets.model_path("minilm")
    base = load_base(path).eval()  # BertModel, as its config names
    engine = ServingEngine(base, source=path)
    models = {"base": base}
    for k in (4, 2):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        models[f"sst{k}"] = perturb_suffix(model, k, seed=k, scale=0.05)
        engine.add_model(f"sst{k}", models[f"sst{k}"])
    models["emb3"] = perturb_suffix(load_base(path), 3, seed=3, scale=0.05)
    engine.add_model("emb3", models["emb3"])
    return engine, models, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def test_minilm_predict_and_embed_equal_own_forward(minilm):
    engine, models, tokenizer = minilm
    assert engine.pooling == "mean"  # from its sentence-transformers 1_Pooling/config.json
    ids = [tokenizer(text)["input_ids"] for text in REVIEWS]
    requests = [Request(i, model=name) for name in ("sst4", "sst2") for i in ids]
    for request, logits in zip(requests, engine.predict(requests), strict=True):
        torch.testing.assert_close(logits, models[request.model](input_ids=torch.tensor([request.input_ids])).logits[0],
                                   rtol=TOL, atol=TOL)
    requests = [EmbedRequest(i, model=name) for name in ("emb3", None) for i in ids]
    for request, vector in zip(requests, engine.embed(requests), strict=True):
        hidden = models[request.model or "base"](input_ids=torch.tensor([request.input_ids])).last_hidden_state[0]
        torch.testing.assert_close(vector, torch.nn.functional.normalize(hidden.mean(0), dim=-1), rtol=TOL, atol=TOL)


@torch.no_grad()
def test_minilm_over_http_with_text_inputs(minilm):
    engine, models, tokenizer = minilm
    with serve_in_thread(create_app(engine, tokenizer=tokenizer)) as url:
        answer = httpx.post(f"{url}/predict", json={"inputs": REVIEWS, "model": "sst4", "raw_scores": True}).json()
        vectors = httpx.post(f"{url}/embed", json={"inputs": REVIEWS[:2]}).json()
    for text, labels in zip(REVIEWS, answer, strict=True):
        expected = models["sst4"](**tokenizer(text, return_tensors="pt")).logits[0]
        got = torch.tensor([x["score"] for x in sorted(labels, key=lambda x: x["label"])])
        torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    for text, vector in zip(REVIEWS[:2], vectors, strict=True):
        hidden = models["base"](**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
        torch.testing.assert_close(torch.tensor(vector), expected, rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def smollm2():
    path = assets.model_path("smollm2")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = ServingEngine(base, source=path)
    models = {"base": base}
    for k in (20, 24):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        models[f"k{k}"] = perturb_suffix(model, k, seed=k, scale=0.02)
        engine.add_model(f"k{k}", models[f"k{k}"])
    return engine, models, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def test_smollm2_score_equals_own_forward(smollm2):
    engine, models, tokenizer = smollm2
    ids = [tokenizer(text)["input_ids"] for text in REVIEWS[:3]]
    requests = [Request(i, model=name) for name in ("k20", "k24", None) for i in ids]
    for request, scores in zip(requests, engine.score(requests), strict=True):
        logits = models[request.model or "base"](input_ids=torch.tensor([request.input_ids])).logits[0]
        target = torch.tensor(request.input_ids[1:])[:, None]
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, target)[:, 0]
        torch.testing.assert_close(scores, expected, rtol=TOL, atol=TOL)


@torch.no_grad()
def test_smollm2_greedy_generation_is_token_identical(smollm2):
    engine, models, tokenizer = smollm2
    prompts = ["The capital of Germany is", "Once upon a time, in a small village by the sea,", "2 + 2 ="]
    requests = [GenerationRequest(tokenizer(p)["input_ids"], model=name, max_new_tokens=8)
                for name in ("k20", "k24", None) for p in prompts]
    results = GenerationScheduler(engine).generate(requests)
    for request, result in zip(requests, results, strict=True):
        model = models[request.model or "base"]
        ids = torch.tensor([request.input_ids])
        own = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert result.token_ids == own[: len(result.token_ids)] and len(result.token_ids) >= 1
        assert result.finish_reason == "eos" or len(result.token_ids) == 8
    assert "Berlin" in tokenizer.decode(results[-3].token_ids)  # the base still knows it
