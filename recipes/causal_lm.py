"""Fine-tune a causal language model with hf_freeze, and report what freezing gained.

    accelerate launch --config_file recipes/configs/cpu.yaml recipes/causal_lm.py \\
        --model_name_or_path smollm2 --dataset rotten_tomatoes --max_train_samples 2000 --output_dir outputs/smollm2

`--dataset hamlet` trains on the packaged Hamlet text instead; any Hub name or text/csv/json files work too. Every
`FreezeConfig` and `TrainingArguments` field is a flag, as in `text_classification.py`. The run itself is
`hf_freeze.training.run_causal_lm`.
"""

import sys

from hf_freeze.training import run_causal_lm

if __name__ == "__main__":
    run_causal_lm(sys.argv[1:])
