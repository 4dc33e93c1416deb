"""Find the stack of transformer blocks in a Hugging Face model: the embeddings, the ordered blocks, the head.

The rule is generic. The blocks are the longest `nn.ModuleList` whose members all share one class, preferring
classes that transformers itself lists in `_no_split_modules` (the unit Accelerate keeps on one device). The
embeddings are whatever the model's forward runs before the first block, found by tracing a tiny forward that
stops at block 0. Everything else (final norm, pooler, task head) is the head and is never frozen by a policy.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

# Families where the generic rule picks the wrong ModuleList, mapped to the right dotted path. Keep it small:
# every entry needs a test in tests/test_layout.py. `blocks_path=` lets users cover the rest.
BLOCKS_PATH_OVERRIDES: dict[str, str] = {}


class UnsupportedModelError(ValueError):
    """The model has no single stack of identical blocks that hf_freeze can freeze as a prefix."""


@dataclass(frozen=True)
class BlockLayout:
    """Where a model's embeddings, blocks and head live.

    Attributes:
        blocks_path (`str`): dotted name of the `nn.ModuleList` that holds the blocks, e.g. `"bert.encoder.layer"`.
        blocks (`nn.ModuleList`): the blocks in forward order.
        embedding_names (`tuple[str, ...]`): dotted names of the modules the forward runs before block 0.
        embeddings (`tuple[nn.Module, ...]`): those modules.
    """

    blocks_path: str
    blocks: nn.ModuleList
    embedding_names: tuple[str, ...]
    embeddings: tuple[nn.Module, ...]

    @property
    def num_blocks(self) -> int:
        """Number of blocks `L`; a boundary is an integer in `[0, L]`."""
        return len(self.blocks)

    def prefix_modules(self, boundary: int) -> list[nn.Module]:
        """The modules frozen at `boundary`: the embeddings, then blocks `[0, boundary)`."""
        return [*self.embeddings, *self.blocks[:boundary]]

    def unit_modules(self, unit: int) -> list[nn.Module]:
        """Freezing units in forward order: unit 0 is the embeddings, unit `i + 1` is block `i`."""
        return list(self.embeddings) if unit == 0 else [self.blocks[unit - 1]]

    @property
    def num_units(self) -> int:
        return self.num_blocks + 1

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that belong to neither the embeddings nor a block."""
        inside = {id(p) for m in self.prefix_modules(self.num_blocks) for p in m.parameters()}
        return [p for p in model.parameters() if id(p) not in inside]


def find_layout(model: nn.Module, blocks_path: str | None = None) -> BlockLayout:
    """Locate the embeddings, the blocks and (implicitly) the head of `model`.

    Args:
        model (`nn.Module`): a transformers model, base or with a task head, possibly placed with `device_map`.
        blocks_path (`str`, *optional*): dotted path of the blocks' `nn.ModuleList`, when the generic rule fails.

    Returns:
        `BlockLayout`

    Raises:
        `UnsupportedModelError`: the model has no block list, or several equally plausible ones.

    Example:
        ```python
        layout = find_layout(AutoModelForSequenceClassification.from_pretrained("bert-base-uncased"))
        layout.blocks_path  # 'bert.encoder.layer'
        ```
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and blocks_path is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model with two block stacks; hf_freeze freezes one "
            "stack as a prefix. Pass `blocks_path=` (e.g. 'encoder.block') to choose one."
        )
    path = blocks_path or BLOCKS_PATH_OVERRIDES.get(getattr(config, "model_type", ""), None) or _find_blocks_path(model)
    blocks = _get_module_list(model, path)
    embedding_names = _trace_embeddings(model, blocks) or _static_embeddings(model, path)
    modules = dict(model.named_modules())
    return BlockLayout(
        blocks_path=path,
        blocks=blocks,
        embedding_names=tuple(embedding_names),
        embeddings=tuple(modules[name] for name in embedding_names),
    )


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: Accelerate's `execution_device` when it placed the module, else its
    first parameter's or buffer's device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else accelerator_device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def accelerator_device(index: int) -> torch.device:
    """The device an integer index means (Accelerate's device maps use plain integers for accelerators): device
    `index` of the current accelerator type (cuda, xpu, mps, npu, ...), as `torch.accelerator` reports it."""
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    if current is None:
        if torch.cuda.is_available():
            return torch.device("cuda", index)
        raise ValueError(f"Device index {index} names an accelerator, but torch sees none on this machine.")
    return torch.device(current.type, index)


def _find_blocks_path(model: nn.Module) -> str:
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    }
    if not candidates:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.ModuleList of identical blocks (found modules: "
            f"{_describe_children(model)}). hf_freeze freezes a prefix of such a list; pass `blocks_path=` if the "
            "blocks live elsewhere."
        )
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    preferred = {n: m for n, m in candidates.items() if type(m[0]).__name__ in no_split}
    pool = preferred or candidates
    # A list nested inside another candidate's blocks (e.g. per-layer experts) is never the block stack.
    pool = {n: m for n, m in pool.items() if not any(n.startswith(other + ".") for other in pool if other != n)}
    longest = max(len(m) for m in pool.values())
    best = sorted(n for n, m in pool.items() if len(m) == longest)
    if len(best) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} has several block lists of length {longest}: {best}. Pass `blocks_path=` with "
            "the one to freeze."
        )
    return best[0]


def _get_module_list(model: nn.Module, path: str) -> nn.ModuleList:
    try:
        module = model.get_submodule(path)
    except AttributeError as error:
        raise UnsupportedModelError(
            f"`blocks_path={path!r}` does not exist in {type(model).__name__} (top-level modules: "
            f"{_describe_children(model)})."
        ) from error
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        raise UnsupportedModelError(f"`{path}` in {type(model).__name__} is a {type(module).__name__}, not a "
                                    "non-empty nn.ModuleList of blocks.")
    return module


class _ReachedFirstBlock(Exception):
    pass


def _trace_embeddings(model: nn.Module, blocks: nn.ModuleList) -> list[str]:
    """Names of the outermost modules the forward calls before block 0, found with a forward that stops there.

    Returns `[]` only when the model takes no `input_ids` (the static rule then applies). Any other failure is an
    `UnsupportedModelError`: falling back silently would leave position / token-type embeddings and norms that run
    before block 0 trainable and outside the frozen prefix, while cached boundary states assume them frozen.
    """
    inputs = _dummy_inputs(model)
    if inputs is None:
        return []
    names = {module: name for name, module in model.named_modules()}
    blocks_name = names[blocks]
    # Containers of the blocks (the base model, the encoder) and the blocks themselves are not embeddings.
    skipped = {name for name in names.values() if _is_ancestor(name, blocks_name) or _is_ancestor(blocks_name, name)}
    called: list[str] = []

    def record(module: nn.Module, args: tuple) -> None:
        name = names[module]
        if name not in skipped:
            called.append(name)

    def stop(module: nn.Module, args: tuple) -> None:
        raise _ReachedFirstBlock

    handles = [m.register_forward_pre_hook(record) for m in names if m is not model]
    handles.append(blocks[0].register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            model(**inputs)
    except _ReachedFirstBlock:
        pass
    except Exception as error:
        raise UnsupportedModelError(
            f"Could not find the embeddings of {type(model).__name__}: a forward with dummy `input_ids` of shape "
            f"{tuple(inputs['input_ids'].shape)}, stopped at block 0 of `{blocks_name}`, failed with "
            f"{type(error).__name__}: {error}. hf_freeze traces that forward to find every module that runs before "
            "the blocks (position and token-type embeddings, norms), which are frozen and fingerprinted with the "
            "prefix. Fix the model so that `model(input_ids=..., attention_mask=...)` runs, or pass `blocks_path=` "
            "if these are not the blocks the forward runs first."
        ) from error
    else:
        raise UnsupportedModelError(
            f"A forward of {type(model).__name__} with `input_ids` finished without calling block 0 of "
            f"`{blocks_name}`: these are not the blocks the forward runs. Pass `blocks_path=` with the right "
            "nn.ModuleList."
        )
    finally:
        for handle in handles:
            handle.remove()
    outermost = [n for n in dict.fromkeys(called) if not any(_is_ancestor(other, n) for other in called if other != n)]
    return outermost


def _static_embeddings(model: nn.Module, blocks_path: str) -> list[str]:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        raise UnsupportedModelError(
            f"Could not find the embeddings of {type(model).__name__}: its forward takes no `input_ids` to trace "
            "and it has no `get_input_embeddings()`."
        )
    return [name for name, module in model.named_modules() if module is embeddings]


def _dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """`input_ids` (and `attention_mask` where the forward takes one), or `None` for a model that takes no
    `input_ids` (vision, audio, or a plain module with another signature)."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    accepted = _forward_arguments(model)
    if accepted is not None and "input_ids" not in accepted:
        return None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = execution_device(embeddings) if embeddings is not None else torch.device("cpu")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
    ids = torch.arange(1, 5, device=device).clamp(max=vocab - 1).unsqueeze(0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if accepted is not None and "attention_mask" not in accepted:
        del inputs["attention_mask"]
    return inputs


def _forward_arguments(model: nn.Module) -> set[str] | None:
    """Keyword arguments `model.forward` accepts; `None` when it takes `**kwargs` (anything goes)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin or C extension): try the forward as it is
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}


def _is_ancestor(ancestor: str, name: str) -> bool:
    """True when module `ancestor` contains module `name` (the root "" contains everything)."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _describe_children(model: nn.Module) -> str:
    counts = Counter(type(m).__name__ for m in model.modules())
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.most_common(8))
