"""Run a model from a boundary: compute the hidden states at a boundary, or feed given states into it.

Both go through the model's own `forward`, so its attention-mask, position and rotary handling, its loss, and
any Accelerate device/autocast hooks or DDP wrapper still apply; no per-model forward code exists here.

- `boundary_states` runs the forward until block `k - 1` has produced its output, then stops it (an exception
  raised from a forward hook), so blocks `[k, L)` and the head never run.
- `inject_states` temporarily replaces blocks `[0, k)` in the block list with stand-ins that return given states,
  so the model's forward skips the frozen blocks and its first real block is block `k`. The embeddings still run;
  they cost a table lookup. Under gradient checkpointing the injected states require grad, as the frozen prefix's
  boundary hook makes them in a full forward: reentrant checkpointing gives a block's parameters no gradient
  when none of its inputs requires grad.

Only the hidden states cross the boundary. A block whose output carries more to the next block (T5's position
bias, or any other non-`None` element after the hidden states) cannot be resumed from cached states, so the
runner refuses such a model with `UnsupportedModelError` as soon as it sees one block output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..freezing import uses_activation_checkpointing
from ..layout import BlockLayout, UnsupportedModelError, _dummy_inputs, execution_device


class _BoundaryReached(Exception):
    def __init__(self, output: Any) -> None:
        super().__init__("boundary reached")
        self.output = output


class _StandInBlock(nn.Module):
    """Takes the place of a frozen block during a forward: returns the boundary states in the block's own
    output format. Attribute reads it does not know (`attention_type`, `layer_idx`, ...) go to the real block."""

    def __init__(self, block: nn.Module, states: torch.Tensor, tuple_length: int | None) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_states", states)
        object.__setattr__(self, "_tuple_length", tuple_length)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._tuple_length is None:
            return self._states
        return (self._states, *([None] * (self._tuple_length - 1)))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class PrefixRunner:
    """Computes and injects boundary hidden states for one model.

    Args:
        model (`nn.Module`): the (unwrapped) model; call it with the DDP-wrapped one inside `inject_states`.
        layout (`BlockLayout`): the model's layout.

    Example:
        ```python
        runner = PrefixRunner(model, get_layout(model))
        states = runner.boundary_states({"input_ids": ids, "attention_mask": mask}, 2)  # output of block 1
        with runner.inject_states(states, 2):
            logits = model(input_ids=ids, attention_mask=mask).logits  # blocks 0 and 1 do not run
        ```
    """

    def __init__(self, model: nn.Module, layout: BlockLayout) -> None:
        self.model = model
        self.layout = layout
        self._tuple_length: int | None | bool = False  # False: block output format not seen yet

    @torch.no_grad()
    def boundary_states(
        self,
        inputs: Mapping[str, Any],
        boundary: int,
        start: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states output by block `boundary - 1` for the batch `inputs` (`[batch, seq, hidden]`).

        Args:
            inputs: model inputs without labels.
            boundary: `1 <= boundary <= num_blocks`.
            start: `(b, states)` with the states at an earlier boundary `b`: only blocks `[b, boundary)` run.

        Raises:
            `UnsupportedModelError`: the block passes more than hidden states to the next block.
        """
        if not 1 <= boundary <= self.layout.num_blocks:
            raise ValueError(f"A boundary state needs 1 <= boundary <= {self.layout.num_blocks}, got {boundary}.")
        handle = self.layout.blocks[boundary - 1].register_forward_hook(self._stop_at_boundary)
        resume = self.inject_states(*start[::-1]) if start is not None else contextlib.nullcontext()
        try:
            with resume:
                self.model(**inputs)
        except _BoundaryReached as reached:
            return _hidden_states(reached.output)
        finally:
            handle.remove()
        raise RuntimeError(f"The forward of {type(self.model).__name__} finished without running block {boundary - 1}.")

    @contextlib.contextmanager
    def inject_states(self, states: torch.Tensor, boundary: int) -> Iterator[None]:
        """Within the context, the model's forward skips blocks `[0, boundary)` and block `boundary` receives
        `states`. Works with any wrapper around the model (DDP, autocast)."""
        if not 1 <= boundary <= self.layout.num_blocks:
            raise ValueError(f"Injecting states needs 1 <= boundary <= {self.layout.num_blocks}, got {boundary}.")
        tuple_length = self.check_block_outputs()
        blocks = self.layout.blocks
        states = states.to(execution_device(blocks[boundary - 1]))
        if torch.is_grad_enabled() and uses_activation_checkpointing(self.model) and not states.requires_grad:
            states = states.detach().requires_grad_(True)
        originals = [blocks[i] for i in range(boundary)]
        for i, block in enumerate(originals):
            blocks[i] = _StandInBlock(block, states, tuple_length)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def check_block_outputs(self, strict: bool = True) -> int | None:
        """Learn the blocks' output format from one tiny forward (in eval mode, so no random numbers are drawn)
        unless a block output was already seen. Returns `None` when blocks return a tensor, else the length of the
        tuple they return.

        Args:
            strict: when False, a tiny forward that fails for another reason (a model that needs more than
                `input_ids`) is not an error; the format is then learnt from the first real batch.

        Raises:
            `UnsupportedModelError`: a block passes more than hidden states to the next one.
        """
        if self._tuple_length is False:
            inputs = _dummy_inputs(self.model)
            if inputs is None:
                self._tuple_length = None
            else:
                modes = {module: module.training for module in self.model.modules()}
                self.model.eval()
                try:
                    self.boundary_states(inputs, 1)
                except UnsupportedModelError:
                    raise
                except Exception:
                    if strict:
                        raise
                    return None
                finally:
                    for module, training in modes.items():
                        module.training = training
        return self._tuple_length  # type: ignore[return-value]

    def _stop_at_boundary(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            extra = [(i, value) for i, value in enumerate(output) if i > 0 and value is not None]
            if extra:
                position, value = extra[0]
                raise UnsupportedModelError(
                    f"The blocks of {type(self.model).__name__} (`{self.layout.blocks_path}`) pass more than hidden "
                    f"states to the next block (element {position} of their output is a {_describe(value)}, e.g. a "
                    "position bias). The prefix cache can only resume a forward from hidden states, so it cannot be "
                    "used with this model: set `FreezeConfig(cache='off')` (freezing still works)."
                )
            self._tuple_length = len(output)
        else:
            self._tuple_length = None
        raise _BoundaryReached(output)


def _hidden_states(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find the hidden states in a block output of type {type(output).__name__}.")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return type(value).__name__
