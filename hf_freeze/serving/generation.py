"""Decoding with shared frozen layers: a `DecodeBatch` of sequences that grows and shrinks between steps.

Per step (prefill included):
1. the base runs embeddings + blocks `[0, k_min)` for all rows whose model shares the prefix, with one KV cache;
2. rows whose model's boundary `b > k_min` advance through the frozen blocks `[k_min, b)`, one forward per
   boundary, each with its KV cache;
3. each model runs its own forward on its rows with blocks `[0, b)` replaced by those states, with a KV cache for
   its layers `[b, L)`; models that share nothing run their whole forward with their own cache.
Inputs follow `generate`: left padding, position ids counted over the attention mask, one new token per step.

Rows join (`extend`: a freshly prefilled batch) and leave (`keep`) between steps. Both rebuild the grouped KV
caches from per-row keys and values, left-padded to a common length (and trimmed where every row is padding), so
the per-step forwards stay one per group whatever the membership. Each row samples with transformers' own logits
processors built from its model's `generation_config` (`RowSampler`), so greedy decoding is token-identical to
that model's `generate` on the prompt alone. A model whose own forward raises fails only its rows
(`DecodeBatch.errors`); the shared prefix's forward is one for every row, so its failure is the batch's.

This module reads the engine's public surface (`models`, `base`, `base_runner`, `base_layout`, `num_blocks`,
`ServedModel.shares_prefix`); the engine never imports it.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..layout import execution_device
from .engine import pad_token_id
from .kv_cache import Clock, fill_layer, partial_cache
from .requests import GenerationRequest, GenerationResult, ServingError

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from .engine import ServedModel, ServingEngine

logger = logging.getLogger(__name__)


class RowSampler:
    """The next token of one sequence: its model's `generation_config` merged with the request's parameters, turned
    into transformers' own `LogitsProcessorList` (repetition penalty, n-gram blocking, min length, warpers, ...),
    then argmax or a draw from a per-request generator.

    Attributes:
        max_new_tokens (`int`): new tokens at most (the request's, else from the model's `max_new_tokens` /
            `max_length`, as `generate` computes them), within the model's positions.
        stop_ids (`set[int]`): the model's EOS ids (one or a list) and the request's `stop_token_ids`.
        pad_id (`int`): the model's pad id (its first EOS id when it has none).
    """

    def __init__(self, model: nn.Module, request: GenerationRequest, device: torch.device) -> None:
        prompt = torch.as_tensor(list(request.input_ids), dtype=torch.long, device=device)[None]
        config = generation_config(model, request, prompt.shape[1], device)
        self.config = config
        self.do_sample = bool(config.do_sample)
        # `generate`'s own processor list for a single unpadded row (its attention mask is all ones)
        self.processors = model._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt.shape[1], encoder_input_ids=prompt,
            device=device, model_kwargs={"attention_mask": torch.ones_like(prompt)})
        self.max_new_tokens = config.max_length - prompt.shape[1]
        positions = getattr(model.config, "max_position_embeddings", None)
        if request.max_new_tokens is None and positions:
            self.max_new_tokens = min(self.max_new_tokens, positions - prompt.shape[1])
        if self.max_new_tokens < 1:
            raise ServingError(f"The prompt has {prompt.shape[1]} tokens, which leaves no room for new tokens within "
                               f"the model's generation length ({config.max_length}) and positions ({positions}); "
                               "send `max_new_tokens` or a shorter prompt.")
        eos = config._eos_token_tensor
        self.stop_ids = {int(t) for t in (eos.tolist() if eos is not None else [])} | {
            int(t) for t in request.stop_token_ids}
        pad = config._pad_token_tensor
        self.pad_id = int(pad) if pad is not None else pad_token_id(model)
        self.generator = None
        if self.do_sample:
            self.generator = torch.Generator()
            if request.seed is not None:
                self.generator.manual_seed(request.seed)
            else:
                self.generator.seed()

    def __call__(self, ids: torch.Tensor, logits: torch.Tensor) -> tuple[int, float]:
        """(next token, its log-probability under the processed distribution) from the row's ids so far
        (`[tokens]`) and its next-token logits (`[vocab]`)."""
        scores = self.processors(ids[None], logits[None].float())[0]
        if self.do_sample:
            token = int(torch.multinomial(torch.softmax(scores, -1).cpu(), 1, generator=self.generator))
        else:
            token = int(scores.argmax())
        return token, float(torch.log_softmax(scores, -1)[token])


def generation_config(model: nn.Module, request: GenerationRequest, prompt_length: int,
                      device: torch.device) -> GenerationConfig:
    """The `GenerationConfig` that `model.generate(prompt, **request parameters)` would decode with: the model's
    own config updated with the request's parameters, lengths resolved against the prompt, special tokens as
    tensors. Uses `GenerationMixin`'s own preparation steps, so it stays what `generate` does."""
    kwargs: dict[str, Any] = {"do_sample": request.do_sample}
    if request.max_new_tokens is not None:
        kwargs["max_new_tokens"] = request.max_new_tokens
    if request.do_sample:
        kwargs.update(temperature=request.temperature, top_k=request.top_k or 0, top_p=request.top_p or 1.0)
    config, _ = model._prepare_generation_config(None, **kwargs)
    # `generate` treats max_length / min_length as defaults unless passed as arguments (requests never pass them)
    model._prepare_generated_length(config, has_default_max_length=config.max_length is not None,
                                    has_default_min_length=config.min_length is not None,
                                    model_input_name="input_ids", input_ids_length=prompt_length, inputs_tensor=None)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=device)
    return config


@dataclass
class DecodeRow:
    """One prompt being decoded: its model, sampler, and the tokens so far."""

    request: GenerationRequest
    served: ServedModel
    sampler: RowSampler
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def result(self) -> GenerationResult:
        return GenerationResult(token_ids=list(self.generated), finish_reason=self.finish_reason or "length",
                                logprobs=list(self.logprobs))


class DecodeBatch:
    """Sequences decoded together (see the module docstring); a new batch's first `forward` is its prefill.

    Args:
        engine (`ServingEngine`): the engine whose models the sequences use.
        sequences (`list[DecodeRow]`): the rows, in order.
    """

    def __init__(self, engine: ServingEngine, sequences: list[DecodeRow]) -> None:
        self.engine = engine
        self.sequences = list(sequences)
        self.device = execution_device(engine.base_layout.embeddings[0])
        self.mask = torch.zeros(len(self.sequences), 0, dtype=torch.long, device=self.device)
        self.errors: dict[int, Exception] = {}  # the last forward's failed rows (their model's forward raised)
        self._build(None)

    def __len__(self) -> int:
        return len(self.sequences)

    # ------------------------------------------------------------------------------------------ membership
    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (finished, failed and cancelled ones leave the batch)."""
        kv = self._row_kv(rows)  # only the kept rows: a failed model's cache may be half-updated
        self.sequences = [self.sequences[i] for i in rows]
        self.mask = self.mask[rows]
        self.errors = {}
        self._build(kv)

    def extend(self, other: DecodeBatch) -> None:
        """Add the rows of `other` (prefilled, same engine), left-padding both to a common length."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        kv = [_left_pad_row(row, length) for row in (self._row_kv() or []) + (other._row_kv() or [])]
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)])
        self.sequences += other.sequences
        self._build(kv or None)

    def _row_kv(self, rows: list[int] | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """Per row (all, or `rows`), per layer: its keys and values `[heads, tokens, head_dim]` (`None` before the
        prefill)."""
        if self.mask.shape[1] == 0:
            return None
        rows = range(len(self.sequences)) if rows is None else rows
        return [[self._layer_of(i, layer) for layer in range(self.engine.num_blocks)] for i in rows]

    def _layer_of(self, i: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._owner(i, layer)
        row = self.slots[key][i]
        cached = self.caches[key].layers[layer]
        return cached.keys[row], cached.values[row]

    def _owner(self, i: int, layer: int) -> tuple[Any, ...]:
        served = self.sequences[i].served
        if served.shares_prefix and layer < served.boundary:
            return ("prefix",) if layer < self.k_min else ("advance", served.boundary)
        return ("model", served.name)

    def _build(self, kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None) -> None:
        """Group the rows (who runs which layers) and give each group a KV cache holding its rows' past."""
        if kv is not None and len(kv):  # drop the columns where every row is padding
            first = int((self.mask.sum(0) > 0).nonzero()[0])
            if first:
                self.mask = self.mask[:, first:]
                kv = [[(k[:, first:], v[:, first:]) for k, v in row] for row in kv]
        engine, sequences, num_blocks = self.engine, self.sequences, self.engine.num_blocks
        self.clock = Clock(self.mask.shape[1])
        self.shared_rows = [i for i, s in enumerate(sequences) if s.served.shares_prefix]
        self.k_min = min((sequences[i].served.boundary for i in self.shared_rows), default=0)
        self.by_boundary: dict[int, list[int]] = defaultdict(list)
        for i in self.shared_rows:
            if sequences[i].served.boundary > self.k_min:
                self.by_boundary[sequences[i].served.boundary].append(i)
        self.by_model: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(sequences):
            self.by_model[s.served.name].append(i)
        self.members: dict[tuple[Any, ...], list[int]] = {}
        self.caches: dict[tuple[Any, ...], Any] = {}
        layers: dict[tuple[Any, ...], range] = {}
        if self.shared_rows:
            self.members[("prefix",)] = self.shared_rows
            self.caches[("prefix",)] = partial_cache(engine.base, num_blocks, 0, self.clock)
            layers[("prefix",)] = range(self.k_min)
        for boundary, rows in self.by_boundary.items():
            self.members[("advance", boundary)] = rows
            self.caches[("advance", boundary)] = partial_cache(engine.base, num_blocks, self.k_min, self.clock)
            layers[("advance", boundary)] = range(self.k_min, boundary)
        self.served = {s.served.name: s.served for s in sequences}  # removing a model leaves its rows running
        for name, rows in self.by_model.items():
            served = self.served[name]
            skipped = served.boundary if served.shares_prefix else 0
            self.members[("model", name)] = rows
            self.caches[("model", name)] = partial_cache(served.model, num_blocks, skipped, self.clock)
            layers[("model", name)] = range(skipped, num_blocks)
        self.slots = {key: {i: row for row, i in enumerate(rows)} for key, rows in self.members.items()}
        if kv is None:
            return
        for key, rows in self.members.items():
            for layer in layers[key]:
                fill_layer(self.caches[key].layers[layer], torch.stack([kv[i][layer][0] for i in rows]),
                           torch.stack([kv[i][layer][1] for i in rows]))

    # ------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        """One step for every row: the prompts on the first call (prefill), else each row's last token. Returns the
        next-token logits `[rows, vocab]` (float32). Rows whose model's forward raised get NaN logits and their error
        in `self.errors`; they must leave the batch (`keep`) before the next step.

        Raises:
            `Exception`: the shared prefix's forward failed, or the forward of the one model every row uses.
        """
        engine, sequences = self.engine, self.sequences
        if self.mask.shape[1] == 0:  # prefill: left-padded prompts
            length = max(len(s.request.input_ids) for s in sequences)
            ids = torch.full((len(sequences), length), sequences[0].sampler.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(sequences):
                n = len(s.request.input_ids)
                ids[row, length - n:] = torch.as_tensor(list(s.request.input_ids), dtype=torch.long)
                mask[row, length - n:] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        else:
            ids = torch.tensor([[s.generated[-1]] for s in sequences], dtype=torch.long, device=self.device)
            positions = self.mask.sum(-1, keepdim=True)
            mask = torch.cat([self.mask, self.mask.new_ones(len(sequences), 1)], dim=-1)
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        states: dict[int, torch.Tensor] = {}
        if self.shared_rows:
            prefix = _boundary_states(engine.base_runner, engine.base, _rows(step, self.shared_rows), self.k_min,
                                      self.caches[("prefix",)])
            for row, i in enumerate(self.shared_rows):
                states[i] = prefix[row]
            for boundary, rows in self.by_boundary.items():
                start = torch.stack([states[i] for i in rows])
                advanced = _boundary_states(engine.base_runner, engine.base, _rows(step, rows), boundary,
                                            self.caches[("advance", boundary)], start=(self.k_min, start))
                for row, i in enumerate(rows):
                    states[i] = advanced[row]
        logits = torch.empty(len(sequences), _vocab_size(sequences[0].served.model), device=self.device)
        self.errors = {}
        for name, rows in self.by_model.items():
            try:
                logits[rows] = _suffix_logits(self.served[name], _rows(step, rows), states, rows,
                                              self.caches[("model", name)]).to(self.device)
            except Exception as error:  # one fine-tune's forward: only its rows fail
                if len(rows) == len(sequences):
                    raise
                logger.error("The forward of model %r failed; its %d rows fail.", name, len(rows), exc_info=error)
                logits[rows] = float("nan")
                self.errors.update(dict.fromkeys(rows, error))
        self.clock.past = mask.shape[1]
        self.mask = mask
        return logits


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))


def _left_pad_row(row: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> list[tuple[torch.Tensor, ...]]:
    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, length - t.shape[-2], 0))

    return [(pad(k), pad(v)) for k, v in row]


def _boundary_states(runner, model, inputs: dict[str, Any], boundary: int, cache, start=None) -> torch.Tensor:
    kwargs = {**inputs, _cache_arg(model): cache, "use_cache": True}
    return runner.boundary_states(kwargs, boundary, start=start)


def _suffix_logits(served: ServedModel, inputs: dict[str, Any], states: dict[int, torch.Tensor], rows: list[int],
                   cache) -> torch.Tensor:
    model = served.model
    kwargs = {**inputs, _cache_arg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    if served.shares_prefix:
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
