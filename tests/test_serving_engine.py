"""ServingEngine: every answer through the shared prefix equals the model's own forward (fp32, 1e-5), greedy
generation equals each model's own `generate`, the prefix runs once per batch, repeated inputs skip it."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFIGS, UNSUPPORTED, tiny_model
from serving_helpers import perturbed_finetune, random_ids

from hf_freeze import get_layout
from hf_freeze.serving import (
    BaseMismatchServingError,
    EmbedRequest,
    GenerationRequest,
    Request,
    ServingEngine,
    UnknownModelError,
    WrongTaskError,
)
from hf_freeze.serving.engine import _length_buckets
from hf_freeze.serving.scheduler import GenerationScheduler

FAMILIES = list(CONFIGS)
CAUSAL = [f for f in FAMILIES if (f, "causal") not in UNSUPPORTED]
BOUNDARIES = (1, 2, 4)  # 4 = every block frozen: only the head is the fine-tune's own
TOL = 1e-5


def _engine(family: str, head: str, boundaries=BOUNDARIES, **kwargs):
    base = tiny_model(family, head).eval()
    engine = ServingEngine(base, **kwargs)
    models = {None: base}
    for k in boundaries:
        models[f"k{k}"] = perturbed_finetune(family, head, k, seed=10 + k, base=base)
        engine.add_model(f"k{k}", models[f"k{k}"])
    return engine, models


def _mixed(models, count=12, seed=0, cls=Request, **kwargs):
    names = list(models)
    return [cls(ids, model=names[i % len(names)], **kwargs) for i, ids in enumerate(random_ids(count, seed))]


def _generate(engine, requests):
    return GenerationScheduler(engine).generate(requests)


def _layout(engine, name):
    """The layout of the engine's own copy of model `name` (`None`: the base): what it runs."""
    return get_layout(engine.models[name or engine.base_name].model)


def _own(model, ids, **kwargs):
    return model(input_ids=torch.tensor([ids]), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_equals_each_models_own_forward(family):
    engine, models = _engine(family, "seq")
    requests = _mixed(models)
    answers = engine.predict(requests)
    for request, logits in zip(requests, answers, strict=True):
        expected = _own(models[request.model], request.input_ids).logits[0]
        torch.testing.assert_close(logits, expected, rtol=TOL, atol=TOL)
    # the fine-tunes really differ from the base (otherwise the comparison above proves little)
    ids = requests[0].input_ids
    assert not torch.allclose(_own(models["k1"], ids).logits, _own(models[None], ids).logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_equals_pooled_own_forward(family, pooling):
    engine, models = _engine(family, "base", boundaries=(1, 3), pooling=pooling)
    requests = _mixed(models, cls=EmbedRequest, normalize=True)
    for request, vector in zip(requests, engine.embed(requests), strict=True):
        hidden = _own(models[request.model], request.input_ids).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden[0] if pooling == "cls" else hidden.mean(0), dim=-1)
        torch.testing.assert_close(vector, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("family", CAUSAL)
def test_score_equals_own_log_likelihood(family):
    engine, models = _engine(family, "causal")
    requests = _mixed(models, seed=3)
    for request, scores in zip(requests, engine.score(requests), strict=True):
        logits = _own(models[request.model], request.input_ids).logits[0]
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(request.input_ids[1:])[:, None])[:, 0]
        assert scores.shape == (len(request.input_ids) - 1,)
        torch.testing.assert_close(scores, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generation_is_token_identical_to_own_generate(family):
    engine, models = _engine(family, "causal", boundaries=(1, 2, 3))
    requests = _mixed(models, count=10, seed=5, cls=GenerationRequest, max_new_tokens=7)
    results = _generate(engine, requests)
    for model_name, model in models.items():
        rows = [i for i, r in enumerate(requests) if r.model == model_name]
        # the model's own generate on its own rows, left-padded the same way
        length = max(len(requests[i].input_ids) for i in rows)
        pad = model.config.pad_token_id
        ids = torch.tensor([[pad] * (length - len(requests[i].input_ids)) + requests[i].input_ids for i in rows])
        starts = torch.tensor([length - len(requests[i].input_ids) for i in rows])
        mask = torch.arange(length)[None] >= starts[:, None]
        own = model.generate(ids, attention_mask=mask.long(), max_new_tokens=7, do_sample=False, pad_token_id=pad)
        eos = model.generation_config.eos_token_id
        for row, i in enumerate(rows):
            expected = own[row, length:].tolist()
            if eos in expected:
                expected = expected[: expected.index(eos) + 1]
            assert results[i].token_ids == expected, (model_name, i)
            assert results[i].finish_reason == ("eos" if expected[-1] == eos else "length")


def test_generation_stops_at_stop_tokens_and_max_tokens_and_samples_reproducibly():
    engine, models = _engine("llama", "causal", boundaries=(2,))
    prompt = random_ids(1, 7)[0]
    greedy = _generate(engine, [GenerationRequest(prompt, model="k2", max_new_tokens=6)])[0]
    assert len(greedy.token_ids) == 6 and greedy.finish_reason == "length"
    stop = greedy.token_ids[2]
    stopped = _generate(engine, [GenerationRequest(prompt, model="k2", max_new_tokens=6, stop_token_ids=[stop])])[0]
    first = greedy.token_ids.index(stop)
    assert stopped.token_ids == greedy.token_ids[: first + 1] and stopped.finish_reason == "eos"
    sample = dict(model="k2", max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=3)
    a, b = _generate(engine, [GenerationRequest(prompt, **sample), GenerationRequest(prompt, **sample)])
    assert a.token_ids == b.token_ids  # same seed, same tokens, whatever the batch
    others = {tuple(_generate(engine, [GenerationRequest(prompt, **{**sample, "seed": s})])[0].token_ids)
              for s in range(4, 10)}
    assert len(others) > 1  # sampling really samples


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_a_mixed_batch_runs_the_shared_prefix_once():
    engine, models = _engine("bert", "seq", boundaries=(2, 3), max_padding=None)  # no split by length
    engine.predict(_mixed(models, count=3, seed=1))  # warm-up: each runner learns its blocks' output format once
    base_block0, h0 = _count_calls(_layout(engine, None).blocks[0])
    base_block2, h2 = _count_calls(_layout(engine, None).blocks[2])
    own_prefix = [_count_calls(_layout(engine, name).blocks[0]) for name in ("k2", "k3")]
    own_block3 = [_count_calls(_layout(engine, name).blocks[3]) for name in ("k2", "k3")]
    engine.predict(_mixed(models, count=9))
    assert len(base_block0) == 1  # blocks [0, 2): once for all 9 rows of 3 models
    assert len(base_block2) == 2  # block 2 is frozen for k3 (advance) and the base (advance to 4): 2 groups
    assert all(len(calls) == 0 for calls, _ in own_prefix)  # fine-tunes never run their frozen blocks
    assert all(len(calls) == 1 for calls, _ in own_block3)  # one suffix forward per model
    for handle in [h0, h2, *(h for _, h in own_prefix + own_block3)]:
        handle.remove()


def _count_rows(module):
    """Rows of every forward of `module` (the batch size of its output)."""
    rows = []

    def hook(_module, _args, output):
        rows.append((output[0] if isinstance(output, tuple) else output).shape[0])

    return rows, module.register_forward_hook(hook)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_same_input_for_several_finetunes_runs_the_prefix_once(family):
    base = tiny_model(family, "seq").eval()
    engine = ServingEngine(base, cache_bytes=0, max_padding=None)
    separate = ServingEngine(base, cache_bytes=0, share_prefix=False)
    boundaries = {"a": 2, "b": 2, "c": 3, "d": 3}  # two fine-tunes at k = 2, two at k = 3 (advanced from 2)
    models = {name: perturbed_finetune(family, "seq", k, seed=20 + i, base=base)
              for i, (name, k) in enumerate(boundaries.items())}
    for name in models:
        engine.add_model(name, models[name])
        separate.add_model(name, models[name])
    ids, other = random_ids(2, 11, min_len=5)
    expected = {(name, tuple(x)): _own(model, x).logits[0] for name, model in models.items() for x in (ids, other)}
    engine.predict([Request(ids, model=m) for m in models])  # warm-up: the runners learn their blocks' outputs
    separate.predict([Request(ids, model=m) for m in models])
    block0, h0 = _count_rows(_layout(engine, None).blocks[0])
    block2, h2 = _count_rows(_layout(engine, None).blocks[2])
    own_prefix = {name: _count_rows(_layout(engine, name).blocks[0]) for name in models}
    fanout = [Request(ids, model=m) for m in models]
    answers = engine.predict(fanout)
    assert block0 == [1]  # one prefix row for the four fine-tunes
    assert block2 == [1]  # and one row advanced from k = 2 to k = 3 for c and d
    assert all(rows == [] for rows, _ in own_prefix.values())
    for request, logits in zip(fanout, answers, strict=True):
        torch.testing.assert_close(logits, expected[request.model, tuple(request.input_ids)], rtol=TOL, atol=TOL)
    assert not torch.allclose(answers[0], answers[1], atol=1e-3)  # the fine-tunes' answers really differ

    block0.clear()
    mixed = fanout + [Request(other, model="a"), Request(other, model="b")]
    for request, logits in zip(mixed, engine.predict(mixed), strict=True):
        torch.testing.assert_close(logits, expected[request.model, tuple(request.input_ids)], rtol=TOL, atol=TOL)
    assert block0 == [2]  # one row per distinct input

    base_block0, hb = _count_rows(_layout(separate, None).blocks[0])
    full = {name: _count_rows(_layout(separate, name).blocks[0]) for name in models}
    for request, logits in zip(fanout, separate.predict(fanout), strict=True):  # the baseline: full forwards
        torch.testing.assert_close(logits, expected[request.model, tuple(request.input_ids)], rtol=TOL, atol=TOL)
    assert base_block0 == [] and all(rows == [1] for rows, _ in full.values())
    for handle in [h0, h2, hb, *(h for _, h in [*own_prefix.values(), *full.values()])]:
        handle.remove()


def test_unshared_engine_gives_the_same_answers():
    shared, models = _engine("qwen2", "seq", boundaries=(2,))
    separate = ServingEngine(models[None], share_prefix=False)
    separate.add_model("k2", models["k2"])
    requests = _mixed(models)
    for a, b in zip(shared.predict(requests), separate.predict(requests), strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


def test_repeated_inputs_hit_the_cache_and_skip_the_prefix():
    engine, models = _engine("gpt2", "seq", boundaries=(2,))
    requests = _mixed(models, count=6)
    first = engine.predict(requests)
    assert (engine.cache.hits, engine.cache.misses) == (0, 6)
    calls, handle = _count_calls(_layout(engine, None).blocks[0])
    second = engine.predict(requests)
    handle.remove()
    assert engine.cache.hits == 6 and not calls  # every row from the cache: no prefix block ran
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
    assert 0 < engine.cache.nbytes <= engine.cache.max_bytes


def test_a_finetune_of_another_base_is_refused_naming_both_fingerprints():
    engine, _ = _engine("bert", "seq", boundaries=())
    stranger = tiny_model("bert", "seq", seed=1)
    from hf_freeze import freeze_prefix

    freeze_prefix(stranger, 2)
    with pytest.raises(BaseMismatchServingError, match="fingerprint [0-9a-f]{32}.*base's has [0-9a-f]{32}"):
        engine.add_model("stranger", stranger)
    assert "stranger" not in engine.models


def test_unknown_model_wrong_task_and_bad_inputs_are_refused():
    engine, _ = _engine("bert", "seq", boundaries=(2,))
    with pytest.raises(UnknownModelError, match="served models: \\['base', 'k2'\\]"):
        engine.predict([Request([5, 6], model="nope")])
    with pytest.raises(WrongTaskError, match="cannot generate"):
        _generate(engine, [GenerationRequest([5, 6], model="k2")])
    with pytest.raises(ValueError, match="no tokens"):
        engine.predict([Request([], model="k2")])
    with pytest.raises(ValueError, match="exceeds the 512 positions"):
        engine.predict([Request([5] * 600, model="k2")])


def test_a_model_with_sliding_window_layers_is_refused_generation_up_front():
    import transformers as T

    config = T.MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=37, sliding_window=4)
    engine = ServingEngine(T.MistralForCausalLM(config).eval())
    assert engine.models["base"].tasks == ("score",)
    with pytest.raises(WrongTaskError, match="cannot generate"):
        _generate(engine, [GenerationRequest([5, 6, 7])])


def test_length_buckets_bound_the_padding_and_cover_every_row():
    lengths = [3, 40, 38, 5, 4, 39, 20, 3]
    buckets = _length_buckets(lengths, 0.25)
    assert sorted(j for b in buckets for j in b) == list(range(len(lengths)))
    for bucket in buckets:
        real = sum(lengths[j] for j in bucket)
        assert len(bucket) * max(lengths[j] for j in bucket) <= 1.25 * real
    assert len(buckets) == 3  # {40, 39, 38}, {20}, {5, 4, 3, 3}
    assert _length_buckets(lengths, None) == [list(range(len(lengths)))]


def test_a_batch_split_by_length_still_equals_own_forward():
    engine, models = _engine("llama", "seq", boundaries=(2,))
    ids = [[7] * 3, [8] * 30, [9] * 4, [10] * 29]
    requests = [Request(i, model=m) for i in ids for m in ("k2", None)]
    calls, handle = _count_calls(_layout(engine, None).blocks[0])
    answers = engine.predict(requests)
    handle.remove()
    assert len(calls) >= 2  # long and short inputs ran in separate prefix forwards
    for request, logits in zip(requests, answers, strict=True):
        torch.testing.assert_close(logits, _own(models[request.model], request.input_ids).logits[0], rtol=TOL, atol=TOL)


def test_each_decoding_step_runs_the_shared_prefix_once_for_all_rows():
    engine, models = _engine("qwen2", "causal", boundaries=(1, 2))
    _generate(engine, [GenerationRequest([5, 6], model=m, max_new_tokens=1) for m in ("k1", "k2", None)])  # warm-up
    base_block0, h0 = _count_calls(_layout(engine, None).blocks[0])
    own = {name: _count_calls(_layout(engine, name).blocks[0]) for name in ("k1", "k2")}
    last = {name: _count_calls(_layout(engine, name).blocks[3]) for name in ("k1", "k2")}
    requests = [GenerationRequest(ids, model=["k1", "k2", None][i % 3], max_new_tokens=5, stop_token_ids=())
                for i, ids in enumerate(random_ids(6, 8))]
    results = _generate(engine, requests)
    steps = max(len(r.token_ids) for r in results)
    assert len(base_block0) == steps  # one prefix forward per step for the 6 rows of 3 models
    assert all(len(calls) == 0 for calls, _ in own.values())  # no fine-tune ran its frozen blocks
    assert all(len(calls) == steps for calls, _ in last.values())  # one suffix forward per model per step
    for _, handle in [(None, h0), *own.values(), *last.values()]:
        handle.remove()


@pytest.mark.parametrize(("family", "field", "value"), [
    ("llama", "rope_theta", 500.0), ("bert", "layer_norm_eps", 1e-3), ("qwen2", "hidden_act", "gelu")])
def test_a_finetune_whose_config_changes_the_prefix_is_served_without_sharing_it(family, field, value):
    base = tiny_model(family, "seq").eval()
    engine = ServingEngine(base)
    finetune = perturbed_finetune(family, "seq", 2, seed=4, base=base)
    if field == "rope_theta":  # transformers 5 keeps it in rope_parameters
        finetune.config.rope_parameters = {**finetune.config.rope_parameters, "rope_theta": value}
        finetune.model.rotary_emb = type(finetune.model.rotary_emb)(finetune.config)
    else:
        setattr(finetune.config, field, value)
        if field == "layer_norm_eps":
            for module in finetune.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.eps = value
        else:
            finetune = type(finetune)(finetune.config).eval().requires_grad_(False)
            finetune.load_state_dict(perturbed_finetune(family, "seq", 2, seed=4, base=base).state_dict())
    served = engine.add_model("ft", finetune, boundary=2)
    assert not served.shares_prefix and served.unshared_reason
    assert field.split("_")[0] in served.unshared_reason  # the differing field is named
    requests = [Request(ids, model="ft") for ids in random_ids(4, seed=6, min_len=6)]
    for request, logits in zip(requests, engine.predict(requests), strict=True):
        torch.testing.assert_close(logits, _own(finetune, request.input_ids).logits[0], rtol=TOL, atol=TOL)
    assert engine.add_model("same", perturbed_finetune(family, "seq", 2, seed=4, base=base)).shares_prefix


def test_a_user_calling_their_own_model_while_it_is_served_gets_their_own_outputs():
    import threading

    engine, models = _engine("llama", "seq", boundaries=(2,))
    ids = random_ids(1, seed=3, min_len=8)[0]
    expected = {name: _own(model, ids).logits for name, model in models.items()}
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            engine.predict(_mixed(models, count=6, seed=1))

    server = threading.Thread(target=serve)
    server.start()
    wrong = 0
    try:
        with torch.no_grad():
            for _ in range(150):
                for name, model in models.items():
                    wrong += not torch.allclose(_own(model, ids).logits, expected[name], atol=TOL)
    finally:
        stop.set()
        server.join()
    assert wrong == 0
    assert all(engine.models[n or "base"].model is not m for n, m in models.items())  # the engine's own copies


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_bfloat16_serving_equals_the_models_own_bfloat16_forward(family):
    base = tiny_model(family, "seq").eval()
    engine = ServingEngine(base, dtype="bfloat16")
    finetune = perturbed_finetune(family, "seq", 2, seed=8, base=base)
    engine.add_model("k2", finetune)
    assert next(engine.base.parameters()).dtype == torch.bfloat16 and next(base.parameters()).dtype == torch.float32
    requests = _mixed({None: base, "k2": finetune}, count=8, seed=2)
    own = {None: base.to(torch.bfloat16), "k2": finetune.to(torch.bfloat16)}
    for request, logits in zip(requests, engine.predict(requests), strict=True):
        expected = _own(own[request.model], request.input_ids).logits[0].float()
        torch.testing.assert_close(logits, expected, rtol=2e-2, atol=2e-2)


def test_a_bfloat16_trained_suffix_is_served_in_bfloat16_and_refused_in_float32_naming_the_dtype(tmp_path):
    from hf_freeze.checkpoint import save_suffix

    base = tiny_model("llama", "causal").eval()
    base.save_pretrained(tmp_path / "base")
    trained = perturbed_finetune("llama", "causal", 2, seed=9, base=base).to(torch.bfloat16)  # trained in bf16
    save_suffix(trained, tmp_path / "suffix")
    engine = ServingEngine.from_pretrained(tmp_path / "base", {"ft": tmp_path / "suffix"}, dtype="bfloat16")
    assert engine.models["ft"].shares_prefix
    ids = random_ids(3, seed=4, min_len=5)
    for i, scores in zip(ids, engine.score([Request(i, model="ft") for i in ids]), strict=True):
        logits = _own(trained, i).logits[0].float()
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(i[1:])[:, None])[:, 0]
        torch.testing.assert_close(scores, expected, rtol=3e-2, atol=3e-2)
    with pytest.raises(BaseMismatchServingError, match="in float32.*dtype"):
        ServingEngine.from_pretrained(tmp_path / "base", {"ft": tmp_path / "suffix"})


@pytest.mark.parametrize("family", FAMILIES)
def test_an_input_of_the_usable_positions_runs_and_one_more_is_refused(family):
    """RoBERTa and MPNet number positions from padding_idx + 1: two fewer tokens fit than their configs' positions."""
    engine, models = _engine(family, "seq", boundaries=(2,))
    limit = engine.models["k2"].max_input_tokens
    positions = models[None].config.max_position_embeddings
    assert limit == (positions - 2 if family in ("roberta", "mpnet") else positions)
    ids = random_ids(1, 3, min_len=limit, max_len=limit)[0]
    if limit <= 2048:  # Qwen2's 32,768 positions are too slow to fill here
        logits = engine.predict([Request(ids, model="k2")])[0]
        torch.testing.assert_close(logits, _own(models["k2"], ids).logits[0], rtol=TOL, atol=TOL)
    with pytest.raises(ValueError, match=f"exceeds the {limit} positions"):
        engine.predict([Request(ids + [5], model="k2")])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_decoder_classifier_without_a_pad_token_batches_like_it_runs_alone(family):
    engine, models = _engine(family, "seq", boundaries=(2,))
    served = [m.model for m in engine.models.values()]  # the engine's own copies
    for model in [*models.values(), *served]:
        model.config.pad_token_id = None  # as GPT-2 and Llama checkpoints ship
    requests = _mixed(models, count=8, seed=4)  # rows of different lengths: right padding in every forward
    answers = engine.predict(requests)
    for request, logits in zip(requests, answers, strict=True):
        torch.testing.assert_close(logits, _own(models[request.model], request.input_ids).logits[0], rtol=TOL,
                                   atol=TOL)
    assert all(m.config.pad_token_id is None for m in served)  # the configs are left as they were
