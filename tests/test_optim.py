"""Releasing frozen parameters from an optimizer: state freed, groups (and their learning rates) kept, checkpoints
that a fresh optimizer loads."""

import torch
from torch import nn

from hf_freeze.optim import optimizer_state_bytes, release_parameters, unwrap_optimizer


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW([
        {"params": [model[0].weight, model[1].weight, model[2].weight], "lr": 1e-2},
        {"params": [model[0].bias, model[1].bias, model[2].bias], "lr": 1e-3, "weight_decay": 0.0},
    ])
    return model, optimizer


def step(model, optimizer):
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_released_parameters_lose_their_state_and_leave_the_groups_which_stay():
    model, optimizer = model_and_optimizer()
    step(model, optimizer)
    released = list(model[0].parameters())
    expected = sum(2 * p.numel() * 4 + 4 for p in released)  # exp_avg, exp_avg_sq (fp32), step (scalar fp32)
    before = optimizer_state_bytes(optimizer)
    assert release_parameters(optimizer, released) == expected == before - optimizer_state_bytes(optimizer)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]
    assert not any(p in optimizer.state for p in released)
    frozen = model[0].weight.detach().clone()
    step(model, optimizer)  # still steps the kept parameters; the released ones are not touched
    assert torch.equal(model[0].weight, frozen)


def test_a_wrapped_optimizer_is_unwrapped():
    class Wrapper:  # what Accelerate's AcceleratedOptimizer looks like from here
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model, optimizer = model_and_optimizer()
    step(model, optimizer)
    assert unwrap_optimizer(Wrapper(optimizer)) is optimizer
    assert release_parameters(Wrapper(optimizer), [model[2].bias]) > 0
    assert model[2].bias not in optimizer.state


def test_state_dict_keeps_the_full_layout_so_a_fresh_optimizer_loads_it():
    model, optimizer = model_and_optimizer()
    step(model, optimizer)
    release_parameters(optimizer, list(model[0].parameters()))
    step(model, optimizer)
    saved = optimizer.state_dict()
    assert [len(g["params"]) for g in saved["param_groups"]] == [3, 3]  # released parameters still listed
    assert len(saved["state"]) == 4  # ... without state

    _, fresh = model_and_optimizer()  # what Trainer builds on resume: every parameter listed
    fresh.param_groups[0]["params"] = [model[0].weight, model[1].weight, model[2].weight]
    fresh.param_groups[1]["params"] = [model[0].bias, model[1].bias, model[2].bias]
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state[model[1].weight]["exp_avg"], optimizer.state[model[1].weight]["exp_avg"])
    assert model[0].weight not in fresh.state

    # and the pruned optimizer loads its own checkpoint back (the callback re-prunes, then resumes)
    optimizer.load_state_dict(saved)
    assert torch.equal(optimizer.state[model[2].weight]["exp_avg_sq"], fresh.state[model[2].weight]["exp_avg_sq"])
