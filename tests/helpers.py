"""Tiny datasets and Trainer set-ups shared by the Trainer-level tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_freeze import frozen_boundary, get_layout


def token_dataset(size=64, seed=0, min_len=4, max_len=14, vocab=100, labels="seq"):
    """Variable-length random token sequences with a learnable label."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        row = {"input_ids": ids}
        if labels == "seq":
            row["labels"] = int(ids[0] > vocab // 2)
        rows.append(row)
    return datasets.Dataset.from_list(rows)


class PadCollator:
    """Right-pads `input_ids`, builds `attention_mask`; causal-LM labels are the ids with -100 at padding."""

    def __init__(self, pad_id=0, causal=False):
        self.pad_id, self.causal = pad_id, causal

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.causal:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch


def training_args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=16,
        num_train_epochs=3, learning_rate=1e-3, logging_steps=2, report_to="none", save_strategy="no",
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


class PrefixProbe(TrainerCallback):
    """Records, after every step, which parameters are frozen and the boundary."""

    def __init__(self):
        self.frozen_sets, self.boundaries = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.frozen_sets.append({n for n, p in model.named_parameters() if not p.requires_grad})
        self.boundaries.append(frozen_boundary(model))


class LogRecorder(TrainerCallback):
    """Stands where reporting integrations stand (before user callbacks) and keeps what on_log showed it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def assert_prefix_shape(model, frozen_names):
    """The frozen set is exactly the embeddings plus the first k blocks, for some k."""
    layout = get_layout(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for k in range(-1, layout.num_blocks + 1):
        modules = [] if k < 0 else layout.prefix_modules(k)
        expected = {names[id(p)] for m in modules for p in m.parameters() if id(p) in names}
        if expected == frozen_names:
            return k
    raise AssertionError(f"frozen set is not a prefix: {sorted(frozen_names)[:5]}...")


def state_of(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def run_trainer(model, args, train, callbacks=(), collator=None, trainer_cls=Trainer, **kwargs):
    trainer = trainer_cls(model=model, args=args, train_dataset=train, data_collator=collator or PadCollator(),
                          callbacks=list(callbacks), **kwargs)
    return trainer


def run_two_ranks(worker: str, out: Path, timeout: float) -> list[dict]:
    """Run `tests/<worker>` in two CPU processes (gloo, `torch.distributed.run --standalone`: a local rendezvous on a
    free port, so parallel test runs never collide) and return what each rank wrote to `out/rank<r>.json`."""
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(here / worker), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
