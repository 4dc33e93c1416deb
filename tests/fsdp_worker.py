"""One rank of the FSDP2 tests (launched by test_fsdp.py with torchrun, gloo on CPU).

Accelerate 1.15 turns FSDP on for GPU set-ups only: on a CPU it ignores `fsdp=` and trains plain DDP. `CpuFsdp`
turns it on after the Trainer built its Accelerator (the state Accelerate would have built on GPUs: distributed type
FSDP, the plugin from `TrainingArguments`), so the model is sharded by Accelerate's own `fsdp2_prepare_model`
(`fully_shard` per BertLayer, the input embeddings, then the root); every run asserts that its blocks hold DTensor
parameters.

Runs in one launch (process start-up dominates on a small CPU):
- `ddp`: the mid-run freeze of ddp_worker (gradnorm, cache on, no dropout) under DDP;
- `callback` / `callback_ddp`: a plain Trainer with FreezeCallback (no cache) under FSDP2 and under DDP;
- `fsdp`: the same under FSDP2, saving checkpoints; per optimizer step the boundary, the bytes reduce-scattered,
  the bytes of trainable parameters and this rank's parameter + gradient + optimizer bytes; then `save_suffix` and
  `save_pretrained` on every rank, and rank 0 reloads the suffix onto the full checkpoint and compares logits
  with the sharded model's own forward;
- `resume` / `ddp_resume`: the `fsdp` and `ddp` runs resumed from their checkpoints after the first freeze;
- `auto`: a run under FSDP2 with cache="auto" and a disk cache, timed so that the ranks would judge it
  differently (the verdict must be agreed across ranks);
- `stopped_forward`: freeze_prefix right after a forward stopped at the boundary (the root's parameters gathered);
- then a decision that differs per rank must be refused (by `check_same_decision`, and by FreezeCallback in a run
  whose fixed boundary differs per rank), and the disk cache folder refused under another layout.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_batch, tiny_model  # noqa: E402
from helpers import PadCollator, token_dataset, training_args  # noqa: E402

from hf_freeze import FreezeCallback, FreezeConfig, FreezeTrainer, freeze_prefix, frozen_boundary, get_layout  # noqa: E402,E501
from hf_freeze.cache.batch import CacheVerdict  # noqa: E402
from hf_freeze.cache.runner import PrefixRunner  # noqa: E402
from hf_freeze.checkpoint import (  # noqa: E402
    load_suffix,
    read_metadata,
    save_pretrained,
    save_suffix,
    state_dict_for_save,
)
from hf_freeze.distributed import check_cache_world  # noqa: E402
from hf_freeze.fsdp import check_same_decision, full_tensor, rank_memory, reshard  # noqa: E402

FREEZE = dict(policy="gradnorm", interval_steps=2, cache="on", percentile=50)  # ddp_worker's FREEZE_RUN
EPOCHS, ACCUMULATION, BATCH = 8, 2, 4
# Accelerate's default wrap policy also wraps BertEmbeddings, and then fully_shard(word_embeddings) fails on torch
# 2.13 (the parameter is already a DTensor): wrap the blocks only, as `transformer_layer_cls_to_wrap` lets users.
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}


class CpuFsdp:
    """Trainer mixin: FSDP2 through Accelerate on a CPU (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None:
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def save_model(self, output_dir=None, _internal_call=False):
        # On a CPU, the full state dict Accelerate gathers (`get_model_state_dict(cpu_offload=True)`) aliases FSDP's
        # all-gather buffers, freed by the time they are written (`.cpu()` is no copy there); on GPUs it copies.
        if self.is_fsdp_enabled:
            return self._save(output_dir, state_dict=state_dict_for_save(self.model))
        return super().save_model(output_dir, _internal_call)


class FsdpTrainer(CpuFsdp, FreezeTrainer):
    pass


class PlainFsdpTrainer(CpuFsdp, Trainer):
    pass


class StepStats(TrainerCallback):
    """Per optimizer step: boundary, trainable bytes, bytes reduce-scattered / all-reduced, this rank's memory."""

    def __init__(self, trainer: FreezeTrainer) -> None:
        self.trainer, self.steps, self._start = trainer, [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self._start = (frozen_boundary(model), trainable)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._memory = rank_memory(model, optimizer)  # gradients present, optimizer state of the previous step

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        meter = self.trainer.reduce_scatter_meter if self.trainer.is_fsdp_enabled else self.trainer.active_ddp.meter
        memory = rank_memory(model, optimizer)
        self.steps.append({"step": state.global_step, "boundary": self._start[0], "trainable_bytes": self._start[1],
                           "sent_bytes": meter.step_bytes[-1] if meter.step_bytes else None,
                           "gradient_bytes": self._memory["gradient_bytes"], **{
                               k: v for k, v in memory.items() if k != "gradient_bytes"}})


def make_trainer(out: Path, fsdp: bool, config: dict, **overrides) -> FreezeTrainer:
    model = tiny_model("bert", "seq")
    for module in model.modules():  # no dropout: DDP and FSDP then differ by rounding only
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    args = dict(num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION)
    if fsdp:
        args.update(fsdp=True, fsdp_config=FSDP_CONFIG)
    args.update(overrides)
    cls = FsdpTrainer if fsdp else FreezeTrainer
    return cls(model=model, args=training_args(out, **args), train_dataset=token_dataset(size=40, seed=1),
               eval_dataset=token_dataset(size=16, seed=2), data_collator=PadCollator(),
               freeze_config=FreezeConfig(**config))


def train_with_callback(out: Path, fsdp: bool) -> dict:
    """A plain Trainer with FreezeCallback (no cache) under FSDP2 or DDP."""
    model = tiny_model("bert", "seq")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    callback = FreezeCallback(FreezeConfig(**{**FREEZE, "cache": "off"}))
    sharding = {"fsdp": True, "fsdp_config": FSDP_CONFIG} if fsdp else {}
    args = training_args(out / f"callback_{fsdp}", num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                         gradient_accumulation_steps=ACCUMULATION, **sharding)
    cls = PlainFsdpTrainer if fsdp else Trainer
    trainer = cls(model=model, args=args, train_dataset=token_dataset(size=40, seed=1), data_collator=PadCollator(),
                  callbacks=[callback])
    trainer.train()
    return {"sharded": [isinstance(p, DTensor) for b in trainer.model.bert.encoder.layer for p in b.parameters()],
            "timeline": [(e["step"], e["boundary"]) for e in callback.timeline],
            "logs": logs(trainer), "weights": weights(trainer.model)}


def freeze_after_a_stopped_forward(out: Path) -> dict:
    """A forward stopped at the boundary (the cache's runner) leaves the root's parameters gathered; freeze_prefix
    must still freeze the sharded parameters that FSDP2 and the optimizer hold."""
    args = training_args(out / "stopped", max_steps=1, per_device_train_batch_size=BATCH, fsdp=True,
                         fsdp_config=FSDP_CONFIG)
    trainer = PlainFsdpTrainer(model=tiny_model("bert", "seq"), args=args, data_collator=PadCollator(),
                               train_dataset=token_dataset(size=8, seed=1))
    trainer.train()
    model = trainer.model
    runner = PrefixRunner(model, get_layout(model))
    batch = tiny_batch(model, "seq")
    batch.pop("labels")
    runner.boundary_states(batch, 1)  # stops after block 0: the root group stays gathered
    freeze_prefix(model, 1)
    reshard(model)
    embeddings = list(model.bert.embeddings.named_parameters())
    return {"sharded": all(isinstance(p, DTensor) for _, p in embeddings),
            "trainable": [n for n, p in embeddings if p.requires_grad]}


def logs(trainer) -> list[dict]:
    return [{k: e[k] for k in ("step", "loss", "grad_norm")} for e in trainer.state.log_history if "loss" in e]


def weights(model) -> dict[str, list[float]]:
    """Every parameter gathered whole (a collective under FSDP2), as lists to compare across runs."""
    return {name: full_tensor(p.detach()).flatten().tolist() for name, p in model.named_parameters()}


def train(out: Path, name: str, fsdp: bool, config: dict = FREEZE, resume: str | None = None, **overrides) -> dict:
    trainer = make_trainer(out / name, fsdp, config, **overrides)
    stats = StepStats(trainer)
    trainer.add_callback(stats)
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    blocks = model.bert.encoder.layer
    cache = trainer.boundary_states
    return {
        "trainer": trainer,
        "sharded": [isinstance(p, DTensor) for b in blocks for p in b.parameters()],
        "model_class": type(model).__name__,
        "boundary": frozen_boundary(model),
        "timeline": [{k: v for k, v in e.items() if k != "seconds"} for e in trainer.freeze_callback.timeline],
        "logs": logs(trainer),
        "steps": stats.steps,
        "hits": cache.stats.hits if cache else 0, "misses": cache.stats.misses if cache else 0,
        "verdicts": {str(k): v for k, v in cache.verdict.verdicts.items()} if cache else {},
        "weights": weights(model),
    }


@contextlib.contextmanager
def skewed_timings(rank: int):
    """cache="auto" timings that make rank 0 judge the cache worth it and rank 1 not: the verdict must still be one."""
    original = CacheVerdict.record
    factor = 1e-6 if rank == 0 else 1e6

    def record(self, boundary, *, read=None, compute=None):
        return original(self, boundary, read=None if read is None else read * factor, compute=compute)

    CacheVerdict.record = record
    try:
        yield
    finally:
        CacheVerdict.record = original


def logits_check(out: Path, trainer: FreezeTrainer, rank: int) -> dict:
    """save_suffix + save_pretrained on every rank; rank 0 loads the suffix onto the full checkpoint."""
    model = trainer.model
    model.eval()
    batch = tiny_batch(model, "seq")
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits  # the sharded model's own forward (every rank)
    suffix = save_suffix(model, out / "suffix", timeline=trainer.freeze_callback.timeline)
    full = save_pretrained(model, out / "full", timeline=trainer.freeze_callback.timeline)
    result = {"suffix_files": sorted(os.listdir(suffix)), "metadata": read_metadata(full).architecture,
              "suffix_metadata": read_metadata(suffix).architecture,
              "trainer_metadata": read_metadata(out / "fsdp" / "checkpoint-6").architecture,
              "config_architectures": json.loads((suffix / "config.json").read_text())["architectures"]}
    if rank == 0:
        from transformers import BertForSequenceClassification

        base = BertForSequenceClassification.from_pretrained(full)
        loaded = load_suffix(suffix, base=base)
        with torch.no_grad():
            result["max_logit_diff"] = float((loaded(**batch).logits - expected).abs().max())
            result["full_logit_diff"] = float((base.eval()(**batch).logits - expected).abs().max())
    return result


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    ddp = train(out, "ddp", fsdp=False, save_strategy="steps", save_steps=2)
    fsdp = train(out, "fsdp", fsdp=True, save_strategy="steps", save_steps=2)
    first_freeze = fsdp["timeline"][0]["step"]
    resumed = train(out, "resume", fsdp=True, resume=str(out / "fsdp" / f"checkpoint-{first_freeze}"))
    ddp_resumed = train(out, "ddp_resume", fsdp=False, resume=str(out / "ddp" / f"checkpoint-{first_freeze}"))
    with skewed_timings(rank):
        auto = train(out, "auto", fsdp=True, num_train_epochs=3,
                     config={"policy": "fixed", "boundary": 2, "cache": "auto", "cache_dir": str(out / "cache")})
    result = {"logits": logits_check(out, fsdp["trainer"], rank), "resumed_from": first_freeze,
              "callback": train_with_callback(out, fsdp=True), "callback_ddp": train_with_callback(out, fsdp=False),
              "stopped_forward": freeze_after_a_stopped_forward(out)}
    for name, run in (("ddp", ddp), ("fsdp", fsdp), ("resume", resumed), ("ddp_resume", ddp_resumed), ("auto", auto)):
        run.pop("trainer")
        result[name] = run
    for key, call in (("disagreement", lambda: check_same_decision(rank)),
                      ("split_freeze", lambda: train(out, "split", fsdp=True, max_steps=2,
                                                     config={"policy": "fixed", "boundary": 1 + rank})),
                      ("cache_layout", lambda: check_cache_world(str(out / "cache"), 4, True, is_main=rank == 0))):
        try:
            call()
            result[key] = None
        except (RuntimeError, ValueError) as error:
            result[key] = str(error)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()  # as in ddp_worker: skip the interpreter teardown, which sometimes aborts under gloo
    sys.stderr.flush()
    os._exit(0)
