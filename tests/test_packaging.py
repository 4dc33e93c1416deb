"""The wheel installs `hf_freeze` alone: no top-level `recipes` (or any other name a user's code might hold)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Not sources of the package: keep the copy small and leave the checkout's build folders alone.
IGNORED = (".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", "results", ".pytest_cache")


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
               "-w", str(tmp_path / "dist"), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_freeze-*.whl")
    return wheel


def test_the_wheel_holds_only_hf_freeze(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode() if (
            f"{dist_info}/entry_points.txt" in names) else ""
    top_level = {name.split("/")[0] for name in names} - {dist_info}
    assert top_level == {"hf_freeze"}
    # what the recipes share moved into the package, with the data files the package needs at run time
    for path in ("hf_freeze/training.py", "hf_freeze/data.py", "hf_freeze/metrics/accuracy/accuracy.py"):
        assert path in names, path
    # console scripts, if any, run code inside hf_freeze (no `hf-freeze-demo = recipes...`)
    for line in entry_points.splitlines():
        if "=" in line:
            assert line.split("=", 1)[1].strip().startswith("hf_freeze"), line
    assert "recipes" not in entry_points
    # every module of the source tree is in the wheel (an explicit package list in pyproject.toml misses new ones)
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "hf_freeze").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))


# The README's claim "one test file per module": a module `x.py` is tested in `tests/test_x.py`, except these,
# tested where named, and the ones listed as not yet having a test file of their own (the README lists them too).
TESTED_ELSEWHERE = {
    "data": "test_recipes.py",  # both recipes load, split and tokenize through it
    "training": "test_recipes.py",  # run_text_classification / run_causal_lm, under accelerate launch
    "profiling": "test_freezing.py",  # saved-activation bytes fall with every frozen block
    "metrics": "test_recipes.py",  # the shipped accuracy, f1 and perplexity scripts score both recipes (and
    # serving/metrics.py, the server's per-model and per-phase series: test_serving_ops.py)
    "commands": "test_cli.py",  # the subcommands of `hf-freeze`: inspect, push, train
    "inspect": "test_cli.py",
    "push": "test_cli.py",
    "train": "test_cli.py",
    "errors": "test_cli.py",  # how every subcommand fails: one line on stderr
    "serving": "test_serving_app.py",  # the package's public names are what the app and tests import
    "app": "test_serving_app.py",
    "requests": "test_serving_app.py",  # request parsing and errors, through the HTTP routes
    "batching": "test_serving_batching.py",
    "engine": "test_serving_engine.py",
    "generation": "test_serving_engine.py",
    "scheduler": "test_serving_scheduler.py",
    "kv_cache": "test_serving_scheduler.py",  # the per-block KV caches every generation test decodes with
    "prefix_cache": "test_serving_prefix_cache.py",
    "schemas": "test_serving_schemas.py",  # fuzzed from the OpenAPI schema they publish; the error body
    "admin": "test_serving_ops.py",  # load and remove fine-tunes while serving, under load
    "fanout": "test_serving_ops.py",
    "limits": "test_serving_engine.py",  # usable positions per family, decoder classifiers batched without a pad id
    "openai": "test_serving_clients.py",  # the /v1 routes, with the official openai client
    "openai_schemas": "test_serving_clients.py",
    "hf_compat": "test_serving_clients.py",  # POST /, with huggingface_hub's InferenceClient and text_generation's
    "context": "test_serving_clients.py",  # what the client routers share with app.py
}
NO_TEST_FILE_YET: set[str] = set()


def test_every_module_has_its_test_file_or_names_where_it_is_tested():
    tests = ROOT / "tests"
    modules = {p.stem if p.name != "__init__.py" else p.parent.name
               for p in (ROOT / "hf_freeze").rglob("*.py")
               if p.name != "__init__.py" or p.parent != ROOT / "hf_freeze"}
    modules -= {"accuracy", "f1", "perplexity"}  # the metric scripts themselves (see "metrics")
    without = {m for m in modules if not (tests / f"test_{m}.py").exists()}
    for module, test_file in TESTED_ELSEWHERE.items():
        assert module in without, f"{module} now has tests/test_{module}.py: drop it from TESTED_ELSEWHERE"
        assert (tests / test_file).exists(), (module, test_file)
    assert without - TESTED_ELSEWHERE.keys() == NO_TEST_FILE_YET, "update NO_TEST_FILE_YET and the README's list"
    readme = (ROOT / "README.md").read_text()
    for module in NO_TEST_FILE_YET:
        assert f"`{module}.py`" in readme.split("## Development", 1)[1], module
