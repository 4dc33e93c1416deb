"""Data parallelism (DDP over gloo on the CPU, two processes): freezing mid-run keeps every rank in step."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_two_ranks_freeze_the_same_prefix_and_stay_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(HERE / "ddp_worker.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["timeline"], "the run should freeze at least once"
    assert ranks[0]["timeline"] == ranks[1]["timeline"]
    assert ranks[0]["boundary"] == ranks[1]["boundary"] is not None
    assert ranks[0]["weights"] == ranks[1]["weights"], "replicas diverged"
    assert all(r["cache_hits"] > 0 for r in ranks)
