"""Stock clients against a real uvicorn server on 127.0.0.1, unchanged: the official `openai` client (`/v1/...`),
`huggingface_hub.InferenceClient(base_url=...)` and `text_generation.Client` (both post to `/`). Every answer equals
the engine's or the model's own; errors come back as each client's own exceptions."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import pytest
import torch
import transformers as T
from serving_helpers import perturb_suffix
from transformers import AutoTokenizer

from hf_freeze import assets
from hf_freeze.serving import EmbedRequest, ServingEngine
from hf_freeze.serving.app import create_app, serve_in_thread

openai = pytest.importorskip("openai")
try:  # installed with --no-deps by scripts/setup.sh (it pins huggingface_hub<1)
    import text_generation
except ImportError:
    text_generation = None
needs_tgi_client = pytest.mark.skipif(text_generation is None, reason="pip install --no-deps text-generation")
from huggingface_hub import InferenceClient  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, UnknownError, ValidationError  # noqa: E402

TOL = 1e-5


def _llama(head, tokenizer, pad_token_id=None, seed=0):
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=37, max_position_embeddings=1024,
                           pad_token_id=pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, num_labels=3)
    torch.manual_seed(seed)
    return head(config).eval()


@pytest.fixture(scope="module")
def server():
    """A causal-LM base over the packaged SmolLM2 tokenizer (it has a chat template), a generating fine-tune `k1`,
    a classifier `clf` and an embedding model `emb` of the same base: every task, one server."""
    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("smollm2"))
    base = _llama(T.LlamaForCausalLM, tokenizer)
    models = {"base": base}
    for name, head in (("k1", T.LlamaForCausalLM), ("clf", T.LlamaForSequenceClassification), ("emb", T.LlamaModel)):
        model = _llama(head, tokenizer, seed=1)
        model.base_model.load_state_dict(base.base_model.state_dict())
        models[name] = perturb_suffix(model, 1, seed=len(name))
    engine = ServingEngine(base, cache_bytes=0)
    for name in ("k1", "clf", "emb"):
        engine.add_model(name, models[name])
    app = create_app(engine, tokenizer=tokenizer, max_wait_ms=1)
    with serve_in_thread(app) as url:
        yield url, engine, models, tokenizer, app


def _greedy(model, ids, max_new_tokens):
    own = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return own[: own.index(eos) + 1] if eos in own else own


PROMPT = "The frozen prefix is shared by"


# ------------------------------------------------------------------------------------------------------ openai
def test_openai_models_and_embeddings(server):
    url, engine, _, tokenizer, *_ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"base", "k1", "clf", "emb"}
    assert listed["base"].parent is None and listed["k1"].parent == "base"
    texts = ["a first text", "and a second, longer one"]
    for encoding in ("float", "base64"):  # the client asks for base64 unless told otherwise, and decodes it
        kwargs = {"encoding_format": encoding} if encoding == "float" else {}
        answer = client.embeddings.create(model="emb", input=texts, **kwargs)
        ids = [tokenizer(t)["input_ids"] for t in texts]
        expected = engine.embed([EmbedRequest(i, model="emb") for i in ids])
        for item, vector in zip(answer.data, expected, strict=True):
            torch.testing.assert_close(torch.tensor(item.embedding), vector, rtol=TOL, atol=TOL)
        assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
    raw = httpx.post(f"{url}/v1/embeddings", json={"model": "emb", "input": texts[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(decoded.copy()), expected[0], rtol=TOL, atol=TOL)


def test_openai_completions_greedy_streamed_and_usage(server):
    url, _, models, tokenizer, *_ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    ids = tokenizer(PROMPT)["input_ids"]
    for name in ("k1", "base"):
        answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        own = _greedy(models[name], ids, 6)
        assert answer.choices[0].text == tokenizer.decode(own, skip_special_tokens=True)
        assert answer.choices[0].finish_reason == ("stop" if len(own) < 6 else "length")
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == len(own)
        chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
        assert chunks[-1].usage.completion_tokens == len(own)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    sampled = [client.completions.create(model="k1", prompt=PROMPT, max_tokens=5, temperature=0.9, seed=3
                                         ).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    batch = client.completions.create(model="k1", prompt=[ids, ids[:3]], max_tokens=3)  # token ids, two prompts
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == tokenizer.decode(_greedy(models["k1"], ids, 3), skip_special_tokens=True)


def test_openai_chat_completion_uses_the_chat_template(server):
    url, _, models, tokenizer, *_ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    messages = [{"role": "user", "content": "Which blocks are frozen?"}]
    answer = client.chat.completions.create(model="k1", messages=messages, max_tokens=5, temperature=0)
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]
    own = _greedy(models["k1"], ids, 5)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == tokenizer.decode(own, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == len(ids)
    streamed = list(client.chat.completions.create(model="k1", messages=messages, max_tokens=5, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content
    hf = InferenceClient(base_url=url)  # huggingface_hub's chat_completion posts to /v1/chat/completions
    with_hf = hf.chat_completion(messages, model="k1", max_tokens=5, temperature=0)
    assert with_hf.choices[0].message.content == answer.choices[0].message.content
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(openai.UnprocessableEntityError, match="chat template"):
            client.chat.completions.create(model="k1", messages=messages, max_tokens=2)
    finally:
        tokenizer.chat_template = template


def test_openai_errors_are_the_clients_exceptions(server):
    url = server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="Unknown model 'nope'") as error:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert error.value.code == "unknown_model" and error.value.type == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="k1", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError, match="stop"):
        client.completions.create(model="k1", prompt=PROMPT, max_tokens=2, stop=["\n"])
    with pytest.raises(openai.UnprocessableEntityError, match="`n`"):
        client.completions.create(model="k1", prompt=PROMPT, max_tokens=2, n=2)
    with pytest.raises(openai.APIStatusError, match="cannot generate") as error:
        client.completions.create(model="emb", prompt=PROMPT, max_tokens=2)
    assert error.value.status_code == 424
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="text")
    with pytest.raises(openai.UnprocessableEntityError, match="`dimensions`"):
        client.embeddings.create(model="emb", input="text", dimensions=8)
    raw = httpx.post(f"{url}/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert raw.status_code == 422 and raw.json()["error"]["code"] == raw.json()["error_type"] == "validation"
    assert httpx.get(f"{url}/v1/nope").json()["error"]["code"] == "not_found"
    assert httpx.post(f"{url}/predict", json={"inputs": "x", "model": "nope"}).json()["error_type"] == "unknown_model"


# --------------------------------------------------------------------------------------- Hugging Face clients
@pytest.fixture(autouse=True)
def _loopback_allowed(monkeypatch):
    """huggingface_hub refuses every request in offline mode (HF_HUB_OFFLINE=1 in the tests); these go to 127.0.0.1
    only, so its flag is lifted for them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_inference_client_feature_extraction_and_classification(server):
    url, engine, models, tokenizer, *_ = server
    texts = ["a first text", "and a second one"]
    vectors = InferenceClient(base_url=f"{url}/models/emb").feature_extraction(texts)
    expected = engine.embed([EmbedRequest(tokenizer(t)["input_ids"], model="emb") for t in texts])
    torch.testing.assert_close(torch.tensor(vectors), torch.stack(expected), rtol=TOL, atol=TOL)
    labels = InferenceClient(base_url=f"{url}/models/clf").text_classification(texts[0])
    with torch.no_grad():
        probs = models["clf"](input_ids=torch.tensor([tokenizer(texts[0])["input_ids"]])).logits[0].softmax(-1)
    assert [x.label for x in labels] == [models["clf"].config.id2label[int(i)] for i in probs.argsort(descending=True)]
    torch.testing.assert_close(torch.tensor([x.score for x in labels]), probs.sort(descending=True).values,
                               rtol=TOL, atol=TOL)
    assert len(InferenceClient(base_url=f"{url}/models/clf").text_classification(texts[0], top_k=1)) == 1
    with pytest.raises(HfHubHTTPError, match="cannot embed"):  # a feature-extraction field: the base cannot
        InferenceClient(base_url=url).feature_extraction(texts[0], normalize=True)


def test_inference_client_text_generation(server):
    url, _, models, tokenizer, *_ = server
    client = InferenceClient(base_url=url)
    ids = tokenizer(PROMPT)["input_ids"]
    own = _greedy(models["k1"], ids, 6)
    text = client.text_generation(PROMPT, max_new_tokens=6, adapter_id="k1")
    assert text == tokenizer.decode(own, skip_special_tokens=True)
    detailed = client.text_generation(PROMPT, max_new_tokens=6, adapter_id="k1", details=True)
    assert [t.id for t in detailed.details.tokens] == own
    assert detailed.details.finish_reason == ("eos_token" if len(own) < 6 else "length")
    assert detailed.details.generated_tokens == len(own)
    streamed = list(client.text_generation(PROMPT, max_new_tokens=6, adapter_id="k1", stream=True, details=True))
    assert [s.token.id for s in streamed] == own and streamed[-1].generated_text == text
    assert streamed[-1].details.finish_reason == detailed.details.finish_reason
    assert client.text_generation(PROMPT, max_new_tokens=6) == tokenizer.decode(_greedy(models["base"], ids, 6),
                                                                                skip_special_tokens=True)
    full = client.text_generation(PROMPT, max_new_tokens=6, adapter_id="k1", return_full_text=True)
    assert full == tokenizer.decode(ids, skip_special_tokens=True) + text
    with pytest.raises(UnknownError, match="Unknown model 'nope'"):  # the client's own error for the 404
        client.text_generation(PROMPT, max_new_tokens=2, adapter_id="nope")
    with pytest.raises(ValidationError, match="watermark"):
        client.text_generation(PROMPT, max_new_tokens=2, watermark=True)


@needs_tgi_client
def test_text_generation_client(server):
    url, _, models, tokenizer, *_ = server
    client = text_generation.Client(url, timeout=60)
    ids = tokenizer(PROMPT)["input_ids"]
    own = _greedy(models["base"], ids, 7)
    answer = client.generate(PROMPT, max_new_tokens=7)  # every parameter sent, nulls included
    assert answer.generated_text == tokenizer.decode(own, skip_special_tokens=True)
    assert [t.id for t in answer.details.tokens] == own and answer.details.generated_tokens == len(own)
    assert answer.details.finish_reason.value == ("eos_token" if len(own) < 7 else "length")
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=7))
    assert [s.token.id for s in streamed] == own and streamed[-1].generated_text == answer.generated_text
    assert streamed[-1].details.finish_reason == answer.details.finish_reason
    cut = client.generate(PROMPT, max_new_tokens=3, truncate=2)  # TGI's truncate: the prompt's last 2 tokens
    assert [t.id for t in cut.details.tokens] == _greedy(models["base"], ids[-2:], 3)
    sampled = [client.generate(PROMPT, max_new_tokens=5, temperature=0.9, seed=7).generated_text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a warper turns sampling on (TGI's rule); the seed makes it repeatable
    with pytest.raises(text_generation.errors.ValidationError, match="stop"):
        client.generate(PROMPT, max_new_tokens=2, stop_sequences=["\n"])
    with pytest.raises(text_generation.errors.ValidationError, match="best_of"):
        client.generate(PROMPT, max_new_tokens=2, best_of=2, do_sample=True)
    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=10**9)
    fine_tune = text_generation.Client(f"{url}/models/k1", timeout=60).generate(PROMPT, max_new_tokens=7)
    assert [t.id for t in fine_tune.details.tokens] == _greedy(models["k1"], ids, 7)
    with pytest.raises(text_generation.errors.NotFoundError, match="Unknown model"):
        text_generation.Client(f"{url}/models/nope").generate(PROMPT, max_new_tokens=2)


@needs_tgi_client
def test_finish_reasons_when_eos_ends_generation(server):
    """With the model's EOS set to its first greedy token, every client sees generation end on EOS, in its own words
    (TGI: `eos_token`, OpenAI: `stop`)."""
    url, engine, models, tokenizer, *_ = server
    ids = tokenizer(PROMPT)["input_ids"]
    first = _greedy(models["base"], ids, 1)[0]
    config = engine.models["base"].model.generation_config
    eos, config.eos_token_id = config.eos_token_id, first
    try:
        answer = text_generation.Client(url, timeout=60).generate(PROMPT, max_new_tokens=5)
        assert answer.details.finish_reason.value == "eos_token" and answer.details.generated_tokens == 1
        hf = InferenceClient(base_url=url)  # held: the client closes its streams when it is collected
        streamed = list(hf.text_generation(PROMPT, max_new_tokens=5, stream=True, details=True))
        assert len(streamed) == 1 and streamed[-1].details.finish_reason == "eos_token"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        assert client.completions.create(model="base", prompt=PROMPT, max_tokens=5).choices[0].finish_reason == "stop"
    finally:
        config.eos_token_id = eos


def test_streamed_text_deltas_never_split_a_character():
    """A character spread over several byte-level tokens arrives whole: the deltas concatenate to the decoded text
    (without holding back a trailing replacement character they would not)."""
    from hf_freeze.serving.openai import _TextDeltas

    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("smollm2"))
    ids = tokenizer("ok 😀 🧊", add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:j]) for j in range(1, len(ids)))  # a split character in the middle
    deltas = _TextDeltas(tokenizer)
    pieces = [deltas.add(t, final=j == len(ids) - 1) for j, t in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/"])
def test_a_client_that_leaves_a_stream_stops_its_row(server, route):
    url, *_, app = server
    # a long budget: the tiny model decodes hundreds of tokens a second, so the disconnect must be seen well before
    # the row could end on its own, even on a busy machine (100 tokens were too few once in CI)
    body = {"/v1/completions": {"model": "k1", "prompt": PROMPT, "max_tokens": 900, "stream": True},
            "/v1/chat/completions": {"model": "k1", "messages": [{"role": "user", "content": "Hi"}],
                                     "max_tokens": 900, "stream": True},
            "/": {"inputs": PROMPT, "parameters": {"max_new_tokens": 900, "adapter_id": "k1"}, "stream": True}}[route]
    scheduler = app.state.batcher.scheduler
    steps = scheduler.steps
    with httpx.stream("POST", f"{url}{route}", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk came: leave
    deadline = time.monotonic() + 30
    while scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scheduler.busy and scheduler.steps - steps < 800  # the row stopped long before its 900 tokens


def test_bad_payloads_on_root_get_the_native_error_body(server):
    url = server[0]
    for body, status, error_type, words in (
            ({"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, 422, "validation", "parameters.max_new_tokens"),
            ({"inputs": PROMPT, "parameters": {"beams": 2}}, 422, "validation", "parameters.beams"),
            ({"inputs": PROMPT, "parameters": {"typical_p": 0.5}}, 422, "validation", "typical_p"),
            ({"inputs": PROMPT, "stream": True, "normalize": True}, 422, "validation", "feature extraction"),
            ({"inputs": [PROMPT, PROMPT], "stream": True}, 422, "validation", "one input"),
            ({"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}, 404, "unknown_model", "nope"),
            ({"inputs": PROMPT, "parameters": {"function_to_apply": "softmax"}}, 424, "wrong_task", "cannot predict"),
            ({"inputs": ""}, 422, "validation", "inputs")):
        response = httpx.post(f"{url}/", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()
        assert set(error) == {"error", "error_type"} and error["error_type"] == error_type, error
        assert words in error["error"], error
    assert httpx.post(f"{url}/models/clf", json={"inputs": "fine", "parameters": {"adapter_id": "emb"}}
                      ).json()["error_type"] == "validation"
