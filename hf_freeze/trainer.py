"""`FreezeTrainer`: a `transformers.Trainer` that freezes like `FreezeCallback` and skips the frozen prefix with a
cache of boundary hidden states.

What it adds to `Trainer`, and nothing else:
- every dataset gets an example-key column (`keys.py`), lifted out of the batch before the model sees it;
- `compute_loss` and `prediction_step` ask `cache.batch.BatchCache` for the batch's boundary states and, when it
  gives some, run the model from the boundary (`cache.runner`), inside the model's own forward, so DDP,
  Accelerate hooks and the model's loss still apply;
- `log` merges `freeze/*` and `cache/*` metrics into the Trainer's logs, so every reporting integration sees them;
- under FSDP2 (`fsdp.py`): the cache runs in lockstep across ranks, and `fsdp/reduce_scatter_bytes_per_step` is
  logged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import get_token
from huggingface_hub.errors import HfHubHTTPError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, has_length

from .cache.batch import BatchCache, TrainingProgress
from .cache.keys import INDEX_COLUMN, ExampleIndexCollator, add_example_index
from .cache.runner import PrefixRunner
from .cache.store import PrefixCache
from .callback import FreezeCallback
from .checkpoint import FreezeMetadata, full_metadata, state_dict_for_save, verify_trainer_checkpoint, write_metadata
from .config import FreezeConfig
from .distributed import ActiveBlocksDDP, RankStableSampler, check_cache_world
from .freezing import freeze_prefix, frozen_boundary, get_layout
from .fsdp import FSDPModule, ReduceScatterMeter, is_fsdp2
from .hub import (
    PLOT_NAME,
    PushError,
    build_model_card,
    describe_policy,
    evaluation_metrics,
    push_error,
    write_model_card,
)
from .report import plot_boundary_timeline

logger = logging.getLogger(__name__)


class FreezeTrainer(Trainer):
    """`Trainer` with layer freezing and a frozen-prefix cache.

    Args:
        freeze_config (`FreezeConfig`, *optional*): policy, cache and their knobs; defaults to `FreezeConfig()`.
        *args, **kwargs: exactly `transformers.Trainer`'s.

    Example:
        ```python
        from hf_freeze import FreezeConfig, FreezeTrainer

        trainer = FreezeTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                freeze_config=FreezeConfig(policy="gradnorm", cache="auto"))
        trainer.train()
        ```
    """

    def __init__(self, *args: Any, freeze_config: FreezeConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if any(isinstance(cb, FreezeCallback) for cb in self.callback_handler.callbacks):
            raise ValueError(
                "FreezeTrainer already freezes blocks; remove the FreezeCallback from `callbacks` (or use a plain "
                "Trainer with the callback)."
            )
        self.freeze_config = freeze_config or FreezeConfig()
        callback = FreezeCallback(self.freeze_config)
        self._wire(callback)
        self.add_callback(callback)
        self.active_ddp = ActiveBlocksDDP(keep_find_unused=self.args.ddp_find_unused_parameters is not None)
        self.reduce_scatter_meter = ReduceScatterMeter()  # FSDP2: bytes reduce-scattered per optimizer step
        self.add_callback(_CacheMaintenance(self))
        self.data_collator = ExampleIndexCollator(self.data_collator)
        self.boundary_states: BatchCache | None = None  # created with the first cached batch
        self._prefix_runner: PrefixRunner | None = None
        self._steps_per_epoch: int | None = None
        self._resume_checkpoint: str | None = None

    @property
    def freeze_callback(self) -> FreezeCallback:
        """The live `FreezeCallback` (`restore_callback_states_from_checkpoint=True` replaces the instance)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, FreezeCallback):
                return callback
        raise RuntimeError("FreezeTrainer lost its FreezeCallback: do not remove it from the callbacks.")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; also tells the freeze callback which checkpoint it resumes from, and checks that
        checkpoint's files against the sha256 recorded when it was saved before anything is loaded."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_checkpoint = checkpoint if isinstance(checkpoint, str) else None
        if self._resume_checkpoint is not None and os.path.isdir(self._resume_checkpoint):
            verify_trainer_checkpoint(self._resume_checkpoint)  # a truncated file is named, not a loader's error
        self.freeze_callback.resume_checkpoint = self._resume_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and is_fsdp2(self.model):
            # torch.distributed.checkpoint refuses to load an optimizer without state for a parameter that requires
            # grad, and frozen parameters have none: freeze the checkpoint's prefix first (the callback then finds
            # it frozen, and restores the rest of its state).
            boundary, current = _checkpoint_boundary(checkpoint), frozen_boundary(self.model)
            if boundary is not None and (current is None or current < boundary):
                freeze_prefix(self.model, boundary, tied_weights=self.freeze_config.tied_weights,
                              blocks_path=self.freeze_config.blocks_path)
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_callback_state(self) -> None:
        super()._load_callback_state()
        # a restored instance starts without these
        self.freeze_callback.resume_checkpoint = self._resume_checkpoint
        self._wire(self.freeze_callback)

    def _wire(self, callback: FreezeCallback) -> None:
        """What the callback must know of this trainer: DDP is rebuilt over the active blocks, states are cached."""
        callback.rebuilds_ddp = self.freeze_config.ddp_rebuild
        callback.caches_prefix = self.freeze_config.cache != "off"

    # ---- data: example keys ----

    def get_train_dataloader(self) -> DataLoader:
        with _swapped(self, "train_dataset", add_example_index(self.train_dataset, "train")):
            loader = super().get_train_dataloader()
        shard = getattr(loader, "batch_sampler", None)
        if isinstance(getattr(getattr(shard, "batch_sampler", None), "sampler", None), RankStableSampler):
            shard.num_processes, shard.process_index = 1, 0  # the sampler already yields this rank's examples only
        # Optimizer steps per epoch, as Trainer counts them (the cache's store rule needs it).
        if has_length(loader):
            self._steps_per_epoch = max(math.ceil(len(loader) / self.args.gradient_accumulation_steps), 1)
        return loader

    def _get_train_sampler(self, train_dataset: Any | None = None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.rank_stable_sharding and hasattr(dataset, "__len__"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return RankStableSampler(len(dataset), self.args.world_size, self.args.process_index, seed=seed)
        return super()._get_train_sampler(train_dataset)

    @property
    def rank_stable_sharding(self) -> bool:
        """Whether training examples stay on one rank for the whole run (`FreezeConfig.rank_stable_sharding`)."""
        if self.args.world_size <= 1:
            return False
        wanted = self.freeze_config.rank_stable_sharding
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if wanted is None:
            return self.freeze_config.cache != "off" and strategy == "random"
        if wanted and strategy != "random":
            raise ValueError(
                f"rank_stable_sharding=True replaces the training sampler, but train_sampling_strategy={strategy!r} "
                "asks for another one. Use train_sampling_strategy='random' or rank_stable_sharding=False."
            )
        return wanted

    # ---- DDP over the active blocks ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.freeze_config.ddp_rebuild:
            model = self.active_ddp.wrapper_for(model, frozen_boundary(self.model))
            self.model_wrapped = model
        meter = self.reduce_scatter_meter
        if meter.attached_to is not model and isinstance(model, FSDPModule):  # Accelerate shards the root too
            meter.attach(model)
        # under gradient accumulation the Trainer's `no_sync` names the wrapper it built, not a rebuilt one
        accumulating = self.active_ddp.wrapper is model and not self.accelerator.sync_gradients
        with model.no_sync() if accumulating else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.active_ddp.after_backward(self.accelerator.sync_gradients)
        if meter.attached_to is model and self.accelerator.sync_gradients:
            meter.end_step()
        return loss

    def get_eval_dataloader(self, eval_dataset: str | Any | None = None) -> DataLoader:
        name = f"eval/{eval_dataset}" if isinstance(eval_dataset, str) else "eval"
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]  # type: ignore[index]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return super().get_eval_dataloader(None)
        return super().get_eval_dataloader(add_example_index(dataset, name))

    def get_test_dataloader(self, test_dataset: Any) -> DataLoader:
        return super().get_test_dataloader(add_example_index(test_dataset, "test"))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if INDEX_COLUMN not in self._signature_columns:
            self._signature_columns.append(INDEX_COLUMN)

    # ---- forward from the boundary ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keys = inputs.pop(INDEX_COLUMN, None)
        with self._from_boundary(inputs, keys, training=model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        keys = inputs.pop(INDEX_COLUMN, None)
        inputs = self._prepare_inputs(inputs)
        with self._from_boundary(inputs, keys, training=False):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    @contextlib.contextmanager
    def _from_boundary(self, inputs: dict[str, Any], keys: torch.Tensor | None, training: bool) -> Iterator[None]:
        boundary = frozen_boundary(self.model)
        if keys is None or self.freeze_config.cache == "off" or boundary is None or boundary < 1:
            yield
            return
        batches = self._get_boundary_states()
        progress = TrainingProgress(self.state.global_step, self.state.max_steps, self._steps_per_epoch)
        states = batches.states_for(inputs, keys, boundary, training=training, progress=progress)
        if states is None:
            yield
            return
        with batches.runner.inject_states(states, boundary):
            yield

    def _get_runner(self) -> PrefixRunner:
        if self._prefix_runner is None:
            self._prefix_runner = PrefixRunner(self.model, get_layout(self.model, self.freeze_config.blocks_path))
        return self._prefix_runner

    def _get_boundary_states(self) -> BatchCache:
        if self.boundary_states is None:
            runner = self._get_runner()
            directory = self.freeze_config.cache_dir
            if directory is not None and self.args.world_size > 1:
                check_cache_world(directory, self.args.world_size, self.rank_stable_sharding,
                                  is_main=self.is_world_process_zero())
                directory = os.path.join(directory, f"rank{self.args.process_index}")
            cache = PrefixCache(
                self.model,
                runner.layout,
                directory=directory,
                max_bytes=self.freeze_config.cache_max_bytes,
                dtype=self.freeze_config.cache_dtype,
                on_stale=self.freeze_config.on_stale_cache,
            )
            self.boundary_states = BatchCache(runner, cache, self.label_names or (), mode=self.freeze_config.cache,
                                              cache_eval=self.freeze_config.cache_eval, lockstep=is_fsdp2(self.model))
        return self.boundary_states

    # ---- explicit cache building ----

    @torch.no_grad()
    def precompute_cache(self, dataset: Any | None = None, split: str | None = None) -> int:
        """Fill the cache for `dataset` at the current boundary, with a progress bar.

        Useful after a fixed freeze, or before serving. Entries are keyed in the namespace the dataset will be read
        under, so that later training, evaluation or prediction batches hit them.

        Args:
            dataset (*optional*): default the training set.
            split (`str`, *optional*): the namespace: `"train"`, `"eval"`, `"eval/<name>"` (a named evaluation set)
                or `"test"` (`predict`). Default: found from `dataset` when it is this trainer's training set or one
                of its evaluation sets; any other dataset needs it.

        Returns:
            The number of examples now cached.

        Example:
            ```python
            trainer.precompute_cache()                               # the training set
            trainer.precompute_cache(test_set, split="test")         # then trainer.predict(test_set) hits
            ```
        """
        boundary = frozen_boundary(self.model)
        if boundary is None or boundary < 1:
            raise ValueError("Nothing to cache: freeze at least one block first (boundary >= 1).")
        if self.freeze_config.cache == "off":
            raise ValueError("The prefix cache is off (`FreezeConfig(cache='off')`): set cache='on' or 'auto' first.")
        dataset = self.train_dataset if dataset is None else dataset
        namespace = split or self._split_of(dataset)
        if namespace not in ("train", "eval", "test") and not namespace.startswith("eval/"):
            raise ValueError(f"`split` must be 'train', 'eval', 'eval/<name>' or 'test', got {namespace!r}.")
        loader = super().get_eval_dataloader(add_example_index(dataset, namespace))
        batches = self._get_boundary_states()
        for batch in tqdm(loader, desc=f"hf_freeze: caching boundary {boundary}"):
            keys = batch.pop(INDEX_COLUMN, None)
            if keys is not None:
                batches.fill(self._prepare_inputs(batch), keys, boundary)
        batches.cache.flush()
        return len(batches.cache)

    def _split_of(self, dataset: Any) -> str:
        if dataset is self.train_dataset:
            return "train"
        if dataset is self.eval_dataset:
            return "eval"
        if isinstance(self.eval_dataset, dict):
            for name, candidate in self.eval_dataset.items():
                if dataset is candidate:
                    return f"eval/{name}"
        raise ValueError(
            "precompute_cache cannot tell under which split this dataset will be read: pass `split='train'`, "
            "'eval', 'eval/<name>' (a named evaluation set) or 'test' (for `predict`)."
        )

    # ---- saving, model card, push ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """`Trainer._save`, plus `hf_freeze.json` (boundary, prefix fingerprint, timeline) beside the weights."""
        if state_dict is None and isinstance(self.model, PreTrainedModel):
            state_dict = state_dict_for_save(self.model)  # offloaded blocks' real weights, tied tensors apart
        # Under FSDP2 every rank comes here (with the gathered state dict) and the fingerprints gather the shards:
        # every rank computes them, the writer writes.
        metadata = self.freeze_metadata() if self.args.should_save or is_fsdp2(self.model) else None
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_metadata(output_dir or self.args.output_dir, metadata)

    def freeze_metadata(self) -> FreezeMetadata:
        """What this run's saves record in `hf_freeze.json`."""
        get_layout(self.model, self.freeze_config.blocks_path)
        return full_metadata(self.model, timeline=self.freeze_callback.timeline)

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None, speedup: float | None = None) -> None:
        """Write `README.md` (and `freeze_timeline.png`) in `output_dir`: hf_freeze's card (`hub.build_model_card`),
        naming the base, the freeze timeline, the evaluation results and how to load the model.

        Takes `Trainer.create_model_card`'s arguments (`tasks` is the pipeline tag, `dataset` the dataset's name)
        plus `speedup`, a measured speed-up over full fine-tuning.
        """
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        metadata = self.freeze_metadata()
        if finetuned_from:
            metadata.base_model = finetuned_from
        layout = get_layout(self.model, self.freeze_config.blocks_path)
        plot_boundary_timeline(metadata.timeline, output_dir / PLOT_NAME, num_blocks=layout.num_blocks,
                               max_steps=self.state.max_steps or self.state.global_step)
        evaluations = [entry for entry in self.state.log_history if evaluation_metrics(entry)]
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        card = build_model_card(
            metadata,
            model_name=model_name or (repo_id or output_dir.name).split("/")[-1],
            repo_id=repo_id or str(output_dir),
            task=_first(tasks),
            dataset=_first(dataset) or _first(dataset_tags),
            metrics=evaluation_metrics(evaluations[-1]) if evaluations else None,
            log_history=self.state.log_history,
            speedup=speedup,
            policy=describe_policy(self.freeze_config),
            plot=PLOT_NAME,
            language=_first(language),
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
        )
        write_model_card(card, output_dir)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs: Any):
        """`Trainer.push_to_hub`: uploads the model, `hf_freeze.json`, the card and its plot; refuses up front
        without a token, and turns the Hub's refusals into a `hub.PushError` that says what to fix."""
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        if not (token or self.args.hub_token or get_token()):
            raise PushError(f"No Hugging Face token to push to {repo_id}. Log in with `hf auth login`, set "
                            "`HF_TOKEN`, or pass `token=` / `--hub_token` (it needs write access).")
        try:
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        except HfHubHTTPError as error:
            raise push_error(error, getattr(self, "hub_model_id", None) or repo_id) from error

    # ---- logging ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.freeze_callback.pop_pending_logs())
        if self.boundary_states is not None:
            logs.update(self.boundary_states.stats.as_logs(self.boundary_states.cache))
        if self.active_ddp.meter.step_bytes:
            logs["ddp/allreduce_bytes_per_step"] = float(self.active_ddp.meter.step_bytes[-1])
        if self.reduce_scatter_meter.step_bytes:
            logs["fsdp/reduce_scatter_bytes_per_step"] = float(self.reduce_scatter_meter.step_bytes[-1])
        super().log(logs, start_time)


class _CacheMaintenance(TrainerCallback):
    """Flushes a disk cache with each checkpoint and at the end of training, and reports it per epoch."""

    def __init__(self, trainer: FreezeTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.freeze_config.cache != "off":
            # refuse, before the first step, a model whose blocks pass more than hidden states
            self.trainer._get_runner().check_block_outputs(strict=False)

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.boundary_states is not None:
            self.trainer.boundary_states.cache.flush()

    on_train_end = on_save

    def on_epoch_end(self, args, state, control, **kwargs):
        provider = self.trainer.boundary_states
        if provider is not None:
            stats = provider.stats
            logger.info(
                "hf_freeze: epoch %.2f: cache holds %d examples (%.1f MB); %d hits, %d advanced, %d misses so far.",
                state.epoch or 0, len(provider.cache), provider.cache.nbytes / 2**20,
                stats.hits, stats.advanced, stats.misses,
            )


@contextlib.contextmanager
def _swapped(obj: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _checkpoint_boundary(checkpoint: str) -> int | None:
    """The frozen boundary a Trainer checkpoint folder recorded (`FreezeCallback`'s state), or `None`."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    saved = (TrainerState.load_from_json(path).stateful_callbacks or {}).get(FreezeCallback.__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return (saved or {}).get("attributes", {}).get("boundary")


def _first(value: str | list[str] | None) -> str | None:
    """Trainer's card arguments may be a string or a list of them; the card takes the first."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value
