"""Shareable automatic freezing: the frozen prefix stays the base's, bit for bit (`FreezeConfig.shareable_prefix`).

An automatic policy freezes a unit after it trained for a while, so its frozen weights are no longer the base's: the
fine-tune cannot be saved suffix-only on its base nor served through the base's shared prefix. With
`shareable_prefix=True` the unit's weights as training began are put back the moment it freezes, and the blocks
above it keep training on top of them for the rest of the run (they adapt to the base's prefix). The frozen prefix
is then the base's: `save_suffix` binds the fine-tune to the base's fingerprint, and `ServingEngine` /
`hf-freeze serve` run one prefix for it and every other fine-tune of that base.

`BasePrefix` keeps the copies on the CPU: one per unit a policy may freeze, taken when training begins, each released
as soon as its unit freezes, all of them when training ends. A resumed run cannot take them from the model (its
weights are the checkpoint's): they are read from the base's folder (`model.config._name_or_path`), after checking
that the units frozen before the checkpoint equal that base's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import transformers
from torch import nn

from .layout import BlockLayout
from .policy import units_of

logger = logging.getLogger(__name__)


class ShareablePrefixError(ValueError):
    """The base's weights of the units still to freeze cannot be recovered (a resumed run without its base)."""


class BasePrefix:
    """CPU copies of units' weights (parameters and buffers), handed back to each unit as it freezes.

    Args:
        copies (`dict[int, list[torch.Tensor]]`): per unit (0 = embeddings, `i + 1` = block `i`), its tensors in
            `unit_tensors` order.

    Example:
        ```python
        base = BasePrefix.capture(layout, range(0, 4))     # at train begin
        freeze_prefix(model, 2); base.restore(layout, range(0, 3))   # units 0..2 are the base's again
        base.release()                                      # at train end
        ```
    """

    def __init__(self, copies: dict[int, list[torch.Tensor]]) -> None:
        self.copies = copies

    @classmethod
    def capture(cls, layout: BlockLayout, units: Iterable[int]) -> BasePrefix:
        """Copy the current weights of `units` of `layout` to the CPU."""
        return cls({unit: [t.detach().to("cpu", copy=True) for t in unit_tensors(layout, unit)] for unit in units})

    @classmethod
    def from_base(cls, model: nn.Module, layout: BlockLayout, units: Iterable[int], frozen_units: int,
                  source: str | None = None) -> BasePrefix:
        """The copies of `units` read from the base `model` was loaded from, for a resumed run.

        The base is `source`, default `model.config._name_or_path`, loaded with `model`'s own class. The first
        `frozen_units` units of `model` (frozen before the checkpoint) must equal the base's, or this refuses.

        Raises:
            `ShareablePrefixError`: no base to read, or a base whose weights differ from the frozen prefix.
        """
        from .layout import find_layout

        source = source or str(getattr(model.config, "_name_or_path", "") or "")
        if not source:
            raise ShareablePrefixError(
                "shareable_prefix=True: a resumed run needs the base's weights of the units not yet frozen, and this "
                "model does not say where it was loaded from (`config._name_or_path` is empty). Build the model with "
                "`from_pretrained(<base>)` before resuming, or train without shareable_prefix."
            )
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the base lacks the fine-tune's head: expected, not news
        try:
            base = type(model).from_pretrained(source, config=model.config)
        except (OSError, ValueError) as error:
            raise ShareablePrefixError(
                f"shareable_prefix=True: a resumed run reads the base's weights of the units not yet frozen from "
                f"{source!r}, which cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0]}). Make "
                "the base available there, or train without shareable_prefix."
            ) from error
        finally:
            transformers.logging.set_verbosity(verbosity)
        base_layout = find_layout(base, layout.blocks_path)
        for unit in range(frozen_units):
            if not all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(unit_tensors(layout, unit),
                                                                     unit_tensors(base_layout, unit), strict=True)):
                raise ShareablePrefixError(
                    f"shareable_prefix=True: unit {unit} ({'the embeddings' if unit == 0 else f'block {unit - 1}'}) "
                    f"of the resumed model is frozen but differs from the base at {source!r}: this checkpoint was "
                    "not trained from that base (or not with shareable_prefix). Resume with the model built from "
                    "the base the run started from."
                )
        return cls.capture(base_layout, units)

    def restore(self, layout: BlockLayout, units: Iterable[int]) -> list[int]:
        """Write the copies of `units` back into `layout`'s modules (in place) and release them; returns the units
        restored (a unit without a copy, e.g. frozen before training began, is left as it is)."""
        restored = []
        with torch.no_grad():
            for unit in units:
                copies = self.copies.pop(unit, None)
                if copies is None:
                    continue
                for tensor, copy in zip(unit_tensors(layout, unit), copies, strict=True):
                    tensor.copy_(copy)
                restored.append(unit)
        return restored

    def release(self) -> None:
        """Drop every copy (training ended)."""
        self.copies.clear()

    @property
    def nbytes(self) -> int:
        """CPU bytes the copies still hold."""
        return sum(t.numel() * t.element_size() for copies in self.copies.values() for t in copies)


def unit_tensors(layout: BlockLayout, unit: int) -> list[torch.Tensor]:
    """The parameters, then the buffers, of one unit's modules, in module order (one entry per shared tensor)."""
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in layout.unit_modules(unit):
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


def base_prefix_for(model: nn.Module, layout: BlockLayout, boundary: int | None, max_boundary: int, *,
                    resumed: bool) -> BasePrefix:
    """The copies a run with `shareable_prefix=True` needs at train begin: the units after `boundary` (frozen now)
    up to `max_boundary` (the furthest its policy freezes), from the model itself, or for a `resumed` run from its
    base (`BasePrefix.from_base`)."""
    frozen = units_of(boundary)
    units = range(frozen, units_of(max_boundary))
    copies = BasePrefix.from_base(model, layout, units, frozen) if resumed else BasePrefix.capture(layout, units)
    logger.info("hf_freeze: shareable_prefix keeps the base's weights of units %d..%d on the CPU (%.1f MB) until "
                "each freezes.", units.start, units.stop - 1, copies.nbytes / 2**20)
    return copies
