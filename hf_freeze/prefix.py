"""Run a model from a boundary: compute the hidden states at a boundary, or feed given states into it.

Both go through the model's own `forward`, so its attention-mask, position and rotary handling, its loss, and
any Accelerate device/autocast hooks or DDP wrapper still apply; no per-model forward code exists here.

- `boundary_states` runs the forward until block `k - 1` has produced its output, then stops it (an exception
  raised from a forward hook), so blocks `[k, L)` and the head never run.
- `inject_states` temporarily replaces blocks `[0, k)` in the block list with stand-ins that return given states,
  so the model's forward skips the frozen blocks and its first real block is block `k`. The embeddings still run;
  they cost a table lookup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .layout import BlockLayout, _dummy_inputs, execution_device


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
        tuple_length = self._block_output_format()
        blocks = self.layout.blocks
        states = states.to(execution_device(blocks[boundary - 1]))
        originals = [blocks[i] for i in range(boundary)]
        for i, block in enumerate(originals):
            blocks[i] = _StandInBlock(block, states, tuple_length)
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block

    def _stop_at_boundary(self, module: nn.Module, args: Any, output: Any) -> None:
        self._tuple_length = len(output) if isinstance(output, tuple) else None
        raise _BoundaryReached(output)

    def _block_output_format(self) -> int | None:
        """`None` when blocks return a tensor, else the length of the tuple they return."""
        if self._tuple_length is False:
            inputs = _dummy_inputs(self.model)
            if inputs is None:
                self._tuple_length = None
            else:
                self.boundary_states(inputs, 1)
        return self._tuple_length  # type: ignore[return-value]


def _hidden_states(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find the hidden states in a block output of type {type(output).__name__}.")
