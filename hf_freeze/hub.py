"""Model cards that record the freeze, and pushing saved folders (full or suffix-only) to the Hugging Face Hub.

The card is rendered from `model_cards/hf_freeze_card.md` through `huggingface_hub.ModelCard.from_template`, with
its metadata in `ModelCardData`: `base_model`, `base_model_relation` (`adapter` for a suffix-only folder, which
needs its base; `finetune` for a full one), `library_name`, tags and the evaluation results (`model-index`).
Logged counters that are not evaluation results (`cache/*`, `freeze/*`, runtimes) stay out of the metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import math
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError

from .atomic import write_text_atomic
from .checkpoint import (
    METADATA_NAME,
    FreezeMetadata,
    is_hub_id,
    prefix_trained_steps,
    read_metadata,
    verify_checksums,
    write_metadata,
)
from .config import FreezeConfig
from .report import describe_boundary

TEMPLATE = "hf_freeze_card.md"
CARD_NAME = "README.md"
PLOT_NAME = "freeze_timeline.png"
LIBRARY_TAGS = ["hf-freeze", "layer-freezing"]
# Logged values that describe the run, not the model's quality: never in `model-index` or the results table.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step")
_NOT_METRIC_PREFIXES = ("cache/", "freeze/", "total_flos")
# The loading line of the card's snippet (see `_snippet`), whose argument `push_folder` points at the repo.
_SNIPPET_SOURCE = re.compile(r'^(model = (?:load_suffix|\w+\.from_pretrained))\("[^"\n]*"\)', re.MULTILINE)
_POLICY_KNOBS = {
    "gradnorm": ("interval", "interval_steps", "percentile", "freeze_start", "max_boundary"),
    "schedule": ("schedule", "interval", "interval_steps", "schedule_fraction", "freeze_start", "freeze_level",
                 "max_boundary"),
    "fixed": ("boundary",),
    "budget": ("target_speedup", "budget_plan", "freeze_start", "max_boundary"),
}


class PushError(RuntimeError):
    """A push to the Hub could not start (no token, no connection) or the Hub refused it."""


def evaluation_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """The evaluation results in one `Trainer` log entry: `eval_*` numbers, without runtimes and counters.

    Example:
        ```python
        evaluation_metrics({"eval_accuracy": 0.9, "eval_runtime": 3.1, "cache/hits": 12})  # {'accuracy': 0.9}
        ```
    """
    metrics = {}
    for key, value in logs.items():
        if not key.startswith("eval_") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name = key[len("eval_"):]
        if name.startswith(_NOT_METRIC_PREFIXES) or name.endswith(_NOT_METRICS) or not math.isfinite(value):
            continue
        metrics[name] = float(value)
    return metrics


def describe_policy(config: FreezeConfig) -> str:
    """One line for the card: the policy and its knobs, e.g. "`gradnorm` (interval='epoch', ...)"."""
    values = {k: getattr(config, k) for k in _POLICY_KNOBS.get(config.policy, ())}
    knobs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in values.items())
    return f"`{config.policy}` ({knobs}), prefix cache `{config.cache}`"


def build_model_card(
    metadata: FreezeMetadata,
    *,
    model_name: str,
    repo_id: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
    log_history: list[dict[str, Any]] | None = None,
    speedup: float | None = None,
    policy: str | None = None,
    plot: str | None = None,
    language: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    base_model_id: str | None = None,
) -> ModelCard:
    """A model card recording the base, the freeze (boundary, timeline, plot), the results and how to load it.

    Args:
        metadata (`FreezeMetadata`): what `hf_freeze.json` holds (`checkpoint.read_metadata`, `full_metadata`).
        model_name (`str`): the card's title and `model-index` name.
        repo_id (`str`, *optional*): the Hub repo (for the loading snippet); default `model_name`.
        task (`str`, *optional*): the pipeline tag, e.g. `"text-classification"`, `"text-generation"`.
        dataset (`str`, *optional*): the training dataset's Hub id or name.
        metrics (`dict[str, float]`, *optional*): final evaluation results (see `evaluation_metrics`).
        log_history (`list[dict]`, *optional*): `trainer.state.log_history`, for the table of evaluations.
        speedup (`float`, *optional*): measured speed-up over full fine-tuning (e.g. the recipes' `--baseline_steps`).
        policy (`str`, *optional*): one line describing the freeze policy.
        plot (`str`, *optional*): file name of the timeline PNG uploaded beside the card.
        language, license (`str`, *optional*), tags (`list[str]`, *optional*): card metadata (tags are added to
            hf_freeze's own).
        base_model_id (`str`, *optional*): the base's Hub id, for a base the metadata knows only by a local path
            (the card's `base_model`).

    Returns:
        `huggingface_hub.ModelCard`

    Example:
        ```python
        card = build_model_card(read_metadata("out/suffix"), model_name="minilm-rt", task="text-classification")
        card.save("out/suffix/README.md")
        ```
    """
    repo_id = repo_id or model_name
    if base_model_id is not None:
        metadata = dataclasses.replace(metadata, base_model=base_model_id)
    base = metadata.base_model
    relation = "adapter" if metadata.suffix_only else "finetune"
    eval_results = None
    metrics = metrics or {}
    if metrics and task and dataset:
        eval_results = [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=name,
                                   metric_value=value) for name, value in metrics.items()]
    card_data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name="hf-freeze" if metadata.suffix_only else "transformers",
        tags=list(dict.fromkeys([*LIBRARY_TAGS, *(["suffix-only"] if metadata.suffix_only else []), *(tags or [])])),
        pipeline_tag=task,
        datasets=[dataset] if dataset else None,
        eval_results=eval_results,
        model_name=model_name,
        language=language,
        license=license,
        base_model_relation=relation if is_hub_id(base) else None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template(),
        model_name=model_name,
        summary=_summary(metadata, metrics),
        library_version=metadata.library_version,
        num_blocks=metadata.num_blocks,
        blocks_path=metadata.blocks_path,
        boundary_text=describe_boundary(metadata.boundary)
        + ("" if metadata.boundary is None else f" (boundary {metadata.boundary} of {metadata.num_blocks})"),
        policy=policy,
        untied=", ".join(f"`{name}`" for name in metadata.untied),
        fingerprint=metadata.prefix_fingerprint or "none (nothing frozen)",
        fingerprint_note=_fingerprint_note(metadata),
        speedup_text=(f"{speedup:.2f}x, measured in the same run." if speedup else
                      "not measured in this run (the recipes measure it with `--baseline_steps N`)."),
        timeline_rows=_timeline_rows(metadata.timeline),
        plot=plot,
        results_table=_results_table(log_history or []),
        snippet=_snippet(metadata, repo_id),
        format_text=_format_text(metadata),
    )


def write_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write `card` as `README.md` in `directory`, atomically."""
    path = Path(directory) / CARD_NAME
    write_text_atomic(path, str(card))
    return path


def push_folder(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with hf_freeze",
    base_model_id: str | None = None,
) -> str:
    """Push a folder saved by hf_freeze (full or suffix-only) to a Hub model repo, with a model card.

    A folder without `README.md` gets one from its metadata (`build_model_card`). The repo is created if needed.
    With `base_model_id`, the base's Hub id is recorded first in `hf_freeze.json` (so `load_suffix(repo_id)` finds
    the base on the Hub; the local folder it was loaded from stays as `base_model_path`) and in the card.

    Args:
        directory (`str` or `os.PathLike`): a folder holding `hf_freeze.json`.
        repo_id (`str`): `user/name` on the Hub (or the server `HF_ENDPOINT` names).
        token (`str`, *optional*): a write token; default: the logged-in one (`hf auth login`, `HF_TOKEN`).
        private (`bool`, *optional*): create the repo private.
        revision (`str`, *optional*): the branch to commit to.
        commit_message (`str`): the commit's message.
        base_model_id (`str`, *optional*): the base's Hub id, when the metadata knows the base only by a local path.

    Returns:
        `str`: the commit's URL.

    Raises:
        `PushError`: no token, the Hub unreachable, or the Hub refused (the message names the status and the fix).
        `CheckpointError`: no readable `hf_freeze.json`, or a weight file whose sha256 differs from the recorded one.

    Example:
        ```python
        push_folder("out/suffix", "me/minilm-rotten-tomatoes-suffix")
        ```
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    verify_checksums(directory, metadata)  # never upload (or re-record) weights that changed after saving
    token = token or get_token()
    if not token:
        raise PushError(
            f"No Hugging Face token to push {directory} to {repo_id}. Log in with `hf auth login`, set `HF_TOKEN`, "
            "or pass `token=` (it needs write access)."
        )
    if base_model_id is not None and base_model_id != metadata.base_model:
        metadata = _record_base_model_id(directory, metadata, base_model_id)
    card_path = directory / CARD_NAME
    if not card_path.exists():
        plot = PLOT_NAME if (directory / PLOT_NAME).exists() else None
        write_model_card(build_model_card(metadata, model_name=repo_id.split("/")[-1], repo_id=repo_id, plot=plot),
                         directory)
    else:  # a card rendered before the repo was known loads the model from a local path: point it at the repo
        text = card_path.read_text()
        retargeted = _SNIPPET_SOURCE.sub(lambda m: f'{m.group(1)}("{repo_id}")', text)
        if base_model_id is not None:
            retargeted = _with_base_model(retargeted, metadata)
        if retargeted != text:
            write_text_atomic(card_path, retargeted)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=directory, revision=revision,
                                   commit_message=commit_message, ignore_patterns=["checkpoint-*", ".*", "_*"])
    except HfHubHTTPError as error:
        raise push_error(error, repo_id) from error
    except (OSError, *_transport_errors()) as error:  # offline mode, no connection, a wrong HF_ENDPOINT
        raise PushError(f"Could not reach the Hub to push {directory} to {repo_id} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}). Check the connection and HF_ENDPOINT, "
                        "and unset HF_HUB_OFFLINE.") from error
    return commit.commit_url


def push_error(error: HfHubHTTPError, repo_id: str) -> PushError:
    """A `PushError` that says why the Hub refused a push to `repo_id` and what to do."""
    status = getattr(error.response, "status_code", None)
    fixes = {
        401: "the token is invalid or expired: log in again with `hf auth login` or set a valid `HF_TOKEN`",
        403: f"the token may not write to `{repo_id.split('/')[0]}`: use a write token of that user or organization",
        404: f"the repo `{repo_id}` does not exist and could not be created: check the name",
    }
    fix = fixes.get(status, "check the repo name, your token's permissions and the server's message")
    detail = getattr(error, "server_message", None) or str(error).splitlines()[0]
    return PushError(f"The Hub refused the push to {repo_id} (HTTP {status}: {detail.strip()}). Fix: {fix}.")


def card_for_folder(directory: str | os.PathLike, **kwargs: Any) -> ModelCard:
    """`build_model_card` from a saved folder's `hf_freeze.json` (keyword arguments as in `build_model_card`)."""
    kwargs.setdefault("model_name", Path(directory).resolve().name)
    return build_model_card(read_metadata(directory), **kwargs)


# ---- helpers ----


def _record_base_model_id(directory: Path, metadata: FreezeMetadata, base_model_id: str) -> FreezeMetadata:
    """Record the base's Hub id in `hf_freeze.json`, keeping a local base folder as `base_model_path`."""
    if not is_hub_id(base_model_id):
        raise ValueError(f"`base_model_id` must be a Hub id (`user/name`), got {base_model_id!r}.")
    local = metadata.base_model if metadata.base_model and Path(metadata.base_model).is_dir() else None
    metadata = dataclasses.replace(metadata, base_model=base_model_id,
                                   base_model_path=metadata.base_model_path or (str(Path(local).resolve())
                                                                                if local else None))
    write_metadata(directory, metadata)
    return metadata


def _with_base_model(card_text: str, metadata: FreezeMetadata) -> str:
    """An existing card with the metadata's Hub base in its `base_model` (and relation)."""
    card = ModelCard(card_text)
    card.data.base_model = metadata.base_model
    card.data.base_model_relation = "adapter" if metadata.suffix_only else "finetune"
    return str(card)


def _fingerprint_note(metadata: FreezeMetadata) -> str:
    """What the card may say about the prefix fingerprint and the base's: only what the metadata shows."""
    if metadata.boundary is None:
        return ""
    checked = (" `load_suffix` compares it with the base's own fingerprint and refuses a base whose prefix "
               "differs.") if metadata.suffix_only else ""
    trained = prefix_trained_steps(metadata)
    if trained:
        return (f"The prefix trained for up to {trained} optimizer steps before it froze, so this is not the base's "
                "prefix fingerprint: the frozen weights are this fine-tune's own.")
    if not metadata.timeline:
        return "No freeze timeline was recorded, so whether the prefix trained before it froze is unknown." + checked
    return "The prefix froze before the first optimizer step, from the weights it was loaded with." + checked


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection errors (huggingface_hub 2 uses `httpx2`, 1.x `httpx`); they are not `OSError`."""
    errors = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _template() -> str:
    """The card template: from the source tree when running from a checkout, else from the installed package."""
    source = Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE
    if source.is_file():
        return source.read_text()
    return importlib.resources.files("hf_freeze.model_cards").joinpath(TEMPLATE).read_text()


def _summary(metadata: FreezeMetadata, metrics: dict[str, float]) -> str:
    base = metadata.base_model
    base_text = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"a local model (`{base}`)"
    if base is None:
        base_text = "a base model that was not recorded"
    kind = (f"A suffix-only checkpoint: only blocks [{metadata.boundary}, {metadata.num_blocks}) and the head are "
            f"stored; the embeddings and blocks [0, {metadata.boundary}) are {base_text}'s own, loaded and checked by "
            "fingerprint when this model is loaded.") if metadata.suffix_only else (
        f"A fine-tune of {base_text} (full weights).")
    results = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    return kind + (f" Evaluation: {results}." if results else "")


def _timeline_rows(timeline: list[dict[str, Any]]) -> str:
    rows = [f"| {e['step']} | {float(e['epoch']):.2f} | {describe_boundary(e['boundary'])} | {e.get('reason', '')} |"
            for e in timeline]
    return "\n".join(rows) or "| - | - | nothing | no freeze was decided |"


def _results_table(log_history: list[dict[str, Any]]) -> str:
    """One row per evaluation: epoch, step, the last training loss before it, and the evaluation results."""
    by_step, train_loss = {}, None
    for entry in log_history:
        if "loss" in entry:
            train_loss = entry["loss"]
        metrics = evaluation_metrics(entry)
        if metrics:  # a final `evaluate()` at the last step repeats that step's evaluation: keep one row
            by_step[(entry.get("epoch"), entry.get("step"))] = (entry.get("epoch"), entry.get("step"), train_loss,
                                                                metrics)
    rows = list(by_step.values())
    if not rows:
        return ""
    names = list(dict.fromkeys(name for *_, metrics in rows for name in metrics))
    lines = ["| epoch | step | training loss | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for epoch, step, loss, metrics in rows:
        cells = [_number(epoch, 2), str(step if step is not None else "-"), _number(loss, 4)]
        cells += [_number(metrics.get(name), 4) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _snippet(metadata: FreezeMetadata, repo_id: str) -> str:
    if metadata.suffix_only:
        return (
            "from hf_freeze.checkpoint import load_suffix\n\n"
            f'model = load_suffix("{repo_id}")  # loads the base {metadata.base_model}, checks its fingerprint\n'
            "# or, sharing one base between fine-tunes: load_suffix(repo, base=base_model_object)"
        )
    return (
        f"from transformers import {metadata.architecture}\n\n"
        f'model = {metadata.architecture}.from_pretrained("{repo_id}")\n'
        + ("" if metadata.boundary is None else
           "# to keep training with the same frozen prefix:\n"
           f"from hf_freeze import freeze_prefix\nfreeze_prefix(model, {metadata.boundary})")
    )


def _format_text(metadata: FreezeMetadata) -> str:
    files = f"`{METADATA_NAME}`, which records the base, the boundary, the prefix fingerprint and the freeze timeline."
    if metadata.suffix_only:
        return (f"Files: `config.json`, `suffix.safetensors` (the tensors outside the frozen prefix) and {files} "
                "`transformers.from_pretrained` cannot load this folder alone; `load_suffix` rebuilds the model on "
                "its base and refuses a base whose frozen weights differ.")
    return f"Files: a standard transformers checkpoint and {files}"
