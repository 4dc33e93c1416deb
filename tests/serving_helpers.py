"""Fine-tunes of tiny bases for the serving tests: same prefix as the base, perturbed suffix and head."""

from __future__ import annotations

import contextlib
import subprocess
import time

import httpx
import torch
from conftest import tiny_model

from hf_freeze import freeze_prefix


def perturbed_finetune(family: str, head: str, boundary: int, seed: int, base: torch.nn.Module | None = None):
    """`tiny_model(family, head)` whose base weights are `base`'s (or the seed-0 init), frozen at `boundary`, with
    every trainable parameter perturbed (a stand-in for fine-tuning)."""
    model = tiny_model(family, head, seed=0)
    if base is not None:
        model.base_model.load_state_dict(base.base_model.state_dict())
    return perturb_suffix(model, boundary, seed)


def perturb_suffix(model: torch.nn.Module, boundary: int, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Freeze `model` at `boundary`, then add noise (`scale` x each tensor's std) to every trainable parameter."""
    freeze_prefix(model, boundary)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=g) * (param.std() if param.numel() > 1 else 1)
                param.add_(scale * noise)
    return model.eval()


def random_ids(count: int, seed: int, min_len: int = 2, max_len: int = 11, vocab: int = 100) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def wait_until_healthy(process: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Poll `url/health` until a server started as `process` answers 200; fail if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health").status_code == 200:
                return
        assert process.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
