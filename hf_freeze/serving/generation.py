"""Batched decoding for `ServingEngine.generate`: the frozen layers run once per step for every row.

Per step (prefill included) and per batch:
1. the base runs embeddings + blocks `[0, k_min)` for all rows whose model shares a prefix, with one KV cache;
2. rows whose model's boundary `b > k_min` advance through the frozen blocks `[k_min, b)`, one forward per
   boundary, each with its KV cache;
3. each model runs its own forward on its rows with blocks `[0, b)` replaced by those states, with a KV cache for
   its layers `[b, L)`; models that share nothing run their whole forward with their own cache.
Inputs follow `generate`: left padding, position ids from the attention mask's cumulative sum, one new token per
step, finished rows fed the pad token. Greedy decoding is therefore token-identical to each model's `generate`.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from ..layout import execution_device
from .requests import GenerationRequest, GenerationResult, ServingError

if TYPE_CHECKING:
    from .engine import ServedModel, ServingEngine


def generate_batch(engine: ServingEngine, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Decode `requests` together (see the module docstring); returns one result per request, in order."""
    served = [engine.models[engine._name(r)] for r in requests]
    device = execution_device(engine.base_layout.embeddings[0])
    pad = pad_token_id(engine.base)
    length = max(len(r.input_ids) for r in requests)
    ids = torch.full((len(requests), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(requests):
        n = len(request.input_ids)
        ids[row, length - n:] = torch.as_tensor(list(request.input_ids), dtype=torch.long)
        mask[row, length - n:] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    clock = Clock(0)
    shared_rows = [i for i, s in enumerate(served) if engine._shares(s)]
    k_min = min((served[i].boundary for i in shared_rows), default=0)
    prefix_cache = partial_cache(engine.base, engine.num_blocks, 0, clock) if shared_rows else None
    by_boundary: dict[int, list[int]] = defaultdict(list)
    for i in shared_rows:
        if served[i].boundary > k_min:
            by_boundary[served[i].boundary].append(i)
    advance_caches = {b: partial_cache(engine.base, engine.num_blocks, k_min, clock) for b in by_boundary}
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(served):
        by_model[s.name].append(i)
    model_caches = {name: partial_cache(engine.models[name].model, engine.num_blocks,
                                         engine.models[name].boundary if engine._shares(engine.models[name]) else 0,
                                         clock)
                    for name in by_model}

    samplers = [_Sampler(r) for r in requests]
    stops = [_stop_ids(s.model, r) for s, r in zip(served, requests)]
    generated: list[list[int]] = [[] for _ in requests]
    finished = [False] * len(requests)
    reasons = ["length"] * len(requests)
    step_ids = ids
    for _ in range(max(r.max_new_tokens for r in requests)):
        q = step_ids.shape[1]
        step = {"input_ids": step_ids, "attention_mask": mask, "position_ids": positions[:, -q:]}
        states: dict[int, torch.Tensor] = {}
        if shared_rows:
            prefix_out = _boundary_states(engine.base_runner, engine.base, _rows(step, shared_rows), k_min,
                                          prefix_cache)
            for row, i in enumerate(shared_rows):
                states[i] = prefix_out[row]
            for boundary, rows in by_boundary.items():
                start = torch.stack([states[i] for i in rows])
                advanced = _boundary_states(engine.base_runner, engine.base, _rows(step, rows), boundary,
                                            advance_caches[boundary], start=(k_min, start))
                for row, i in enumerate(rows):
                    states[i] = advanced[row]
        logits = torch.empty(len(requests), _vocab_size(served[0].model), device=device)
        for name, rows in by_model.items():
            model_served = engine.models[name]
            logits[rows] = _suffix_logits(engine, model_served, _rows(step, rows), states, rows,
                                          model_caches[name]).to(device)
        clock.past += q

        next_ids = torch.full((len(requests),), pad, dtype=torch.long, device=device)
        for i in range(len(requests)):
            if finished[i] or len(generated[i]) >= requests[i].max_new_tokens:
                finished[i] = True
                continue
            token = samplers[i](ids_so_far=torch.cat([ids[i], torch.tensor(generated[i], dtype=torch.long,
                                                                            device=device)]), logits=logits[i])
            generated[i].append(token)
            next_ids[i] = token
            if token in stops[i]:
                finished[i], reasons[i] = True, "eos"
            elif len(generated[i]) >= requests[i].max_new_tokens:
                finished[i] = True
        if all(finished):
            break
        step_ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones(len(requests), 1)], dim=-1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
    return [GenerationResult(token_ids=g, finish_reason=r) for g, r in zip(generated, reasons)]


class _Sampler:
    """Greedy argmax, or sampling through transformers' own logits warpers with a per-request generator."""

    def __init__(self, request: GenerationRequest) -> None:
        self.do_sample = request.do_sample
        if not self.do_sample:
            return
        warpers = []
        if request.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(request.temperature))
        if request.top_k:
            warpers.append(TopKLogitsWarper(request.top_k))
        if request.top_p is not None and request.top_p < 1.0:
            warpers.append(TopPLogitsWarper(request.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = torch.Generator()
        if request.seed is not None:
            self.generator.manual_seed(request.seed)
        else:
            self.generator.seed()

    def __call__(self, ids_so_far: torch.Tensor, logits: torch.Tensor) -> int:
        if not self.do_sample:
            return int(logits.argmax())
        scores = self.warpers(ids_so_far[None], logits[None].float())
        probs = torch.softmax(scores, dim=-1)[0].cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _boundary_states(runner, model, inputs: dict[str, Any], boundary: int, cache, start=None) -> torch.Tensor:
    kwargs = {**inputs, _cache_arg(model): cache, "use_cache": True}
    return runner.boundary_states(kwargs, boundary, start=start)


def _suffix_logits(engine: ServingEngine, served: ServedModel, inputs: dict[str, Any], states: dict[int, torch.Tensor],
                   rows: list[int], cache) -> torch.Tensor:
    model = served.model
    kwargs = {**inputs, _cache_arg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    if engine._shares(served):
        with served.runner.inject_states(torch.stack([states[i] for i in rows]), served.boundary):
            out = model(**kwargs)
    else:
        out = model(**kwargs)
    return out.logits[:, -1].float()


def _cache_arg(model) -> str:
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _rows(inputs: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    if rows == list(range(inputs["input_ids"].shape[0])):
        return dict(inputs)
    index = torch.tensor(rows, device=inputs["input_ids"].device)
    return {k: v.index_select(0, index) for k, v in inputs.items()}


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _stop_ids(model, request: GenerationRequest) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {int(t) for t in (*eos, *request.stop_token_ids)}


def pad_token_id(model: nn.Module) -> int:
    """The model's pad token id, else its (first) EOS id, else 0."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return int(pad) if pad is not None else 0


class SkippedLayer(DynamicLayer):
    """KV-cache layer of a block that another forward runs: reports the sequence length (so masks and positions
    are built as usual) and refuses updates."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def get_seq_length(self) -> int:
        return self.clock.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.clock.past + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise RuntimeError("A block whose KV cache lives in the shared prefix ran in a suffix forward.")


@dataclass
class Clock:
    """Tokens already in the KV caches of one decoding batch (shared by its `SkippedLayer`s)."""

    past: int = 0


def partial_cache(model: nn.Module, num_blocks: int, skipped: int, clock: Clock) -> DynamicCache:
    """A `DynamicCache` for `model` whose layers `[0, skipped)` are `SkippedLayer`s."""
    cache = DynamicCache(config=model.config)
    while len(cache.layers) < num_blocks:
        cache.layers.append(DynamicLayer())
    kinds = {type(layer).__name__ for layer in cache.layers}
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ServingError(f"Generation through a shared prefix needs full-attention KV caches; "
                           f"{type(model).__name__} uses {sorted(kinds)}.")
    for i in range(skipped):
        cache.layers[i] = SkippedLayer(clock)
    return cache
