import copy

import pytest
import torch
from conftest import CASES, NUM_BLOCKS, TRAINABLE_CASES, tiny_batch, tiny_model

from hf_freeze import freeze_prefix, frozen_boundary, frozen_parameters, get_layout, unfreeze
from hf_freeze.cache.runner import PrefixRunner
from hf_freeze.optim import optimizer_state_bytes
from hf_freeze.profiling import count_saved_tensor_bytes


def prefix_ids(model, boundary):
    return {id(p) for m in get_layout(model).prefix_modules(boundary) for p in m.parameters()}


def train_steps(model, optimizer, batch, steps=3):
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(("family", "head"), CASES)
def test_freezes_exactly_the_embeddings_and_the_first_blocks(family, head):
    model = tiny_model(family, head)
    freeze_prefix(model, 2)
    frozen = prefix_ids(model, 2)
    assert frozen_boundary(model) == 2
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) not in frozen), name
    assert {id(p) for p in frozen_parameters(model)} == frozen


@pytest.mark.parametrize(("family", "head"), TRAINABLE_CASES)
def test_frozen_weights_stay_bit_identical_and_get_no_gradient(family, head):
    model = tiny_model(family, head)
    batch = tiny_batch(model, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, batch, steps=1)
    freeze_prefix(model, 2, optimizer=optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = prefix_ids(model, 2)
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if id(param) in frozen:
            assert param.grad is None, name
    optimizer.step()
    optimizer.zero_grad()
    train_steps(model, optimizer, batch, steps=2)
    for name, param in model.named_parameters():
        if id(param) in frozen:
            assert torch.equal(param, before[name]), f"{name} changed after it froze"
    active = [n for n, p in model.named_parameters() if id(p) not in frozen]
    assert any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in active)


@pytest.mark.parametrize(("family", "head"), TRAINABLE_CASES)
def test_frozen_prefix_stays_in_eval_mode_and_is_deterministic(family, head):
    model = tiny_model(family, head)
    freeze_prefix(model, 2)
    model.train()  # what Trainer does every step
    batch = {k: v for k, v in tiny_batch(model, head).items() if k != "labels"}
    runner = PrefixRunner(model, get_layout(model))
    torch.manual_seed(1)
    first = runner.boundary_states(batch, 2)
    torch.manual_seed(2)
    second = runner.boundary_states(batch, 2)
    assert torch.equal(first, second)
    layout = get_layout(model)
    assert not any(m.training for unit in layout.prefix_modules(2) for m in unit.modules())
    assert all(m.training for m in layout.blocks[2].modules())


@pytest.mark.parametrize(("family", "head"), TRAINABLE_CASES)
def test_saved_activation_bytes_fall_as_the_boundary_grows(family, head):
    batch = tiny_batch(tiny_model(family, head), head, batch=4, length=16)
    saved = []
    for boundary in [None, 0, 1, 2, 3, 4]:
        model = tiny_model(family, head)
        if boundary is not None:
            freeze_prefix(model, boundary)
        model.train()
        with count_saved_tensor_bytes() as counter:
            loss = model(**batch).loss
        loss.backward()
        saved.append(counter.total)
    assert all(a > b for a, b in zip(saved[1:], saved[2:])), saved
    assert saved[0] >= saved[1], saved


def test_optimizer_releases_frozen_state_and_keeps_its_groups():
    model = tiny_model("bert", "seq")
    batch = tiny_batch(model, "seq")
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in model.named_parameters() if "bias" not in n], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if "bias" in n], "weight_decay": 0.0},
    ])
    train_steps(model, optimizer, batch, steps=1)
    before = optimizer_state_bytes(optimizer)
    result = freeze_prefix(model, 3, optimizer=optimizer)
    frozen = prefix_ids(model, 3)
    assert len(optimizer.param_groups) == 2
    assert not any(id(p) in frozen for g in optimizer.param_groups for p in g["params"])
    assert not any(id(p) in frozen for p in optimizer.state)
    assert result.optimizer_bytes_released == before - optimizer_state_bytes(optimizer) > 0
    freed_expected = sum(2 * p.numel() * 4 + 4 for p in model.parameters() if id(p) in frozen)  # exp_avg(+sq), step
    assert result.optimizer_bytes_released == freed_expected


def test_learning_rate_schedule_is_unchanged_by_freezing():
    def run(freeze_at):
        model = tiny_model("bert", "seq")
        batch = tiny_batch(model, "seq")
        optimizer = torch.optim.AdamW([
            {"params": list(model.bert.parameters()), "lr": 1e-3},
            {"params": list(model.classifier.parameters()), "lr": 5e-3},
        ])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
        lrs = []
        for step in range(8):
            if step == freeze_at:
                freeze_prefix(model, NUM_BLOCKS, optimizer=optimizer)  # empties group 0 entirely
            train_steps(model, optimizer, batch, steps=1)
            scheduler.step()
            lrs.append([g["lr"] for g in optimizer.param_groups])
        return lrs

    assert run(freeze_at=3) == run(freeze_at=None)


def test_optimizer_checkpoint_lists_released_parameters_so_a_fresh_optimizer_loads_it():
    model = tiny_model("llama", "causal")
    fresh = copy.deepcopy(model)  # what a resumed run starts from: the untouched model
    batch = tiny_batch(model, "causal")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, batch, steps=1)
    freeze_prefix(model, 2, optimizer=optimizer)
    train_steps(model, optimizer, batch, steps=1)
    saved = optimizer.state_dict()
    assert len(saved["param_groups"][0]["params"]) == len(list(fresh.parameters()))
    assert len(saved["state"]) == len(optimizer.state) < len(list(fresh.parameters()))

    # Trainer builds an optimizer over every parameter of the fresh model and loads the checkpoint into it.
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_optimizer.load_state_dict(saved)
    by_position = dict(zip(map(id, fresh.parameters()), range(len(saved["param_groups"][0]["params"]))))
    restored = {by_position[id(p)]: s["exp_avg"] for p, s in fresh_optimizer.state.items()}
    full = optimizer.state_dict()  # full layout again: positions match the fresh model's parameters
    for position, state in full["state"].items():
        assert torch.equal(state["exp_avg"], restored[position])
    # and the pruned optimizer itself reloads its own full-layout checkpoint
    optimizer.load_state_dict(saved)
    assert optimizer_state_bytes(optimizer) == optimizer_state_bytes(fresh_optimizer)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_forced_input_gradients_do_not_keep_the_frozen_graph_alive(family):
    batch = tiny_batch(tiny_model(family, "seq"), "seq", batch=4, length=16)
    saved = {}
    for forced in (False, True):
        model = tiny_model(family, "seq")
        if forced:
            model.enable_input_require_grads()
        freeze_prefix(model, 3)
        model.train()
        with count_saved_tensor_bytes() as counter:
            model(**batch).loss.backward()
        saved[forced] = counter.total
    assert saved[True] == saved[False]


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "qwen2"])
def test_gradient_checkpointing_still_trains_the_active_blocks(family, reentrant):
    # Reentrant checkpointing gives a block's parameters no gradient when none of its inputs requires grad; the
    # frozen prefix outputs such a tensor, so freezing marks the first active block's input. Non-reentrant
    # checkpointing (transformers' default) needs no mark; both must give the gradients of a plain forward.
    batch = tiny_batch(tiny_model(family, "seq"), "seq")
    grads = {}
    for checkpointing in (False, True):
        model = tiny_model(family, "seq")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        freeze_prefix(model, 2)
        model.train()
        torch.manual_seed(0)
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    layout = get_layout(model)
    for block in layout.blocks[2:]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert all(p.grad is None for m in layout.prefix_modules(2) for p in m.parameters())
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, rtol=1e-4, atol=1e-6), name


def test_tied_lm_head_is_untied_and_keeps_training(tmp_path):
    model = tiny_model("llama", "causal")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = tiny_batch(model, "causal")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = freeze_prefix(model, 1, optimizer=optimizer)
    assert result.untied == ("lm_head.weight",)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    embeddings, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    train_steps(model, optimizer, batch, steps=2)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(model.lm_head.weight, head)
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tied_weights_freeze_mode_freezes_the_head_too():
    model = tiny_model("gpt2", "causal")
    freeze_prefix(model, 1, tied_weights="freeze")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.lm_head.weight.requires_grad


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: freeze_prefix(m, NUM_BLOCKS + 1), ValueError, r"Boundary 5 is outside \[0, 4\].*has 4 blocks"),
        (lambda m: freeze_prefix(m, -1), ValueError, "outside"),
        (lambda m: freeze_prefix(m, 2.0), TypeError, "must be an int"),
        (lambda m: freeze_prefix(m, 1, tied_weights="share"), ValueError, "'untie' or 'freeze'"),
    ],
)
def test_bad_boundaries_are_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_model("bert", "seq"))


def test_the_prefix_only_grows_unless_unfrozen():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 3)
    with pytest.raises(ValueError, match="only grows.*frozen up to block 3, asked for 1.*unfreeze"):
        freeze_prefix(model, 1)
    unfreeze(model)
    assert frozen_boundary(model) is None
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())
    freeze_prefix(model, 1)
    assert frozen_boundary(model) == 1


def test_an_exception_inside_a_frozen_block_restores_grad_mode():
    model = tiny_model("bert", "seq")
    freeze_prefix(model, 2)

    def explode(module, args):
        raise RuntimeError("boom")

    handle = get_layout(model).blocks[1].register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        model(**tiny_batch(model, "seq"))
    handle.remove()
    assert torch.is_grad_enabled()
