#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit tests on tiny random models of every supported family,
# integration tests on the packaged MiniLM and SmolLM2, and both recipes under `accelerate launch`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests "$@"
