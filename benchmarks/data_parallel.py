"""The prefix cache and the all-reduce under data parallelism: 2 ranks (torchrun, gloo on the CPU), MiniLM on a
Rotten Tomatoes subset, the default gradnorm policy (or a fixed boundary) with the cache on, with and without
rank-stable sharding.

Reported per run: cache hits (state read at the current boundary), advanced (read at an older boundary and run
through the blocks frozen since) and misses of training reads on each rank, evaluation accuracy, final boundary, and the
bytes DDP all-reduced per optimizer step at each boundary (FreezeTrainer rebuilds DDP after each freeze; a
communication hook counts the bytes). No timings.

    python benchmarks/data_parallel.py                      # 1024 train / 512 eval examples, 4 epochs
    python benchmarks/data_parallel.py --policy fixed         # blocks 0-3 frozen from the start
    python benchmarks/data_parallel.py --train 256 --eval 64 --epochs 2 --name data_parallel_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, markdown_table, stamp, write_results
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    TrainingArguments,
)

from hf_freeze import FreezeConfig, FreezeTrainer, assets, frozen_boundary


class BytesByBoundary(TrainerCallback):
    def __init__(self, trainer: FreezeTrainer) -> None:
        self.trainer, self.by_boundary, self._boundary = trainer, {}, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._boundary = frozen_boundary(model)

    def on_step_end(self, args, state, control, **kwargs):
        sent = self.trainer.active_ddp.meter.step_bytes
        if sent:
            self.by_boundary.setdefault(str(self._boundary), sent[-1])


def worker(cli) -> None:
    torch.manual_seed(cli.seed)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("minilm"))
    splits = assets.rotten_tomatoes()

    def tokenize(split, n):
        data = split.shuffle(seed=cli.seed).select(range(n))
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True,
                        remove_columns=["text"])

    train, test = tokenize(splits["train"], cli.train), tokenize(splits["test"], cli.eval)
    results = {}
    for name, stable in (("rank-stable", True), ("per-epoch", False)):
        torch.manual_seed(cli.seed)
        model = AutoModelForSequenceClassification.from_pretrained(assets.model_path("minilm"), num_labels=2)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, num_train_epochs=cli.epochs, per_device_train_batch_size=cli.batch_size,
                                     per_device_eval_batch_size=64, learning_rate=5e-5, seed=cli.seed,
                                     report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
            trainer = FreezeTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                    data_collator=DataCollatorWithPadding(tokenizer),
                                    compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1)
                                                                                  == p.label_ids).mean())},
                                    freeze_config=FreezeConfig(policy=cli.policy, cache="on",
                                                               boundary=4 if cli.policy == "fixed" else None,
                                                               rank_stable_sharding=stable))
            meter = BytesByBoundary(trainer)
            trainer.add_callback(meter)
            trainer.train()
            stats = trainer.boundary_states.stats
            reads = {"hits": stats.hits, "advanced": stats.advanced, "misses": stats.misses}
            metrics = trainer.evaluate()
        results[name] = {**reads, "accuracy": metrics["eval_accuracy"], "boundary": frozen_boundary(model),
                         "allreduce_bytes_by_boundary": meter.by_boundary}
    Path(cli.out, f"rank{os.environ['RANK']}.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--policy", choices=["gradnorm", "fixed"], default="gradnorm",
                        help="fixed: blocks 0-3 frozen from the start (hit rates without the policy's own variation)")
    parser.add_argument("--name", default=None, help="default: data_parallel_minilm_<policy>")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    cli.name = cli.name or f"data_parallel_minilm_{cli.policy}"
    if cli.worker:
        worker(cli)
        sys.stdout.flush()
        os._exit(0)  # torch 2.13 + gloo sometimes aborts in interpreter teardown (see tests/ddp_worker.py)
    with tempfile.TemporaryDirectory() as out:
        forwarded = [f"--train={cli.train}", f"--eval={cli.eval}", f"--epochs={cli.epochs}",
                     f"--batch-size={cli.batch_size}", f"--seed={cli.seed}", f"--policy={cli.policy}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--worker", "--out", out, *forwarded], check=True, env=env, cwd=ROOT)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = []
    for name in ranks[0]:
        runs = [r[name] for r in ranks]
        reads = sum(r["hits"] + r["advanced"] + r["misses"] for r in runs)
        rows.append({"sharding": name, "hit rate": sum(r["hits"] for r in runs) / reads,
                     "reuse rate": sum(r["hits"] + r["advanced"] for r in runs) / reads,
                     "hits / advanced / misses (rank 0)": f"{runs[0]['hits']} / {runs[0]['advanced']} / "
                                                           f"{runs[0]['misses']}",
                     "accuracy %": 100 * runs[0]["accuracy"], "final boundary": runs[0]["boundary"],
                     "all-reduce bytes/step by boundary": ", ".join(
                         f"{b}: {v:,}" for b, v in runs[0]["allreduce_bytes_by_boundary"].items())})
    title = (f"2 ranks (gloo, CPU), MiniLM, {cli.train} train / {cli.eval} eval Rotten Tomatoes examples, "
             f"{cli.epochs:g} epochs, batch {cli.batch_size} per rank, {cli.policy}, cache on, seed {cli.seed}")
    columns = ["sharding", "hit rate", "reuse rate", "hits / advanced / misses (rank 0)", "accuracy %",
               "final boundary", "all-reduce bytes/step by boundary"]
    write_results(cli.name, {"stamp": stamp(), "args": vars(cli), "ranks": ranks, "rows": rows, "title": title},
                  f"**{title}**\n\n" + markdown_table(rows, columns))


if __name__ == "__main__":
    main()
