"""Both recipes run end to end under `accelerate launch` with the CPU config; every config parses."""

import json
import os
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


def test_text_classification_recipe(tmp_path):
    stdout, results = launch(
        "text_classification.py", tmp_path, "--max_train_samples", "96", "--max_eval_samples", "64",
        "--per_device_train_batch_size", "16", "--policy", "schedule", "--interval", "0.25", "--baseline_steps", "2")
    assert results["timeline"] and results["boundary"] >= 1
    assert 0 <= results["metrics"]["eval_accuracy"] <= 1 and "eval_f1" in results["metrics"]
    assert results["speedup"] > 0
    assert "freeze timeline:" in stdout and "speed-up over full fine-tuning" in stdout
    check_outputs(tmp_path, results)


def test_causal_lm_recipe(tmp_path):
    stdout, results = launch(
        "causal_lm.py", tmp_path, "--max_train_samples", "32", "--max_eval_samples", "16", "--max_length", "32",
        "--per_device_train_batch_size", "8", "--policy", "fixed", "--boundary", "20")
    assert results["boundary"] == 20
    assert 1 < results["metrics"]["eval_perplexity"] < 1e4
    assert "perplexity" in stdout
    check_outputs(tmp_path, results)
