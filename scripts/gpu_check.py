"""Every check of issue 11 that needs a GPU, in one run that prints one summary (`scripts/gpu_check.sh`).

MiniLM (6 blocks) on Rotten Tomatoes snippets, small subsets, so that the whole script takes a few minutes:
1. `device_map`: blocks 0-2 offloaded by Accelerate (to CPU on a GPU machine, to disk without one), the rest on
   the main device; fixed boundary 3 with the cache: eval loss against the same training on an undivided model.
2. Accelerator memory before and after `offload_frozen_blocks` moves frozen blocks 0-3 off the GPU.
3. Median step time (synchronised): full fine-tuning, boundary 4 frozen without the cache, with the cache.
4. `cache="auto"` verdicts at boundaries 1 and 4 (reading vs recomputing, as logged).
5. bf16 training: eval loss from the cache against recomputed, both under bf16 autocast.
6. fp16 without clipping (`max_grad_norm=0`): the gradient norms the policy reads are unscaled (same order as an
   fp32 run's, not multiplied by the loss scale, 65536 at the start).
7. FSDP2 on one GPU (world size 1, `torch.distributed.run` in a subprocess): Trainer shards MiniLM through Accelerate
   (one `fully_shard` per block), gradnorm freezing mid-run with the cache on; the blocks must hold DTensor parameters;
   parameter, gradient and optimizer bytes by boundary; a suffix saved from the sharded model and loaded onto its full
   checkpoint against the sharded model's logits. On the CPU Accelerate ignores `fsdp=`, so the dry run switches its
   state to FSDP itself (as tests/fsdp_worker.py does).

Without a GPU it runs the same checks on the CPU (memory check skipped) with fewer examples: a dry run.

    python scripts/gpu_check.py [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import dispatch_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_freeze import FreezeCallback, FreezeConfig, FreezeTrainer, assets, freeze_prefix, get_layout  # noqa: E402
from hf_freeze.offload import offload_frozen_blocks  # noqa: E402

CUDA = torch.cuda.is_available()


class SyncedStepTimer(TrainerCallback):
    """Wall time of each optimizer step, with the device synchronised at both ends."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


class Verdicts(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "cache at boundary" in message:
            self.lines.append(message.replace("hf_freeze: ", ""))


def data(n_train: int, n_eval: int):
    tokenizer = AutoTokenizer.from_pretrained(assets.model_path("minilm"))
    splits = assets.rotten_tomatoes()
    train = splits["train"].select(range(n_train)).map(lambda b: tokenizer(b["text"], truncation=True,
                                                                          max_length=64), batched=True)
    test = splits["test"].select(range(n_eval)).map(lambda b: tokenizer(b["text"], truncation=True,
                                                                       max_length=64), batched=True)
    return train.remove_columns("text"), test.remove_columns("text"), DataCollatorWithPadding(tokenizer)


def model():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(assets.model_path("minilm"), num_labels=2)


def args(out: str, epochs: float = 2, **overrides) -> TrainingArguments:
    values = dict(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=32,
                  per_device_eval_batch_size=64, learning_rate=5e-5, report_to="none", save_strategy="no",
                  disable_tqdm=True, seed=0, logging_steps=1000, use_cpu=not CUDA)
    values.update(overrides)
    return TrainingArguments(**values)


def check_device_map(out: str, train, test, collator) -> dict:
    offloaded, main = ("cpu", 0) if CUDA else ("disk", "cpu")
    device_map = {"bert.embeddings": main, "bert.pooler": main, "classifier": main}
    device_map.update({f"bert.encoder.layer.{i}": offloaded if i < 3 else main for i in range(6)})
    split = dispatch_model(model(), device_map=device_map, offload_dir=f"{out}/offload")
    results = {}
    for name, net in (("device_map", split), ("one_device", model())):
        trainer = FreezeTrainer(model=net, args=args(f"{out}/{name}"), train_dataset=train, eval_dataset=test,
                                data_collator=collator, freeze_config=FreezeConfig(policy="fixed", boundary=3,
                                                                                    cache="on"))
        trainer.train()
        results[name] = {"eval_loss": trainer.evaluate()["eval_loss"], "hits": trainer.boundary_states.stats.hits}
    meta = split.bert.encoder.layer[0].attention.self.query.weight.device.type
    return {"blocks 0-2 on": f"{offloaded} (parameters on {meta})", **results,
            "eval_loss_diff": abs(results["device_map"]["eval_loss"] - results["one_device"]["eval_loss"])}


def check_memory(out: str, train, test, collator) -> dict:
    device = "cuda" if CUDA else "cpu"  # on the CPU: the same code, no memory figures
    net = model().to(device).eval()
    freeze_prefix(net, 4)
    batch = {k: v.to(device) for k, v in collator([test[i] for i in range(16)]).items() if k != "labels"}
    with torch.no_grad():
        expected = net(**batch).logits
    before = torch.cuda.memory_allocated() if CUDA else 0
    moved = offload_frozen_blocks(net, get_layout(net), 4, "cpu")
    after = torch.cuda.memory_allocated() if CUDA else 0
    with torch.no_grad():
        max_logit_diff = (net(**batch).logits - expected).abs().max().item()  # weights loaded back for a forward
    trainer = FreezeTrainer(model=model(), args=args(f"{out}/offload", epochs=2), train_dataset=train,
                            eval_dataset=test, data_collator=collator,
                            freeze_config=FreezeConfig(policy="fixed", boundary=4, cache="on", offload_frozen="cpu"))
    trainer.train()
    return {"allocated_before_mb": before / 2**20, "allocated_after_mb": after / 2**20,
            "freed_mb": (before - after) / 2**20, "reported_freed_mb": moved["accelerator_bytes_freed"] / 2**20,
            "max_logit_diff_after_offload": max_logit_diff,
            "trainer_offload_eval_loss": trainer.evaluate()["eval_loss"],
            "trainer_offloaded": trainer.freeze_callback.timeline[0].get("accelerator_bytes_freed")}


def check_step_time(out: str, train, collator) -> dict:
    rows = {}
    for name in ("full", "frozen_4", "cached_4"):
        timer = SyncedStepTimer()
        common = dict(model=model(), args=args(f"{out}/{name}"), train_dataset=train, data_collator=collator,
                      callbacks=[timer])
        if name == "full":
            trainer = Trainer(**common)
        else:
            config = FreezeConfig(policy="fixed", boundary=4, cache="on" if name == "cached_4" else "off")
            trainer = FreezeTrainer(freeze_config=config, **common)
        trainer.train()
        second_epoch = timer.seconds[len(timer.seconds) // 2:]  # the cache is full from epoch 2 on
        rows[name] = statistics.median(second_epoch)
    return {f"{k}_median_step_ms": 1000 * v for k, v in rows.items()}


def check_auto(out: str, train, collator) -> dict:
    handler = Verdicts()
    logging.getLogger("hf_freeze").addHandler(handler)
    logging.getLogger("hf_freeze").setLevel(logging.INFO)
    for boundary in (1, 4):
        FreezeTrainer(model=model(), args=args(f"{out}/auto{boundary}"), train_dataset=train, data_collator=collator,
                      freeze_config=FreezeConfig(policy="fixed", boundary=boundary, cache="auto")).train()
    logging.getLogger("hf_freeze").removeHandler(handler)
    return {"verdicts": handler.lines}


def check_bf16(out: str, train, test, collator) -> dict:
    if CUDA and not torch.cuda.is_bf16_supported():
        return {"skipped": "no bf16 on this GPU"}
    trainer = FreezeTrainer(model=model(), args=args(f"{out}/bf16", epochs=1, bf16=True), train_dataset=train,
                            eval_dataset=test, data_collator=collator,
                            freeze_config=FreezeConfig(policy="fixed", boundary=3, cache="on"))
    trainer.train()
    computed = trainer.evaluate()["eval_loss"]  # misses: computed, and stored
    hits_before = trainer.boundary_states.stats.hits
    cached = trainer.evaluate()["eval_loss"]  # every example read from the cache
    return {"eval_loss_computed": computed, "eval_loss_cached": cached, "relative_diff": abs(cached - computed)
            / abs(computed), "eval_hits": trainer.boundary_states.stats.hits - hits_before}


def check_fp16(out: str, train, collator) -> dict:
    largest = {"note": "" if CUDA else "dry run: no loss scaling on the CPU"}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        callback = FreezeCallback(FreezeConfig(policy="gradnorm", interval_steps=4))
        trainer = Trainer(model=model(), args=args(f"{out}/{name}", epochs=1, fp16=fp16, max_grad_norm=0.0),
                          train_dataset=train, data_collator=collator, callbacks=[callback])
        seen = []
        trainer.add_callback(_NormSpy(callback, seen))
        trainer.train()
        largest[name] = max(seen) if seen else None
    return {"largest_unit_norm_fp32": largest["fp32"], "largest_unit_norm_fp16": largest["fp16"],
            "note": largest["note"]}


class _NormSpy(TrainerCallback):
    """After each step, the largest per-unit gradient norm the freeze policy has accumulated so far."""

    def __init__(self, callback: FreezeCallback, seen: list) -> None:
        self.callback, self.seen = callback, seen

    def on_optimizer_step(self, args, state, control, **kwargs):
        policy = self.callback.policy
        if policy is not None and policy.window_steps:
            self.seen.append(max(policy.window_sum) / policy.window_steps)


def check_fsdp2(out: str) -> dict:
    """Runs `fsdp2_worker` under `torch.distributed.run` (one process) and returns what it wrote."""
    import os
    import subprocess

    result = Path(out) / "fsdp2.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
               "--fsdp2-worker", str(result)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=os.environ.copy())
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-2000:]}
    return json.loads(result.read_text())


class _FsdpTrainer(FreezeTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if not CUDA:  # Accelerate 1.15 enables FSDP on GPU set-ups only
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            self.accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


class _RankBytes(TrainerCallback):
    """Per optimizer step: the boundary, and the bytes this rank holds in parameters, gradients and optimizer state."""

    def __init__(self) -> None:
        self.steps: list[tuple[int | None, dict]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        from hf_freeze import frozen_boundary
        from hf_freeze.fsdp import rank_memory

        self.steps.append((frozen_boundary(model), rank_memory(model, optimizer)))


def fsdp2_worker(path: str) -> None:
    from torch.distributed.tensor import DTensor

    from hf_freeze.checkpoint import load_suffix, save_pretrained, save_suffix

    n_train, n_eval = (512, 64) if CUDA else (64, 16)
    train, test, collator = data(n_train, n_eval)
    with tempfile.TemporaryDirectory() as out:
        fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
                    per_device_train_batch_size=32 if CUDA else 8)
        trainer = _FsdpTrainer(model=model(), args=args(f"{out}/fsdp", epochs=2, **fsdp), train_dataset=train,
                               data_collator=collator,
                               freeze_config=FreezeConfig(policy="gradnorm", interval_steps=2, cache="on"))
        timer, memory = SyncedStepTimer(), _RankBytes()
        trainer.add_callback(timer)
        trainer.add_callback(memory)
        trainer.train()
        sharded = trainer.model
        blocks = get_layout(sharded).blocks
        by_boundary: dict[str, dict] = {}
        for boundary, held in memory.steps:  # world size 1: nothing is reduce-scattered, but state is released
            by_boundary.setdefault(str(boundary), held)
        sharded.eval()
        batch = {k: v.to(trainer.args.device) for k, v in collator([test[i] for i in range(8)]).items()
                 if k != "labels"}
        with torch.no_grad():
            expected = sharded(**batch).logits.float().cpu()
        save_suffix(sharded, f"{out}/suffix")
        save_pretrained(sharded, f"{out}/full")
        base = AutoModelForSequenceClassification.from_pretrained(f"{out}/full").to(trainer.args.device)
        loaded = load_suffix(f"{out}/suffix", base=base)
        with torch.no_grad():
            got = loaded(**batch).logits.float().cpu()
        summary = {
            "blocks_sharded": all(isinstance(p, DTensor) for b in blocks for p in b.parameters()),
            "model_class": type(sharded).__name__,
            "rank_bytes_by_boundary": by_boundary,
            "timeline": [(e["step"], e["boundary"]) for e in trainer.freeze_callback.timeline],
            "cache_hits": trainer.boundary_states.stats.hits if trainer.boundary_states else 0,
            "median_step_ms": 1000 * statistics.median(timer.seconds),
            "suffix_logits_max_diff": float((got - expected).abs().max()),
        }
    Path(path).write_text(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the summary as JSON here")
    parser.add_argument("--fsdp2-worker", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.fsdp2_worker:
        fsdp2_worker(cli.fsdp2_worker)
        return
    started = time.perf_counter()
    n_train, n_eval = (2048, 512) if CUDA else (128, 64)
    train, test, collator = data(n_train, n_eval)
    summary = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu (dry run)", "torch": torch.__version__,
               "train_examples": n_train}
    with tempfile.TemporaryDirectory() as out:
        for name, check in (("device_map", lambda: check_device_map(out, train, test, collator)),
                            ("memory", lambda: check_memory(out, train, test, collator)),
                            ("step_time", lambda: check_step_time(out, train, collator)),
                            ("cache_auto", lambda: check_auto(out, train, collator)),
                            ("bf16", lambda: check_bf16(out, train, test, collator)),
                            ("fp16", lambda: check_fp16(out, train, collator)),
                            ("fsdp2", lambda: check_fsdp2(out))):
            try:
                summary[name] = check()
            except Exception as error:  # one failed check must not hide the others' results
                summary[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"gpu_check: {name} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    summary["seconds"] = time.perf_counter() - started
    text = json.dumps(summary, indent=2, default=float)
    print("==== hf_freeze gpu_check summary ====")
    print(text)
    if cli.out:
        Path(cli.out).write_text(text)


if __name__ == "__main__":
    main()
