"""Data parallelism: the refused modes, DDP rebuilt over the active blocks (gloo on the CPU, two processes),
rank-stable sharding for the cache, and the checks that ranks and cache folders agree."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from conftest import tiny_batch, tiny_model
from helpers import run_two_ranks

from hf_freeze import FreezeCallback, FreezeConfig
from hf_freeze.distributed import ParallelModeError, RankStableSampler, check_cache_world, check_parallel_mode
from hf_freeze.freezing import get_layout
from hf_freeze.signals import unit_gradient_norms

HERE = Path(__file__).parent
TOLERANCE = 1e-3  # relative, per logged step: see the loss-curve test


# ---- two processes ----

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two_ranks("ddp_worker.py", tmp_path_factory.mktemp("ddp"), timeout=600)


def test_two_ranks_freeze_the_same_prefix_and_stay_identical(ranks):
    runs = [r["freeze"] for r in ranks]
    assert all(r["world_size"] == 2 for r in runs)
    assert runs[0]["timeline"], "the run should freeze at least once"
    assert runs[0]["timeline"] == runs[1]["timeline"]
    assert runs[0]["boundary"] == runs[1]["boundary"] is not None
    assert runs[0]["weights"] == runs[1]["weights"], "replicas diverged"
    assert all(r["hits"] > 0 for r in runs)


@pytest.fixture(scope="module")
def single(ranks, tmp_path_factory):
    """The `freeze` run in this process (world size 1), global batch 8, on the micro-batches the ranks trained on.

    transformers 5.24 multiplies the loss of a DDP run by the world size when the model's forward takes **kwargs (it
    expects the model to divide by the global label count, `num_items_in_batch`); BERT's classifier divides by its
    own batch, so the ranks' logged loss and gradients are 2x the single process's. AdamW ignores a constant
    gradient scale, but gradient clipping does not: the ranks clip at `max_grad_norm` (1.0) of the doubled gradient,
    so the run they equal clips at 0.5 (with 1.0 this run's losses drift about 0.3% away by its end)."""
    from ddp_worker import single_process_replay

    ddp = ranks[0]["freeze"]
    return single_process_replay(str(tmp_path_factory.mktemp("single")), [r["freeze"]["batches"] for r in ranks],
                                 max_grad_norm=ddp["max_grad_norm"] / ddp["loss_scale"])


def test_each_epoch_the_ranks_train_on_every_example_once_and_keep_their_own(ranks):
    batches = [r["freeze"]["batches"] for r in ranks]
    assert len(batches[0]) == len(batches[1]) == 40  # 8 epochs x 5 micro-batches of 4 per rank
    shards = []
    for epoch in range(8):
        seen = [[i for batch in b[epoch * 5:(epoch + 1) * 5] for i in batch] for b in batches]
        assert sorted(seen[0] + seen[1]) == list(range(40)), f"epoch {epoch}"
        shards.append([set(s) for s in seen])
    assert all(s == shards[0] for s in shards)  # rank-stable sharding (the cache is on)


def test_loss_curve_stays_close_to_the_single_process_run(ranks, single):
    ddp = ranks[0]["freeze"]
    assert single["world_size"] == 1 and [e["step"] for e in ddp["logs"]] == [e["step"] for e in single["logs"]]
    assert (ddp["loss_scale"], single["loss_scale"]) == (2, 1)  # see `single`
    scale = ddp["loss_scale"]
    losses = [(e["loss"] / scale, s["loss"]) for e, s in zip(ddp["logs"], single["logs"])]
    norms = [(e["grad_norm"] / scale, s["grad_norm"]) for e, s in zip(ddp["logs"], single["logs"])]
    assert len(losses) >= 10 and losses[-1][1] < losses[0][1]  # it trains
    # same examples, no dropout: the runs differ by rounding only (other padded lengths and reduction orders, grown
    # through 24 AdamW steps: at most 1e-5 in the loss and 1e-4 in the gradient norm here). TOLERANCE leaves 10x
    # room and still catches a clip at the wrong threshold (0.3% in the loss, 1% in the gradient norm).
    assert [a for a, _ in losses] == pytest.approx([b for _, b in losses], rel=TOLERANCE)
    assert [a for a, _ in norms] == pytest.approx([b for _, b in norms], rel=TOLERANCE)
    assert [(e["step"], e["boundary"]) for e in ddp["timeline"]] == [(e["step"], e["boundary"])
                                                                       for e in single["timeline"]]


def test_all_reduced_bytes_are_the_trainable_parameters_and_fall_with_the_boundary(ranks):
    steps = ranks[0]["freeze"]["steps"]
    assert [s["allreduce_bytes"] for s in steps] == [s["trainable_bytes"] for s in steps]
    by_boundary = {}
    for s in steps:
        by_boundary.setdefault(s["boundary"], set()).add(s["allreduce_bytes"])
    assert all(len(v) == 1 for v in by_boundary.values()), by_boundary
    order = [None] + sorted(b for b in by_boundary if b is not None)
    sent = [by_boundary[b].pop() for b in order]
    assert len(sent) >= 2 and all(a > b for a, b in zip(sent, sent[1:])), sent
    # every active parameter is used: after one step the wrapper runs without find_unused_parameters
    assert ranks[0]["freeze"]["find_unused_parameters"] is False
    assert ranks[0]["freeze"]["rebuilds"] >= len(order)


def test_rank_stable_sharding_makes_every_later_epoch_hit(ranks):
    for rank in ranks:
        stable, per_epoch = rank["stable"], rank["per_epoch"]
        # 40 examples, 2 ranks, 3 epochs: 20 misses in epoch 1, then all 40 reads hit
        assert (stable["hits"], stable["misses"]) == (40, 20)
        assert per_epoch["hits"] + per_epoch["misses"] == 60 and per_epoch["hits"] < 36
        print(f"hit rate: rank-stable {stable['hits'] / 60:.2f} (accuracy {stable['accuracy']:.3f}), per-epoch "
              f"{per_epoch['hits'] / 60:.2f} (accuracy {per_epoch['accuracy']:.3f})")


def test_ranks_that_disagree_on_the_boundary_are_refused(ranks):
    assert all("disagree on the frozen boundary" in r["disagreement"] for r in ranks)


# ---- one process ----

def test_rank_stable_sampler_keeps_each_example_on_one_rank_and_covers_the_data_every_epoch():
    samplers = [RankStableSampler(10, 3, r, seed=5) for r in range(3)]
    shards = []
    for epoch in range(3):
        orders = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        assert all(len(o) == 4 for o in orders)
        assert sorted(i for o in orders for i in o)[:10] != [] and set().union(*map(set, orders)) == set(range(10))
        shards.append([set(o) for o in orders])
    assert shards[0] == shards[1] == shards[2]  # the same examples on the same rank every epoch
    samplers[0].set_epoch(0)
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first  # reshuffled within the rank
    even = [RankStableSampler(12, 3, r) for r in range(3)]
    assert sorted(i for s in even for i in s) == list(range(12))  # divisible: each example exactly once


def test_cache_folder_written_with_another_world_layout_is_refused(tmp_path):
    check_cache_world(str(tmp_path), 2, True, is_main=True)
    check_cache_world(str(tmp_path), 2, True, is_main=False)
    with pytest.raises(ValueError, match="world_size.*2.*4"):
        check_cache_world(str(tmp_path), 4, True, is_main=True)
    with pytest.raises(ValueError, match="rank_stable"):
        check_cache_world(str(tmp_path), 2, False, is_main=True)


def args(**overrides):
    values = dict(world_size=1, n_gpu=1, deepspeed=None, fsdp=None, fsdp_config=None, ddp_find_unused_parameters=None,
                  activation_checkpointing=False, gradient_checkpointing=False)
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"deepspeed": "ds_config.json", "world_size": 2}, "DeepSpeed: ZeRO builds.*momentum keeps moving it"),
    ({"fsdp": ["full_shard"], "fsdp_config": {"version": 1}, "world_size": 2}, "FSDP1.*Use FSDP2"),
    ({"n_gpu": 2}, "nn.DataParallel.*accelerate launch"),
    ({"world_size": 2, "ddp_find_unused_parameters": False}, "ddp_find_unused_parameters=True"),
])
def test_modes_that_cannot_freeze_are_refused_up_front(overrides, message):
    with pytest.raises(ParallelModeError, match=message):
        check_parallel_mode(args(**overrides), rebuilds_ddp=False)


def test_modes_that_can_freeze_are_accepted(monkeypatch):
    check_parallel_mode(args(world_size=2), rebuilds_ddp=False)  # Trainer's default: find_unused_parameters=True
    check_parallel_mode(args(world_size=2, ddp_find_unused_parameters=False), rebuilds_ddp=True)  # FreezeTrainer
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch` with a DeepSpeed config
    with pytest.raises(ParallelModeError, match="DeepSpeed"):
        check_parallel_mode(args(), rebuilds_ddp=True)


def test_fsdp_left_in_the_environment_by_an_earlier_run_does_not_refuse_a_later_one(tmp_path, monkeypatch):
    from helpers import PadCollator, token_dataset, training_args
    from transformers import Trainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # Accelerate sets it for an FSDP run and never unsets it
    trainer = Trainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path, max_steps=2),
                      train_dataset=token_dataset(), data_collator=PadCollator(),
                      callbacks=[FreezeCallback(FreezeConfig(policy="fixed", boundary=1))])
    trainer.train()  # FSDP is recognised from the model (it holds no FSDP module), not from the environment
    assert trainer.state.global_step == 2


# ---- gradients the policy reads ----

def scaled_step(scale):
    # AcceleratedOptimizer reads Accelerate's global state, which a Trainer sets up: set it up here too, so the test
    # does not depend on an earlier test having built a Trainer (a no-op when one did).
    Accelerator()
    model = tiny_model("bert", "seq").eval()  # no dropout: two forwards give the same gradients
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    optimizer = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    loss = model(**tiny_batch(model, "seq")).loss
    return model, optimizer, scaler, loss


def test_fp16_gradients_are_unscaled_before_the_policy_reads_them():
    model, optimizer, scaler, loss = scaled_step(1024.0)
    loss.backward()
    expected = unit_gradient_norms(get_layout(model), None)  # true gradients
    model.zero_grad()
    scaler.scale(model(**tiny_batch(model, "seq")).loss).backward()
    callback = FreezeCallback(FreezeConfig(policy="gradnorm", interval_steps=2))
    callback.on_train_begin(args(), SimpleNamespace(stateful_callbacks={}, global_step=0, max_steps=10, epoch=0),
                            SimpleNamespace(should_log=False), model=model, optimizer=optimizer)
    callback.on_pre_optimizer_step(args(), SimpleNamespace(global_step=0), None, model=model, optimizer=optimizer)
    observed = [s for s in callback.policy.window_sum]
    assert observed == pytest.approx(expected, rel=1e-4)
    callback.on_pre_optimizer_step(args(), SimpleNamespace(global_step=0), None, model=model, optimizer=optimizer)
    assert callback.policy.window_steps == 2  # already unscaled (as when the Trainer clips): not divided twice
    assert [s / 2 for s in callback.policy.window_sum] == pytest.approx(expected, rel=1e-4)


def test_an_fp16_overflow_step_is_not_observed():
    model, optimizer, scaler, loss = scaled_step(1.0)
    scaler.scale(loss).backward()
    callback = FreezeCallback(FreezeConfig(policy="gradnorm", interval_steps=2))
    callback.on_train_begin(args(), SimpleNamespace(stateful_callbacks={}, global_step=0, max_steps=10, epoch=0),
                            SimpleNamespace(should_log=False), model=model, optimizer=optimizer)
    model.bert.encoder.layer[0].output.dense.weight.grad[0, 0] = float("inf")
    callback.on_pre_optimizer_step(args(), SimpleNamespace(global_step=0), None, model=model, optimizer=optimizer)
    assert callback.policy.window_steps == 0


def test_missing_gradients_are_an_error_not_zero_norms():
    model = tiny_model("bert", "seq")  # no backward: as under DeepSpeed ZeRO, every p.grad is None
    with pytest.raises(RuntimeError, match="no gradient"):
        unit_gradient_norms(get_layout(model), None)


def test_freeze_trainer_picks_rank_stable_sharding_only_where_it_applies(tmp_path, monkeypatch):
    from helpers import PadCollator, token_dataset, training_args
    from transformers import TrainingArguments

    from hf_freeze import FreezeTrainer

    def trainer(**config):
        return FreezeTrainer(model=tiny_model("bert", "seq"), args=training_args(tmp_path), data_collator=PadCollator(),
                             train_dataset=token_dataset(size=10), freeze_config=FreezeConfig(**config))

    assert not trainer(cache="on").rank_stable_sharding  # one process: nothing to keep apart
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    assert isinstance(trainer(cache="on")._get_train_sampler(), RankStableSampler)
    assert not trainer(cache="off").rank_stable_sharding
    assert not trainer(cache="on", rank_stable_sharding=False).rank_stable_sharding
    grouped = trainer(cache="on", rank_stable_sharding=True)
    grouped.args.train_sampling_strategy = "group_by_length"
    with pytest.raises(ValueError, match="train_sampling_strategy='random' or rank_stable_sharding=False"):
        grouped._get_train_sampler()


def test_active_blocks_ddp_starts_over_from_a_new_wrapper_of_a_second_train(tmp_path):
    from hf_freeze import freeze_prefix
    from hf_freeze.distributed import ActiveBlocksDDP

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model("bert", "seq")
        freeze_prefix(model, 2)
        active = ActiveBlocksDDP()
        first = torch.nn.parallel.DistributedDataParallel(model)  # what the Trainer wraps for the first train()
        rebuilt = active.wrapper_for(first, 2)
        assert rebuilt is not first and active.wrapper_for(first, 2) is rebuilt  # kept for the rest of the loop
        assert active.wrapper_for(rebuilt, 2) is rebuilt  # a second train() handed the rebuilt wrapper: kept
        second = torch.nn.parallel.DistributedDataParallel(model)  # the model wrapped again (auto_find_batch_size)
        fresh = active.wrapper_for(second, 2)
        assert fresh is not rebuilt and fresh.module is model
        assert {id(p) for p in fresh.parameters() if p.requires_grad} == {
            id(p) for p in model.parameters() if p.requires_grad}
        assert active.wrapper_for(second, 2) is fresh
    finally:
        torch.distributed.destroy_process_group()
