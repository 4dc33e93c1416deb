#!/usr/bin/env bash
# The main job: fine-tune the packaged MiniLM on the packaged Rotten Tomatoes data for 2 epochs with FreezeTrainer
# (freezing + prefix cache), then print the accuracy, the freeze timeline, the step time of each phase and the
# speed-up over full fine-tuning (whose step time is measured in the same run). Extra flags go to the recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/accelerate launch --config_file recipes/configs/cpu.yaml recipes/text_classification.py \
    --output_dir outputs/minilm-rotten-tomatoes --baseline_steps 16 "$@"
