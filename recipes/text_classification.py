"""Fine-tune a sequence classifier with hf_freeze, and report what freezing gained.

    accelerate launch --config_file recipes/configs/cpu.yaml recipes/text_classification.py \\
        --model_name_or_path minilm --dataset rotten_tomatoes --output_dir outputs/minilm-rotten-tomatoes

Every `FreezeConfig` field (`--policy gradnorm`, `--cache auto`, ...) and every `TrainingArguments` field
(`--learning_rate`, `--push_to_hub`, ...) is a flag. `--method` picks what to run: `freeze_cache` (FreezeTrainer,
the default), `freeze` (Trainer + FreezeCallback, no cache) or `full` (plain fine-tuning, the baseline). The run
itself is `hf_freeze.training.run_text_classification`.
"""

import sys

from hf_freeze.training import run_text_classification

if __name__ == "__main__":
    run_text_classification(sys.argv[1:])
