"""Apply a frozen prefix to a model: `freeze_prefix`, `unfreeze`, `frozen_boundary`.

Boundary `k` freezes the embeddings and blocks `[0, k)`:
- their parameters get `requires_grad=False` and lose any `.grad`;
- they run in eval mode (dropout off) even after `model.train()`, so their output is deterministic;
- they run under `no_grad`, so they build no autograd graph and none of their activations are saved for
  backward, even when `enable_input_require_grads()` (used by gradient checkpointing and PEFT) forces the input
  embeddings' output to require grad;
- with an optimizer, their state is released and they leave its param groups (see `optim.py`).

Everything is done with forward hooks that `unfreeze` removes; no module's `forward` is replaced.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .fingerprint import forget_digests
from .fsdp import reshard
from .layout import BlockLayout, find_layout
from .optim import release_parameters

logger = logging.getLogger(__name__)

_STATE_ATTR = "_hf_freeze_state"


@dataclass
class FreezeState:
    """What hf_freeze did to one model; stored on the model itself."""

    layout: BlockLayout
    boundary: int | None = None
    untied: list[str] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    boundary_handle: RemovableHandle | None = None


@dataclass(frozen=True)
class FreezeResult:
    """What one `freeze_prefix` call changed."""

    boundary: int
    previous_boundary: int | None
    newly_frozen_parameters: int
    optimizer_bytes_released: int
    untied: tuple[str, ...]


def get_layout(model: nn.Module, blocks_path: str | None = None) -> BlockLayout:
    """The model's `BlockLayout`, found once and remembered on the model."""
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and (blocks_path is None or blocks_path == state.layout.blocks_path):
        return state.layout
    layout = find_layout(model, blocks_path)
    reshard(model)  # FSDP2: the tracing forward stopped at block 0, with the root's parameters gathered
    object.__setattr__(model, _STATE_ATTR, FreezeState(layout=layout))
    return layout


def frozen_boundary(model: nn.Module) -> int | None:
    """Number of frozen blocks (the embeddings are frozen too), or `None` when nothing is frozen."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.boundary


def freeze_prefix(
    model: nn.Module,
    num_blocks: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    tied_weights: str = "untie",
    blocks_path: str | None = None,
) -> FreezeResult:
    """Freeze the embeddings and blocks `[0, num_blocks)` of `model`.

    Args:
        model (`nn.Module`): a transformers model (the top-level object you call, e.g. `*ForSequenceClassification`).
        num_blocks (`int`): the new boundary, from 0 (embeddings only) to the number of blocks.
        optimizer (`torch.optim.Optimizer`, *optional*): when given, the newly frozen parameters leave it and their
            state is freed.
        tied_weights (`str`, defaults to `"untie"`): a parameter shared between the frozen prefix and a trainable
            module (typically `lm_head` tied to the input embeddings) is copied for the prefix so the trainable
            side keeps training (`"untie"`; the model's config gets `tie_word_embeddings=False` so it saves and
            reloads untied), or frozen for both (`"freeze"`).
        blocks_path (`str`, *optional*): dotted path of the blocks' ModuleList when detection fails.

    Returns:
        `FreezeResult`

    Example:
        ```python
        freeze_prefix(model, 4)      # embeddings + blocks 0..3 frozen
        frozen_boundary(model)       # 4
        ```
    """
    layout = get_layout(model, blocks_path)
    state: FreezeState = getattr(model, _STATE_ATTR)
    reshard(model)  # FSDP2: freeze the sharded parameters, not gathered copies a stopped forward left behind
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"`num_blocks` must be an int, got {type(num_blocks).__name__}.")
    if not 0 <= num_blocks <= layout.num_blocks:
        raise ValueError(
            f"Boundary {num_blocks} is outside [0, {layout.num_blocks}]: {type(model).__name__} has "
            f"{layout.num_blocks} blocks at `{layout.blocks_path}`. Use a boundary between 0 (embeddings only) and "
            f"{layout.num_blocks} (every block; only the head trains)."
        )
    if state.boundary is not None and num_blocks < state.boundary:
        raise ValueError(
            f"The frozen prefix only grows: the model is frozen up to block {state.boundary}, asked for "
            f"{num_blocks}. Call `unfreeze(model)` first to start over."
        )
    if tied_weights not in ("untie", "freeze"):
        raise ValueError(f"`tied_weights` must be 'untie' or 'freeze', got {tied_weights!r}.")

    previous = state.boundary
    start = 0 if previous is None else previous + 1  # unit index: 0 = embeddings, i + 1 = block i
    new_modules = [m for unit in range(start, num_blocks + 1) for m in layout.unit_modules(unit)]
    untied = _untie_shared_parameters(model, layout, num_blocks, new_modules) if tied_weights == "untie" else []
    new_params = _unique_parameters(new_modules)
    for param in new_params:
        param.requires_grad_(False)
        param.grad = None
    for module in new_modules:
        module.eval()
        state.handles.append(module.register_forward_pre_hook(_enter_frozen))
        state.handles.append(module.register_forward_hook(_exit_frozen, always_call=True))
    if previous is None:
        state.handles.append(model.register_forward_pre_hook(_keep_prefix_in_eval(state)))
    _move_boundary_hook(model, state, num_blocks)
    freed = release_parameters(optimizer, new_params) if optimizer is not None else 0
    state.boundary = num_blocks
    state.untied.extend(untied)
    return FreezeResult(
        boundary=num_blocks,
        previous_boundary=previous,
        newly_frozen_parameters=sum(p.numel() for p in new_params),
        optimizer_bytes_released=freed,
        untied=tuple(untied),
    )


def unfreeze(model: nn.Module) -> None:
    """Undo `freeze_prefix`: remove the hooks and make the prefix trainable again.

    Untied weights stay untied (the copies have diverged), and parameters released from an optimizer must be
    added back by the caller (or a new optimizer created).
    """
    state: FreezeState | None = getattr(model, _STATE_ATTR, None)
    if state is None or state.boundary is None:
        return
    for handle in [*state.handles, *([state.boundary_handle] if state.boundary_handle else [])]:
        handle.remove()
    for param in _unique_parameters(state.layout.prefix_modules(state.boundary)):
        param.requires_grad_(True)
    for module in state.layout.prefix_modules(state.boundary):
        module.train(model.training)
    state.handles, state.boundary_handle, state.boundary = [], None, None
    forget_digests(model)  # the prefix may change now: remembered fingerprints of its units no longer hold


def frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the frozen prefix (empty when nothing is frozen)."""
    boundary = frozen_boundary(model)
    if boundary is None:
        return []
    return _unique_parameters(get_layout(model).prefix_modules(boundary))


def untied_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that were untied from the frozen prefix (e.g. `lm_head.weight`)."""
    state = getattr(model, _STATE_ATTR, None)
    return [] if state is None else list(state.untied)


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


_grad_modes = threading.local()


def _enter_frozen(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen module: eval mode, and `no_grad` until `_exit_frozen`."""
    if module.training:
        module.eval()
    stack = _grad_modes.__dict__.setdefault("stack", [])
    stack.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _exit_frozen(module: nn.Module, args: tuple, output: object) -> None:
    """Forward hook (also called when the forward raises): restore the grad mode `_enter_frozen` saved."""
    torch.set_grad_enabled(_grad_modes.stack.pop())


def _keep_prefix_in_eval(state: FreezeState):
    """Root pre-hook: `Trainer` calls `model.train()` every step; put the frozen prefix back in eval before the
    forward, early enough for gradient-checkpointing wrappers, which check `self.training` before any hook."""

    def hook(model: nn.Module, args: tuple) -> None:
        if state.boundary is not None:
            for module in state.layout.prefix_modules(state.boundary):
                if module.training:
                    module.eval()

    return hook


def _move_boundary_hook(model: nn.Module, state: FreezeState, boundary: int) -> None:
    """With gradient checkpointing, the first active block's input must require grad or reentrant checkpointing
    silently gives its parameters no gradient. The frozen prefix produces a tensor without grad, so mark it."""
    if state.boundary_handle is not None:
        state.boundary_handle.remove()
        state.boundary_handle = None
    if boundary == 0 or boundary == state.layout.num_blocks:
        return  # boundary 0: transformers' own enable_input_require_grads hook covers it; L: nothing active

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        if not (torch.is_grad_enabled() and uses_activation_checkpointing(model)):
            return None
        if isinstance(output, torch.Tensor):
            return output.detach().requires_grad_(True)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (output[0].detach().requires_grad_(True), *output[1:])
        return None

    state.boundary_handle = state.layout.blocks[boundary - 1].register_forward_hook(hook)


def uses_activation_checkpointing(model: nn.Module) -> bool:
    """True when `model` runs its blocks under gradient (activation) checkpointing."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _untie_shared_parameters(
    model: nn.Module, layout: BlockLayout, boundary: int, new_modules: list[nn.Module]
) -> list[str]:
    """Give newly frozen modules their own copy of any parameter a trainable module also uses."""
    frozen_tree = {id(sub) for m in layout.prefix_modules(boundary) for sub in m.modules()}
    trainable_users: dict[int, str] = {}
    for name, module in model.named_modules():
        if id(module) not in frozen_tree:
            for pname, param in module.named_parameters(recurse=False):
                trainable_users.setdefault(id(param), f"{name}.{pname}" if name else pname)
    untied = []
    for module in new_modules:
        for sub in module.modules():
            for pname, param in list(sub.named_parameters(recurse=False)):
                if id(param) in trainable_users:
                    setattr(sub, pname, nn.Parameter(param.detach().clone(), requires_grad=False))
                    untied.append(trainable_users[id(param)])
    if untied:
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        logger.info("hf_freeze: untied %s from the frozen prefix; it keeps training.", ", ".join(untied))
    return untied
