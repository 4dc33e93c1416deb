#!/usr/bin/env bash
# Every check that needs a GPU (device_map split across GPU and CPU, accelerator memory before and after the frozen
# prefix moves off, step time frozen vs cached, cache="auto" verdicts, bf16, fp16, FSDP2 on one GPU), in one run of a
# few minutes that prints one summary. Without a GPU it is a dry run on the CPU. Usage: bash scripts/gpu_check.sh [--out FILE.json]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-.venv/bin/python}
exec timeout 300 "$PYTHON" scripts/gpu_check.py "$@"
