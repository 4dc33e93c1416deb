"""One rank of the data-parallel test (launched by test_distributed.py with torchrun, gloo on CPU)."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402
from helpers import PadCollator, token_dataset, training_args  # noqa: E402

from hf_freeze import FreezeConfig, FreezeTrainer, frozen_boundary  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model("bert", "seq")
    config = FreezeConfig(policy="gradnorm", interval_steps=2, cache="on")
    trainer = FreezeTrainer(model=model, args=training_args(out_dir, num_train_epochs=4, per_device_train_batch_size=4),
                            train_dataset=token_dataset(size=40, seed=1), data_collator=PadCollator(),
                            freeze_config=config)
    trainer.train()
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().numpy().tobytes())
    rank = int(os.environ["RANK"])
    result = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "boundary": frozen_boundary(model),
        "timeline": [{k: v for k, v in e.items() if k != "seconds"} for e in trainer.freeze_callback.timeline],
        "weights": digest.hexdigest(),
        "cache_hits": trainer.boundary_states.stats.hits if trainer.boundary_states else 0,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
    # With torch 2.13 on gloo, about one exit in five aborts in interpreter teardown ("terminate called without an
    # active exception") after all work is done, with a plain Trainer too; skip teardown so the test judges the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
