"""Full fine-tuning vs PEFT LoRA vs freezing (no cache) vs FreezeTrainer (freezing + cache), side by side.

Same model, data, seed and epochs for every method; each method runs in its own process (clean peak memory).
Reported per method: training time (sum of optimizer-step wall times; evaluation excluded), the training time
until the eval score first came within the target of full fine-tuning's final score, final score, bytes of
activations saved for backward and of optimizer state at the end of training, peak memory, and the speed-up that
the method's own freeze timeline would give with ideal machinery (each step as cheap as a model holding only the
active blocks).

    python benchmarks/finetune.py                                   # MiniLM on Rotten Tomatoes (3 epochs)
    python benchmarks/finetune.py --task causal_lm --max-train-samples 1000 --max-eval-samples 200
    python benchmarks/finetune.py --model mpnet                     # 12 blocks; meant for a GPU
    python benchmarks/finetune.py --methods full cache:gradnorm:percentile=30,max_boundary=4   # policy knobs
    python benchmarks/finetune.py --methods full:epochs=1 full:learning_rate=1e-4   # run knobs: the frontier
    python benchmarks/finetune.py --dataset convention_speeches --batch-size 8 --max-length 256   # 10 epochs
    python benchmarks/finetune.py --processes 2 --fsdp --methods full cache:gradnorm   # FSDP2 over 2 processes

A method may carry run knobs (`epochs`, `learning_rate`) beside its policy knobs: `full:epochs=1` is full
fine-tuning for one epoch with its own schedule, kept as `<name>_full_epochs1.json` next to `<name>_full.json`.
`--epochs` / `--learning-rate` away from the workload's default become the same knobs, so a run's file name always
says how it differs from the workload's protocol.

With `--processes N` each method runs under `torch.distributed.run` (DDP, or FSDP2 with `--fsdp`: one `fully_shard` per
block, through Accelerate); rank 0 writes the result. FSDP runs also report the bytes reduce-scattered per optimizer
step and the bytes one rank holds in parameter shards + gradient shards + optimizer state (its peak over the run).
Accelerate 1.15 enables FSDP on GPU set-ups only; on a CPU, `--fsdp` switches Accelerate's state to FSDP itself (as
tests/fsdp_worker.py does), to try the path without GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, markdown_table, stamp, write_results
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_freeze import FreezeCallback, FreezeConfig, FreezeTrainer, frozen_boundary, frozen_parameters, get_layout
from hf_freeze.atomic import write_text_atomic
from hf_freeze.fsdp import ReduceScatterMeter, is_fsdp2, rank_memory
from hf_freeze.optim import optimizer_state_bytes
from hf_freeze.profiling import count_saved_tensor_bytes
from hf_freeze.report import StepTimerCallback

METHODS = ["full", "lora", "freeze:gradnorm", "cache:gradnorm", "cache:schedule", "cache:fixed"]
DEFAULT_EPOCHS = 3.0  # TrainingArguments' default, what users of the other workloads run
DEFAULT_LEARNING_RATE = 5e-5
RUN_KNOBS = ("epochs", "learning_rate")  # method knobs that change the run, not the policy
# workloads whose users run more epochs than TrainingArguments' default: 151 long documents make 19 steps an epoch
# at batch 8, and small-data fine-tuning runs about 10 epochs (the regime AutoFreeze and PipeTransformer report)
WORKLOAD_EPOCHS = {"convention_speeches": 10.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["classification", "causal_lm"], default="classification")
    parser.add_argument("--model", default=None, help="default: minilm (classification) / smollm2 (causal_lm)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--dataset", default=None,
                        help="default: rotten_tomatoes; offline: presidential_debates, convention_speeches (10 "
                             "epochs: 151 long documents), hamlet; or files / a Hub name (hf_freeze.data.load_raw)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate examples to this many tokens")
    parser.add_argument("--epochs", type=float, default=None,
                        help=f"default: the workload's: {DEFAULT_EPOCHS:g} (TrainingArguments'), {WORKLOAD_EPOCHS}")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--lora-learning-rate", type=float, default=5e-4, help="LoRA's usual, higher rate")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--evals", type=int, default=0,
                        help="evaluations during training (for time-to-target); 0: one per epoch, as users run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the per-method results a previous run with the same --name left in results/runs")
    parser.add_argument("--skip-ideal", action="store_true", help="do not time the ideal steps (faster)")
    parser.add_argument("--name", default=None, help="results file name (default: finetune_<model>_<task>)")
    parser.add_argument("--runs-dir", default=str(RESULTS / "runs"), help="where each method's own result is kept")
    parser.add_argument("--processes", type=int, default=1, help="processes per method (torch.distributed.run)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (with --processes > 1)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or ("minilm" if args.task == "classification" else "smollm2")
    args.batch_size = args.batch_size or (32 if args.task == "classification" else 8)
    args.epochs = args.epochs if args.epochs is not None else workload_epochs(args.dataset)
    if args.run_one:
        result = run_one(args, args.run_one)
        if int(os.environ.get("RANK", 0)) == 0:
            write_text_atomic(args.out, json.dumps(result, default=str))
        return
    args.name = args.name or f"finetune_{args.model}_{args.task}"
    runs = Path(args.runs_dir)  # write_text_atomic creates it
    results = {}
    for method in [resolve_method(m, args) for m in args.methods]:
        # each method's result is kept as soon as it exists, so a long benchmark can be resumed with --reuse
        saved = runs / f"{Path(args.name).name}_{method_file_name(method)}.json"
        if args.reuse and saved.exists():
            print(f"==== {method}: reusing {saved} ====", flush=True)
        else:
            print(f"==== {method} ====", flush=True)
            launcher = [sys.executable] if args.processes == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes)]
            command = launcher + [__file__, "--run-one", method, "--out", str(saved)] + forwarded(args)
            subprocess.run(command, check=True, cwd=ROOT)
        results[method] = json.loads(saved.read_text())
        print({k: v for k, v in results[method].items() if k not in ("evals", "timeline", "step_seconds",
                                                                       "boundaries")}, flush=True)
    if args.reuse:
        results.update(other_runs(runs, Path(args.name).name, results))
    report(args, results)


def other_runs(runs: Path, name: str, results: dict) -> dict[str, dict]:
    """The runs of `name` kept in `runs` that `results` lacks, labelled by their file names (`full_epochs1`), so that
    a summary written under `--reuse` covers every run of its workload and seed, not only this invocation's."""
    prefix, have = f"{name}_", {method_file_name(method) for method in results}
    return {saved.stem[len(prefix):]: json.loads(saved.read_text()) for saved in sorted(runs.glob(f"{prefix}*.json"))
            if saved.stem[len(prefix):] not in have}


def method_file_name(method: str) -> str:
    """The method as a file-name part: `cache:budget:target_speedup=3.0,boundary_dropout=0.1` ->
    `cache_budget_target_speedup3.0_boundary_dropout0.1`."""
    return method.replace(":", "_").replace(",", "_").replace("=", "").replace('"', "")


def split_method(method: str) -> tuple[str, str, dict[str, float]]:
    """`(kind, policy, run knobs)` of a method: `cache:gradnorm:percentile=30,epochs=1` -> `("cache",
    "gradnorm:percentile=30", {"epochs": 1.0})`; `full:learning_rate=1e-4` -> `("full", "", {...: 0.0001})`."""
    kind, _, rest = method.partition(":")
    if kind in ("full", "lora"):
        name, knobs = "", rest
    else:
        name, _, knobs = rest.partition(":")
    policy_knobs, run = [], {}
    for item in filter(None, knobs.split(",")):
        key, sep, value = item.partition("=")
        if key in RUN_KNOBS:
            run[key] = float(value)
        elif kind in ("full", "lora"):
            raise ValueError(f"`{method}`: {kind} takes only the run knobs {list(RUN_KNOBS)}, got `{key}`.")
        else:
            policy_knobs.append(item)
    policy = name + (":" + ",".join(policy_knobs) if policy_knobs else "")
    return kind, policy, run


def resolve_method(method: str, args) -> str:
    """The method with its run knobs in one canonical form (`epochs`, then `learning_rate`, each `%g`), those
    `--epochs` / `--learning-rate` set away from the workload's default included: the run's file name then says
    how it differs from the protocol, and `full:learning_rate=1e-4` and `--learning-rate 0.0001` name one run."""
    kind, policy, run = split_method(method)
    if args.epochs != workload_epochs(args.dataset):
        run.setdefault("epochs", args.epochs)
    if args.learning_rate != DEFAULT_LEARNING_RATE and kind != "lora":  # LoRA trains at --lora-learning-rate
        run.setdefault("learning_rate", args.learning_rate)
    if run.get("epochs") == workload_epochs(args.dataset):
        del run["epochs"]
    if run.get("learning_rate") == (args.lora_learning_rate if kind == "lora" else DEFAULT_LEARNING_RATE):
        del run["learning_rate"]
    knobs = [policy.partition(":")[2]] if ":" in policy else []
    knobs += [f"{key}={run[key]:g}" for key in RUN_KNOBS if key in run]
    head = kind if kind in ("full", "lora") else f"{kind}:{policy.partition(':')[0]}"
    return head + (":" + ",".join(filter(None, knobs)) if any(knobs) else "")


def workload_epochs(dataset: str | None) -> float:
    """The epochs the workload's users run: `DEFAULT_EPOCHS`, or the dataset's own count (`WORKLOAD_EPOCHS`)."""
    return WORKLOAD_EPOCHS.get(dataset, DEFAULT_EPOCHS)


def with_run_knobs(args, method: str):
    """A copy of `args` with the method's run knobs applied (`epochs`, `learning_rate`; LoRA's rate for LoRA)."""
    kind, _, run = split_method(method)
    args = argparse.Namespace(**vars(args))
    if "epochs" in run:
        args.epochs = run["epochs"]
    if "learning_rate" in run:
        setattr(args, "lora_learning_rate" if kind == "lora" else "learning_rate", run["learning_rate"])
    return args


def forwarded(args) -> list[str]:
    flags = ["--task", args.task, "--model", args.model, "--epochs", str(args.epochs), "--batch-size",
             str(args.batch_size), "--learning-rate", str(args.learning_rate), "--lora-learning-rate",
             str(args.lora_learning_rate), "--evals", str(args.evals), "--seed", str(args.seed), "--max-length",
             str(args.max_length), "--processes", str(args.processes)] + (["--fsdp"] if args.fsdp else [])
    for name in ("max_train_samples", "max_eval_samples", "dataset"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


class EvalTimeline(TrainerCallback):
    """Records every evaluation with the training time (sum of step times) spent until then."""

    def __init__(self, timer: StepTimerCallback) -> None:
        self.timer, self.evals, self.started = timer, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # wall_seconds: since train() began, evaluations included (an evaluation is recorded once it is done)
        wall = time.perf_counter() - self.started if self.started is not None else None
        self.evals.append({"step": state.global_step, "train_seconds": sum(r.seconds for r in self.timer.records),
                           "wall_seconds": wall,
                           **{k: v for k, v in (metrics or {}).items() if k.startswith("eval_")}})


class AllReduceBytes(TrainerCallback):
    """Bytes DDP would all-reduce at each optimizer step: the gradients of the parameters in its buckets.

    FreezeTrainer rebuilds DDP over the active parameters after each freeze (its communication-hook meter reads
    exactly these bytes: tests/test_distributed.py); a plain Trainer's buckets keep every parameter that trained
    when DDP was built, frozen or not.
    """

    def __init__(self, shrinks: bool) -> None:
        self.shrinks, self.per_step = shrinks, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        frozen = {id(p) for p in frozen_parameters(model)} if not self.shrinks else set()
        self.per_step.append(sum(p.numel() * p.element_size() for p in model.parameters()
                                 if p.requires_grad or id(p) in frozen))


class RankMemory(TrainerCallback):
    """Under FSDP2: bytes reduce-scattered per optimizer step, and the most this rank held in parameter shards +
    gradient shards + optimizer state (read where gradients exist: just before the optimizer step)."""

    def __init__(self) -> None:
        self.meter, self.trainer, self.peak = ReduceScatterMeter(), None, 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        own = getattr(self.trainer, "reduce_scatter_meter", None)  # FreezeTrainer counts them itself
        if own is None and self.meter.attached_to is not model and is_fsdp2(model):
            self.meter.attach(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.peak = max(self.peak, sum(rank_memory(model, optimizer).values()))

    def on_step_end(self, args, state, control, **kwargs):
        if self.meter.attached_to is not None:
            self.meter.end_step()

    def bytes_per_step(self) -> list[int]:
        own = getattr(self.trainer, "reduce_scatter_meter", None)
        return (own if own is not None and own.step_bytes else self.meter).step_bytes


def enable_fsdp_on_cpu(trainer: Trainer) -> None:
    """What Accelerate sets up for FSDP on GPUs (it ignores `fsdp=` on a CPU), so that the model is sharded."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if trainer.args.fsdp_plugin_args is None or torch.cuda.is_available():
        return
    trainer.accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def run_one(args, method: str) -> dict:
    args = with_run_knobs(args, method)
    torch.manual_seed(args.seed)
    if args.task == "classification":
        from hf_freeze.training import ClassificationArguments as Script
        from hf_freeze.training import prepare_text_classification as prepare
    else:
        from hf_freeze.training import CausalLMArguments as Script
        from hf_freeze.training import prepare_causal_lm as prepare
    script = Script(model_name_or_path=args.model, max_train_samples=args.max_train_samples,
                    max_eval_samples=args.max_eval_samples, max_length=args.max_length,
                    **({"dataset": args.dataset} if args.dataset else {}))
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = make_args(args, output_dir, lora=method == "lora", steps=None)
        make_model, common = prepare(script, training_args)
        steps_per_epoch = math.ceil(len(common["train_dataset"]) / args.batch_size)
        max_steps = math.ceil(steps_per_epoch * args.epochs)
        steps = max(1, max_steps // args.evals) if args.evals else None
        model = make_model()
        layout = get_layout(model)
        num_blocks = layout.num_blocks
        wrap = type(layout.blocks[0]).__name__ if args.fsdp else None
        training_args = make_args(args, output_dir, lora=method == "lora", steps=steps, fsdp_wrap=wrap)
        common["args"] = training_args
        timer = StepTimerCallback()
        evals = EvalTimeline(timer)
        allreduce = AllReduceBytes(shrinks=method.startswith("cache"))
        memory = RankMemory()
        trainer = build_trainer(method, model, common, [timer, evals, allreduce, memory], num_blocks, args.task)
        memory.trainer = trainer
        if args.fsdp:
            enable_fsdp_on_cpu(trainer)
        started = time.perf_counter()
        trainer.train()  # what a user waits for: every step, the per-epoch evaluations, the cache's own work
        wall_seconds = time.perf_counter() - started
        final = trainer.evaluate()
        measured = end_of_training_bytes(trainer)
    timeline = next((cb.timeline for cb in trainer.callback_handler.callbacks if isinstance(cb, FreezeCallback)), [])
    return {
        "train_seconds": sum(r.seconds for r in timer.records),
        "wall_seconds": wall_seconds,
        "steps": len(timer.records),
        "step_seconds": [r.seconds for r in timer.records],
        "boundaries": [r.boundary for r in timer.records],
        "final": {k: v for k, v in final.items() if k.startswith("eval_")},
        "evals": evals.evals,
        "timeline": timeline,
        "peak_memory_mb": peak_memory_mb(),
        "num_blocks": num_blocks,
        "allreduce_mb_per_step": sum(allreduce.per_step) / max(len(allreduce.per_step), 1) / 2**20,
        **fsdp_figures(memory, timer),
        **measured,
    }


def fsdp_figures(memory: RankMemory, timer: StepTimerCallback) -> dict:
    """Reduce-scattered MB per step (mean, and per boundary) and one rank's peak MB; empty without FSDP2."""
    sent = memory.bytes_per_step()
    if not sent:
        return {}
    by_boundary: dict[str, list[int]] = {}
    for record, value in zip(timer.records, sent):
        by_boundary.setdefault(str(record.boundary), []).append(value)
    return {"reduce_scatter_mb_per_step": sum(sent) / len(sent) / 2**20,
            "reduce_scatter_mb_by_boundary": {k: v[0] / 2**20 for k, v in by_boundary.items()},
            "rank_peak_mb": memory.peak / 2**20}


def make_args(args, output_dir: str, lora: bool, steps: int | None, fsdp_wrap: str | None = None
              ) -> TrainingArguments:
    # FSDP2, one unit per block (Accelerate's default wrap also takes `_no_split_modules`, e.g. BertEmbeddings, and
    # then fails on torch 2.13: the input embeddings' parameter is already sharded)
    config = {"version": 2, "transformer_layer_cls_to_wrap": [fsdp_wrap]}
    fsdp = {"fsdp": True, "fsdp_config": config} if fsdp_wrap else {}
    if args.processes > 1 and not torch.cuda.is_available():
        fsdp["use_cpu"] = True  # without it, TrainingArguments on a CPU does not see torchrun's process group
    return TrainingArguments(
        **fsdp, output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=4 * args.batch_size, seed=args.seed, report_to="none", save_strategy="no",
        learning_rate=args.lora_learning_rate if lora else args.learning_rate, logging_steps=50,
        eval_strategy="steps" if steps else "epoch", eval_steps=steps, disable_tqdm=True,
    )


def build_trainer(method: str, model, common: dict, callbacks: list, num_blocks: int, task: str) -> Trainer:
    kind, policy, _ = split_method(method)
    if kind == "full":
        return Trainer(model=model, callbacks=callbacks, **common)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
        return Trainer(model=get_peft_model(model, LoraConfig(task_type=task_type, r=8, lora_alpha=16)),
                       callbacks=callbacks, **common)
    config = policy_config(policy, num_blocks)
    if kind == "freeze":
        return Trainer(model=model, callbacks=[FreezeCallback(config), *callbacks], **common)
    return FreezeTrainer(model=model, freeze_config=config, callbacks=callbacks, **common)


def policy_config(policy: str, num_blocks: int) -> FreezeConfig:
    """`gradnorm`, `schedule`, `fixed`, or any of them with knobs: `gradnorm:percentile=30,max_boundary=4`."""
    name, _, knobs = policy.partition(":")
    values = {key: json.loads(value) for key, value in (item.split("=", 1) for item in knobs.split(",") if item)}
    if name == "fixed":
        values.setdefault("boundary", round(2 * num_blocks / 3))  # e.g. 4 of MiniLM's 6 blocks
    return FreezeConfig(policy=name, **values)


def end_of_training_bytes(trainer: Trainer) -> dict:
    """Activation bytes saved for backward by one training forward at the final boundary, and optimizer state."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    model.train()
    with count_saved_tensor_bytes() as saved:
        if isinstance(trainer, FreezeTrainer):
            loss = trainer.compute_loss(model, dict(batch))
        else:
            batch.pop("hf_freeze_index", None)
            loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved_activation_mb": saved.total / 2**20,
            "optimizer_state_mb": optimizer_state_bytes(trainer.optimizer) / 2**20,
            "final_boundary": frozen_boundary(model)}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- reporting ----


def report(args, results: dict) -> None:
    classification = args.task == "classification"
    key = "eval_accuracy" if classification else "eval_perplexity"
    full = results.get("full")
    ideal_costs = ideal_step_costs(args, results) if full and not args.skip_ideal else {}
    rows = []
    for method, result in results.items():
        score = result["final"].get(key)
        row = {
            "method": method,
            "train s": result["train_seconds"],
            "speed-up": full["train_seconds"] / result["train_seconds"] if full else float("nan"),
            ("accuracy %" if classification else "perplexity"): 100 * score if classification else score,
            "final boundary": result.get("final_boundary"),
            "activations MB": result["saved_activation_mb"],
            "optimizer MB": result["optimizer_state_mb"],
            "all-reduce MB/step": result.get("allreduce_mb_per_step"),
            "peak MB": result["peak_memory_mb"],
        }
        if "reduce_scatter_mb_per_step" in result:
            row["reduce-scatter MB/step"] = result["reduce_scatter_mb_per_step"]
            row["rank peak MB (params+grads+optim)"] = result["rank_peak_mb"]
        if full:
            target = full["final"][key] - 0.005 if classification else full["final"][key] * 1.01
            reached = [e for e in result["evals"] + [dict(result["final"], train_seconds=result["train_seconds"])]
                       if (e.get(key, -1) >= target if classification else e.get(key, 1e9) <= target)]
            row["time to target s"] = reached[0]["train_seconds"] if reached else "never"
            if ideal_costs and result.get("timeline"):
                row["ideal speed-up"] = full["train_seconds"] / ideal_seconds(result["boundaries"], ideal_costs)
        rows.append(row)
    columns = ["method", "train s", "speed-up", "accuracy %" if classification else "perplexity",
               "time to target s", "ideal speed-up", "final boundary", "activations MB", "optimizer MB",
               "all-reduce MB/step", "peak MB"]
    if any("reduce-scatter MB/step" in row for row in rows):  # FSDP2: all-reduce does not apply
        columns.remove("all-reduce MB/step")
        columns += ["reduce-scatter MB/step", "rank peak MB (params+grads+optim)"]
    info = stamp()
    target_text = "full fine-tuning accuracy - 0.5 point" if classification else "full fine-tuning perplexity + 1%"
    title = (f"Fine-tuning {args.model} ({args.task}), {args.epochs:g} epochs, batch {args.batch_size}, seed "
             f"{args.seed}; time to target = training time until {target_text}")
    payload = {"stamp": info, "args": vars(args), "results": results, "rows": rows, "title": title}
    name = args.name
    write_results(name, payload, f"**{title}** ({info['machine']}, {info['device']}, commit {info['commit']})\n\n"
                  + markdown_table(rows, columns))
    plot(results, key, RESULTS / f"{name}.png", title)


def ideal_step_costs(args, results: dict) -> dict[int, float]:
    """Seconds per step of a model holding only blocks [k, L) and the head, for every boundary k the runs used.

    Every boundary is measured, boundary 0 included (embeddings frozen, every block active); `-1` (nothing frozen)
    is the full fine-tuning step of this benchmark. See `step_costs`.
    """
    boundaries = sorted({b for r in results.values() for b in r["boundaries"] if b is not None})
    subprocess.run(step_time_command(args, boundaries), check=True, cwd=ROOT)
    measured = json.loads((RESULTS / f"ideal_steps_{args.model}_{args.task}.json").read_text())["rows"]
    full_step = results["full"]["train_seconds"] / results["full"]["steps"]
    return step_costs(measured, full_step, boundaries)


def step_time_command(args, boundaries: list[int]) -> list[str]:
    """`benchmarks/step_time.py` timing the ideal step at exactly `boundaries` (the unfrozen step as well)."""
    return [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--model", args.model, "--batch-size",
            str(args.batch_size), "--boundaries", *map(str, boundaries or [0]), "--repeats", "6", "--task",
            args.task, "--name", f"ideal_steps_{args.model}_{args.task}"]


def step_costs(rows: list[dict], full_step: float, boundaries: list[int]) -> dict[int, float]:
    """Ideal seconds per step per boundary (`-1`: nothing frozen), from `step_time.py`'s rows.

    The rows were timed in another process, so they are scaled by the ratio of this benchmark's full step to the
    rows' own `full s`. A boundary the runs used but `rows` lack is an error rather than a guess.
    """
    scale = full_step / rows[0]["full s"]
    costs = {-1: full_step}
    for row in rows:
        if "ideal s" in row:
            costs[row["boundary k"]] = row["ideal s"] * scale
    missing = sorted(set(boundaries) - costs.keys())
    if missing:
        raise ValueError(f"No ideal step time was measured at boundaries {missing}; measured: {sorted(costs)}.")
    return costs


def ideal_seconds(boundaries: list[int | None], costs: dict[int, float]) -> float:
    """Training time of a run whose steps ran at `boundaries` (`None`: nothing frozen) at the ideal step costs."""
    return sum(costs[-1 if b is None else b] for b in boundaries)


def plot(results: dict, key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for method, result in results.items():
        points = [(e["train_seconds"], e[key]) for e in result["evals"] if key in e]
        points.append((result["train_seconds"], result["final"][key]))
        left.plot(*zip(*points), marker="o", ms=3, label=method)
        cumulative = [0.0]
        for seconds in result["step_seconds"]:
            cumulative.append(cumulative[-1] + seconds)
        right.plot(range(len(cumulative)), cumulative, label=method)
    left.set_xlabel("training seconds")
    left.set_ylabel(key.replace("eval_", ""))
    left.set_title("quality against training time")
    right.set_xlabel("optimizer step")
    right.set_ylabel("cumulative training seconds")
    right.set_title("where the time goes")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"benchmark wall time: {time.time() - started:.0f} s")
