"""Both recipes run end to end under `accelerate launch` with the CPU config; every config parses."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from huggingface_hub import ModelCard

from hf_freeze import assets
from hf_freeze.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse_and_name_their_launch_command(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1
    assert path.read_text().startswith(f"# accelerate launch --config_file recipes/configs/{path.name}")


def launch(script, tmp_path, *flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "configs" / "cpu.yaml"), str(ROOT / "recipes" / script),
               "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "2", "--logging_steps", "2", *flags]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((tmp_path / "out" / "results.json").read_text())


def check_outputs(tmp_path, results):
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "freeze_timeline.png").stat().st_size > 1000
    card = ModelCard.load(out / "README.md")
    assert "## How it was trained" in card.text and "cache/" not in card.content
    assert card.data.base_model in assets.HUB_IDS.values() and card.data.base_model_relation == "finetune"
    assert f"[{card.data.base_model}](https://huggingface.co/{card.data.base_model})" in card.text
    for event in results["timeline"]:
        assert f"| {event['step']} |" in card.text
    assert read_metadata(out).boundary == results["boundary"]


def sentiment_csv(path, size=160, seed=0):
    """A learnable task: the label is whether the one sentiment word in a sentence of neutral words is positive."""
    rng = random.Random(seed)
    positive = ["great", "superb", "wonderful", "brilliant", "delightful", "excellent"]
    negative = ["awful", "dreadful", "terrible", "boring", "dismal", "horrible"]
    neutral = ["the", "film", "plot", "actors", "was", "and", "scenes", "story", "director", "ending", "music"]
    rows = ["text,label"]
    for i in range(size):
        label = i % 2
        words = rng.sample(neutral, 5)
        words.insert(rng.randrange(6), rng.choice(positive if label else negative))
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def cache_hits_in_epoch(logs, epoch):
    """Cache hits counted during training epoch `epoch` (1-based), from the cumulative `cache/hits` logs."""
    train_logs = [e for e in logs if "cache/hits" in e and "eval_loss" not in e]
    before = max((e["cache/hits"] for e in train_logs if e["epoch"] <= epoch - 1), default=0.0)
    after = max(e["cache/hits"] for e in train_logs if e["epoch"] <= epoch)
    return after - before


def test_text_classification_recipe(tmp_path):
    data = sentiment_csv(tmp_path / "sentiment.csv")
    stdout, results = launch(
        "text_classification.py", tmp_path, "--dataset", str(data), "--per_device_train_batch_size", "16",
        "--learning_rate", "5e-4", "--policy", "schedule", "--interval", "0.25", "--baseline_steps", "2")
    # 128 training examples at batch 16: 8 steps per epoch, a schedule decision every 4 steps
    assert results["steps"] == 16
    timeline = results["timeline"]
    assert timeline and all(e["step"] % 4 == 0 for e in timeline)
    assert [e["boundary"] for e in timeline] == sorted({e["boundary"] for e in timeline})  # only grows
    assert results["boundary"] == timeline[-1]["boundary"] >= 1
    # each phase ran at the boundary the last freeze before it set (the step timer agrees with the timeline)
    for row in results["phases"]:
        first = int(row["steps"].split("-")[0])
        earlier = [e["boundary"] for e in timeline if e["step"] < first]
        assert row["boundary"] == (earlier[-1] if earlier else "none"), (row, timeline)
    # the positive/negative word decides the label: far above the 50% of chance on 32 held-out sentences
    assert results["metrics"]["eval_accuracy"] >= 0.8, results["metrics"]
    # the speed-up is the measured full step time over this run's steps (not timed here: the CPU is shared)
    assert results["speedup"] == pytest.approx(results["full_estimate_seconds"] / results["train_step_seconds"])
    assert f"speed-up over full fine-tuning: {results['speedup']:.2f}x" in stdout
    check_outputs(tmp_path, results)


def test_causal_lm_recipe(tmp_path):
    stdout, results = launch(
        "causal_lm.py", tmp_path, "--max_train_samples", "32", "--max_eval_samples", "16", "--max_length", "32",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-4", "--policy", "fixed", "--boundary", "20",
        "--cache", "on", "--eval_strategy", "no", "--eval_on_start")
    assert results["boundary"] == 20 and [e["boundary"] for e in results["timeline"]] == [20]
    # epoch 1 stores the states at boundary 20 of all 32 examples; epoch 2 reads every one of them (no evaluation
    # between the epochs, whose own cache hits would count too)
    assert cache_hits_in_epoch(results["logs"], 1) == 0
    assert cache_hits_in_epoch(results["logs"], 2) == 32
    # fine-tuning lowered the held-out perplexity of the model it started from (evaluated at step 0)
    evals = [e["eval_perplexity"] for e in results["logs"] if "eval_perplexity" in e]
    assert results["metrics"]["eval_perplexity"] < evals[0], evals
    assert f"perplexity: {results['metrics']['eval_perplexity']:.4f}" in stdout
    check_outputs(tmp_path, results)
