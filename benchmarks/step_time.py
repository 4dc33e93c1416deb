"""Training-step time at boundary k: cached vs recomputed prefix vs the ideal, side by side in one run.

For each boundary k, on the same real batches:
- `full`: a training step of the unfrozen model (forward, backward, AdamW step);
- `frozen`: the step with the embeddings and blocks [0, k) frozen, the prefix recomputed every step;
- `cached`: the same frozen model, its boundary states read from a warm in-memory `PrefixCache`;
- `ideal`: a copy of the model that holds only blocks [k, L) and the head (its embeddings frozen and kept: a
  table lookup), i.e. what a perfect cache could at best achieve.

    python benchmarks/step_time.py --model minilm --boundaries 2 4 5 6
    python benchmarks/step_time.py --model smollm2 --batch-size 8 --boundaries 10 20 25 29
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
from common import markdown_table, median_seconds, stamp, write_results
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from hf_freeze import PrefixCache, assets, find_layout, freeze_prefix, get_layout
from hf_freeze.cache.batch import BatchCache
from hf_freeze.cache.runner import PrefixRunner
from hf_freeze.data import causal_lm_data, classification_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm | smollm2 | a path or Hub name")
    parser.add_argument("--task", choices=["classification", "causal_lm"], default=None)
    parser.add_argument("--boundaries", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="distinct real batches cycled through")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per configuration (median reported)")
    parser.add_argument("--name", default=None, help="results file name (default: step_time_<model>)")
    args = parser.parse_args()
    task = args.task or ("causal_lm" if args.model == "smollm2" else "classification")
    torch.manual_seed(0)

    path = assets.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "classification":
        data = classification_data("rotten_tomatoes", tokenizer)["train"]
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        data = causal_lm_data("rotten_tomatoes", tokenizer)["train"]
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base.config.pad_token_id = tokenizer.pad_token_id
    batches = make_batches(data, tokenizer, task, args.batch_size, args.batches)
    num_blocks = find_layout(base).num_blocks  # find, not get: copies of `base` must not inherit a remembered layout
    boundaries = args.boundaries or sorted({0, num_blocks // 3, num_blocks // 2, 2 * num_blocks // 3, num_blocks - 1})

    full = time_step(copy.deepcopy(base), batches, args.repeats)
    rows = []
    for k in boundaries:
        frozen_model = copy.deepcopy(base)
        freeze_prefix(frozen_model, k)
        frozen = time_step(frozen_model, batches, args.repeats)
        row = {"boundary k": k, "full s": full, "frozen s": frozen, "full/frozen": full / frozen}
        if k >= 1:  # boundary 0 (embeddings only) has no block output to cache
            cached = time_step(frozen_model, batches, args.repeats, states=warm_cache(frozen_model, batches, k),
                               boundary=k)
            row.update({"cached s": cached, "full/cached": full / cached})
        # measured at boundary 0 too, like any other boundary: that ideal model holds every block
        row["ideal s"] = time_step(suffix_only(base, k), batches, args.repeats)
        if k >= 1:
            row["cached/ideal"] = row["cached s"] / row["ideal s"]
        rows.append(row)
        print(rows[-1], flush=True)
    columns = ["boundary k", "full s", "frozen s", "cached s", "ideal s", "full/frozen", "full/cached", "cached/ideal"]
    info = stamp()
    title = f"Step time, {args.model} ({num_blocks} blocks, {task}), batch {args.batch_size}, median of {args.repeats}"
    write_results(args.name or f"step_time_{args.model}", {"stamp": info, "rows": rows, "title": title},
                  f"**{title}** ({info['machine']}, commit {info['commit']})\n\n" + markdown_table(rows, columns))


def make_batches(data, tokenizer, task: str, batch_size: int, count: int) -> list[dict]:
    collator = DataCollatorWithPadding(tokenizer)
    batches = []
    for i in range(count):
        features = [data[j] for j in range(i * batch_size, (i + 1) * batch_size)]
        batch = collator(features)
        if task == "causal_lm":
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batch["keys"] = torch.arange(i * batch_size, (i + 1) * batch_size)
        batches.append(dict(batch))
    return batches


def warm_cache(model, batches: list[dict], boundary: int) -> BatchCache:
    layout = get_layout(model)
    provider = BatchCache(PrefixRunner(model, layout), PrefixCache(model, layout), label_names=["labels"])
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "keys"}
        provider.states_for(inputs, batch["keys"], boundary)
    return provider


def time_step(model, batches: list[dict], repeats: int, states: BatchCache | None = None,
              boundary: int | None = None) -> float:
    model.train()
    # the optimizer Trainer uses by default (adamw_torch_fused)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    cycle = itertools.cycle(batches)

    def step() -> None:
        batch = next(cycle)
        inputs = {k: v for k, v in batch.items() if k != "keys"}
        if states is None:
            loss = model(**inputs).loss
        else:
            padded = states.states_for(inputs, batch["keys"], boundary)
            with states.runner.inject_states(padded, boundary):
                loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, repeats, warmup=2)


def suffix_only(base, boundary: int):
    """A copy holding only blocks [boundary, L) and the head; embeddings frozen as in the frozen model (untied from
    a tied head, so the head trains as it does there)."""
    model = copy.deepcopy(base)
    layout = find_layout(model)
    parent_path, _, attribute = layout.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, torch.nn.ModuleList(list(layout.blocks)[boundary:]))
    for name in ("num_hidden_layers", "n_layer", "n_layers"):
        if hasattr(model.config, name):
            setattr(model.config, name, layout.num_blocks - boundary)
    # The kept blocks still carry their original layer indices, which a KV cache sized for the shorter model would
    # reject; training needs no KV cache anyway.
    model.config.use_cache = False
    freeze_prefix(model, 0)
    return model


if __name__ == "__main__":
    main()
