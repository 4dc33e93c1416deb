"""`FreezeTrainer`: a `transformers.Trainer` that freezes like `FreezeCallback` and skips the frozen prefix with a
cache of boundary hidden states.

What it adds to `Trainer`, and nothing else:
- every dataset gets an example-key column (`keys.py`), lifted out of the batch before the model sees it;
- `compute_loss` and `prediction_step` run the model from the boundary when it pays (`boundary_states.py`,
  `prefix.py`), inside the model's own forward, so DDP, Accelerate hooks and the model's loss still apply;
- `log` merges `freeze/*` and `cache/*` metrics into the Trainer's logs, so every reporting integration sees them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .boundary_states import BoundaryStates
from .cache import PrefixCache
from .callback import FreezeCallback
from .config import FreezeConfig
from .distributed import ActiveBlocksDDP, RankStableSampler, check_cache_world
from .freezing import frozen_boundary, get_layout, untied_parameters
from .keys import INDEX_COLUMN, ExampleIndexCollator, add_example_index
from .model_card import append_to_model_card, render_freeze_section
from .offload import materialized_state_dict
from .prefix import PrefixRunner

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
        self.freeze_callback = FreezeCallback(self.freeze_config)
        self.freeze_callback.rebuilds_ddp = self.freeze_config.ddp_rebuild
        self.active_ddp = ActiveBlocksDDP(keep_find_unused=self.args.ddp_find_unused_parameters is not None)
        self.add_callback(self.freeze_callback)
        self.add_callback(_CacheMaintenance(self))
        self.data_collator = ExampleIndexCollator(self.data_collator)
        self.boundary_states: BoundaryStates | None = None
        self._cache_verdicts: dict[int, bool] = {}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; also tells the freeze callback which checkpoint it resumes from."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self.freeze_callback.resume_checkpoint = checkpoint if isinstance(checkpoint, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- data: example keys ----

    def get_train_dataloader(self) -> DataLoader:
        with _swapped(self, "train_dataset", add_example_index(self.train_dataset, "train")):
            loader = super().get_train_dataloader()
        shard = getattr(loader, "batch_sampler", None)
        if isinstance(getattr(getattr(shard, "batch_sampler", None), "sampler", None), RankStableSampler):
            shard.num_processes, shard.process_index = 1, 0  # the sampler already yields this rank's examples only
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
        # under gradient accumulation the Trainer's `no_sync` names the wrapper it built, not a rebuilt one
        accumulating = self.active_ddp.wrapper is model and not self.accelerator.sync_gradients
        with model.no_sync() if accumulating else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.active_ddp.after_backward(self.accelerator.sync_gradients)
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
        if keys is None or not self._cache_wanted(boundary, training):
            yield
            return
        provider = self._get_boundary_states()
        states = provider.states_for(inputs, keys, boundary, store=self._should_store(training))
        if boundary not in self._cache_verdicts:
            self._judge_cache(provider, inputs, keys, boundary)
        with provider.runner.inject_states(states, boundary):
            yield

    def _cache_wanted(self, boundary: int | None, training: bool) -> bool:
        if boundary is None or boundary < 1 or self.freeze_config.cache == "off":
            return False
        if not training and not self.freeze_config.cache_eval:
            return False
        return self._cache_verdicts.get(boundary, True)

    def _should_store(self, training: bool) -> bool:
        """In `auto`, store a training example only if training will see it again."""
        if self.freeze_config.cache == "on" or not training:
            return True
        epochs = max(self.args.num_train_epochs, 1)
        steps_per_epoch = math.ceil(self.state.max_steps / math.ceil(epochs))
        # the batch in flight is step global_step + 1; it comes back one epoch later
        return self.state.global_step + 1 + steps_per_epoch <= self.state.max_steps

    def _judge_cache(self, provider: BoundaryStates, inputs: dict[str, Any], keys: torch.Tensor, boundary: int) -> None:
        """`cache="auto"`: keep the cache at this boundary only if reading a state is measured to be cheaper than
        recomputing it with the frozen prefix."""
        compute = provider.stats.seconds_per_token.get(boundary)
        read = provider.read_cost_per_token(keys, inputs, boundary)
        if compute is None or read is None:
            return  # nothing computed or stored yet at this boundary: judge on a later batch
        pays = self.freeze_config.cache == "on" or read < compute
        self._cache_verdicts[boundary] = pays
        logger.info(
            "hf_freeze: cache at boundary %d %s: reading costs %.3g us/token, the frozen prefix %.3g us/token.",
            boundary, "on" if pays else "off", read * 1e6, compute * 1e6,
        )

    def _get_boundary_states(self) -> BoundaryStates:
        if self.boundary_states is None:
            layout = get_layout(self.model, self.freeze_config.blocks_path)
            directory = self.freeze_config.cache_dir
            if directory is not None and self.args.world_size > 1:
                check_cache_world(directory, self.args.world_size, self.rank_stable_sharding,
                                  is_main=self.is_world_process_zero())
                directory = os.path.join(directory, f"rank{self.args.process_index}")
            cache = PrefixCache(
                self.model,
                layout,
                directory=directory,
                max_bytes=self.freeze_config.cache_max_bytes,
                dtype=self.freeze_config.cache_dtype,
                on_stale=self.freeze_config.on_stale_cache,
            )
            self.boundary_states = BoundaryStates(PrefixRunner(self.model, layout), cache, self.label_names or ())
        return self.boundary_states

    # ---- explicit cache building ----

    @torch.no_grad()
    def precompute_cache(self, dataset: Any | None = None) -> int:
        """Fill the cache for `dataset` (default: the training set) at the current boundary, with a progress bar.

        Useful after a fixed freeze, or before serving. Returns the number of examples now cached.
        """
        boundary = frozen_boundary(self.model)
        if boundary is None or boundary < 1:
            raise ValueError("Nothing to cache: freeze at least one block first (boundary >= 1).")
        namespace = "train" if dataset is None else "eval"
        dataset = add_example_index(self.train_dataset if dataset is None else dataset, namespace)
        loader = super().get_eval_dataloader(dataset)
        provider = self._get_boundary_states()
        for batch in tqdm(loader, desc=f"hf_freeze: caching boundary {boundary}"):
            keys = batch.pop(INDEX_COLUMN, None)
            if keys is not None:
                provider.states_for(self._prepare_inputs(batch), keys, boundary, store=True)
        provider.cache.flush()
        return len(provider.cache)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # blocks offloaded by Accelerate (device_map or offload_frozen) sit on `meta`: save their real weights
        if state_dict is None and any(p.device.type == "meta" for p in self.model.parameters()):
            state_dict = materialized_state_dict(self.model)
        super()._save(output_dir, state_dict)

    # ---- model card ----

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card`, plus a section recording what was frozen, when and why."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            append_to_model_card(os.path.join(self.args.output_dir, "README.md"), self.freeze_model_card_section())

    def freeze_model_card_section(self) -> str:
        """Markdown describing this run's policy, final boundary and freeze timeline."""
        layout = get_layout(self.model, self.freeze_config.blocks_path)
        cache_summary = None
        if self.boundary_states is not None:
            stats = self.boundary_states.stats
            cache_summary = (
                f"{self.freeze_config.cache}, {self.freeze_config.cache_dtype}; {stats.hits} hits, {stats.advanced} "
                f"advanced, {stats.misses} misses; about {stats.saved_seconds():.0f} s of prefix compute saved"
            )
        return render_freeze_section(
            self.freeze_config,
            self.freeze_callback.timeline,
            num_blocks=layout.num_blocks,
            blocks_path=layout.blocks_path,
            boundary=frozen_boundary(self.model),
            untied=untied_parameters(self.model),
            cache_summary=cache_summary,
        )

    # ---- logging ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.freeze_callback.pop_pending_logs())
        if self.boundary_states is not None:
            logs.update(self.boundary_states.stats.as_logs(self.boundary_states.cache))
        if self.active_ddp.meter.step_bytes:
            logs["ddp/allreduce_bytes_per_step"] = float(self.active_ddp.meter.step_bytes[-1])
        super().log(logs, start_time)


class _CacheMaintenance(TrainerCallback):
    """Flushes a disk cache with each checkpoint and at the end of training, and reports it per epoch."""

    def __init__(self, trainer: FreezeTrainer) -> None:
        self.trainer = trainer

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
