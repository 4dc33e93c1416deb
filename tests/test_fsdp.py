"""FSDP2 with a moving frozen prefix (fsdp.py): two gloo ranks on the CPU, sharded by Accelerate's own
`fsdp2_prepare_model` (see fsdp_worker.py), against the DDP run of the same config; and the one-process pieces."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from helpers import run_two_ranks

from hf_freeze.distributed import ParallelModeError, check_parallel_mode
from hf_freeze.fsdp import FSDP1_REFUSAL, check_fsdp, model_class, requested_fsdp_version, sharded_square_sums

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # ~30 s here; ranks that took different paths would hang in a collective until this timeout
    return run_two_ranks("fsdp_worker.py", tmp_path_factory.mktemp("fsdp"), timeout=300)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a)


def test_blocks_really_are_sharded_by_fsdp2(ranks):
    for rank in ranks:
        for name in ("fsdp", "resume", "auto"):
            assert rank[name]["sharded"] and all(rank[name]["sharded"]), f"{name}: blocks not DTensor-sharded"
            assert rank[name]["model_class"] == "FSDPBertForSequenceClassification"
        assert not any(rank["ddp"]["sharded"])


def test_mid_run_freeze_under_fsdp2_equals_ddp_and_ranks_agree(ranks):
    fsdp, ddp = ranks[0]["fsdp"], ranks[0]["ddp"]
    assert [(e["step"], e["boundary"]) for e in fsdp["timeline"]] == [(4, 2), (6, 3)]  # two freezes, mid-run
    assert [(e["step"], e["boundary"]) for e in fsdp["timeline"]] == [(e["step"], e["boundary"])
                                                                        for e in ddp["timeline"]]
    for ours, theirs in zip(fsdp["timeline"], ddp["timeline"]):  # gradient norms from shards = from whole gradients
        assert ours["signal"] == pytest.approx(theirs["signal"], rel=1e-5)
    assert [e["loss"] for e in fsdp["logs"]] == pytest.approx([e["loss"] for e in ddp["logs"]], rel=1e-5)
    assert [e["grad_norm"] for e in fsdp["logs"]] == pytest.approx([e["grad_norm"] for e in ddp["logs"]], rel=1e-5)
    assert max_difference(fsdp["weights"], ddp["weights"]) < 1e-5  # observed: 7e-8
    other = ranks[1]["fsdp"]
    assert other["timeline"] == [{**e, "optimizer_bytes_released": o["optimizer_bytes_released"]}
                                 for e, o in zip(fsdp["timeline"], other["timeline"])]  # freed bytes are per rank
    assert max_difference(fsdp["weights"], other["weights"]) == 0
    assert all(r["fsdp"]["hits"] > 0 for r in ranks)  # the cache is on and read (in lockstep across ranks)


def test_a_plain_trainer_with_the_callback_freezes_under_fsdp2_as_under_ddp(ranks):
    for rank in ranks:
        assert all(rank["callback"]["sharded"]) and not any(rank["callback_ddp"]["sharded"])
        assert len(rank["callback"]["timeline"]) >= 2  # freezes mid-run (Trainer's own sampler: other steps)
        assert rank["callback"]["timeline"] == rank["callback_ddp"]["timeline"]
    ours, ddp = ranks[0]["callback"], ranks[0]["callback_ddp"]
    assert [e["loss"] for e in ours["logs"]] == pytest.approx([e["loss"] for e in ddp["logs"]], rel=1e-5)
    assert max_difference(ours["weights"], ddp["weights"]) < 1e-5
    assert max_difference(ours["weights"], ranks[1]["callback"]["weights"]) == 0


def test_a_freeze_right_after_a_stopped_forward_freezes_the_sharded_parameters(ranks):
    for rank in ranks:
        assert rank["stopped_forward"] == {"sharded": True, "trainable": []}


def test_bytes_reduce_scattered_and_rank_memory_fall_with_the_boundary(ranks):
    for rank in ranks:
        by_boundary = {}
        for step in rank["fsdp"]["steps"]:
            # the reduce-scatter input is the trainable parameters' gradients, padded to a multiple of the ranks
            assert step["trainable_bytes"] <= step["sent_bytes"] < step["trainable_bytes"] * 1.01 + 4096
            memory = step["parameter_bytes"] + step["gradient_bytes"] + step["optimizer_bytes"]
            by_boundary.setdefault(step["boundary"], []).append((step["sent_bytes"], memory))
        order = [None, 2, 3]
        assert sorted(by_boundary, key=lambda b: -1 if b is None else b) == order
        sent = [max(s for s, _ in by_boundary[b]) for b in order]
        peak = [max(m for _, m in by_boundary[b]) for b in order]
        assert sent[0] > sent[1] > sent[2], sent
        assert peak[0] > peak[1] > peak[2], peak
        # sharded optimizer state of the frozen blocks is released: AdamW holds two shards per trainable parameter
        last = rank["fsdp"]["steps"][-1]
        assert last["optimizer_bytes"] < 2.1 * last["gradient_bytes"]


def test_resume_mid_freeze_under_fsdp2(ranks):
    full, resumed, ddp_resumed = (ranks[0][n] for n in ("fsdp", "resume", "ddp_resume"))
    assert ranks[0]["resumed_from"] == 4
    assert resumed["boundary"] == full["boundary"] == 3
    assert [(e["step"], e["boundary"]) for e in resumed["timeline"]] == [(4, 2), (6, 3)]
    # the prefix frozen before the checkpoint is bit for bit the uninterrupted run's
    prefix = [k for k in full["weights"] if k.startswith(("bert.embeddings.", "bert.encoder.layer.0.",
                                                          "bert.encoder.layer.1."))]
    assert prefix and all(resumed["weights"][k] == full["weights"][k] for k in prefix)
    # and the whole resumed run is the DDP run resumed from the same step (Trainer's resume itself, with its data
    # order, is the same under both)
    assert [e["loss"] for e in resumed["logs"]] == pytest.approx([e["loss"] for e in ddp_resumed["logs"]], rel=1e-5)
    assert max_difference(resumed["weights"], ddp_resumed["weights"]) < 1e-5


def test_save_suffix_and_full_under_fsdp2_reload_to_the_same_logits(ranks):
    logits = ranks[0]["logits"]
    assert logits["max_logit_diff"] < 1e-5 and logits["full_logit_diff"] < 1e-5
    assert logits["suffix_files"] == ["config.json", "hf_freeze.json", "suffix.safetensors"]
    for rank in ranks:  # every rank reads what rank 0 wrote, and no metadata names FSDP's class
        got = rank["logits"]
        assert got["metadata"] == got["suffix_metadata"] == got["trainer_metadata"] == "BertForSequenceClassification"
        assert got["config_architectures"] == ["BertForSequenceClassification"]


def test_auto_cache_verdicts_are_the_same_on_every_rank(ranks):
    # rank 0 times reads as nearly free, rank 1 as very dear (fsdp_worker.skewed_timings): the cache is on only if
    # it pays on every rank, and the ranks keep taking the same path for every batch
    assert ranks[0]["auto"]["verdicts"] == ranks[1]["auto"]["verdicts"] == {"2": False}


def test_ranks_that_disagree_and_a_cache_of_another_layout_are_refused(ranks):
    for rank in ranks:
        assert "FSDP ranks disagree on the freeze decision" in rank["disagreement"]
        assert "FSDP ranks disagree on the freeze decision (rank: decision {0: 1, 1: 2})" in rank["split_freeze"]
        assert "world_size" in rank["cache_layout"] and "4" in rank["cache_layout"]


# ---- one process ----

def args(**overrides):
    values = dict(world_size=2, n_gpu=1, deepspeed=None, fsdp=None, fsdp_config=None,
                  ddp_find_unused_parameters=None, activation_checkpointing=False, gradient_checkpointing=False)
    return SimpleNamespace(**{**values, **overrides})


def test_fsdp1_is_refused_with_the_reason_and_the_fix():
    with pytest.raises(ParallelModeError, match="FSDP1.*pytorch#104690.*version': 2"):
        check_parallel_mode(args(fsdp=True, fsdp_config={"version": 1}), rebuilds_ddp=True)
    assert "Use FSDP2" in FSDP1_REFUSAL


def test_fsdp_is_recognised_from_the_model_not_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what Accelerate leaves behind after an FSDP run
    model = tiny_model("bert", "seq")
    check_parallel_mode(args(world_size=1), model, rebuilds_ddp=True)  # a later plain run is not refused
    assert requested_fsdp_version(args(fsdp=True)) == 2  # transformers 5's default
    with caplog.at_level("WARNING", logger="hf_freeze.fsdp"):
        assert check_fsdp(args(fsdp=True), model) is False  # asked for, but Accelerate did not shard (CPU)
    assert "plain DDP" in caplog.text
    assert model_class(model) is type(model)


def test_sharded_square_sums_of_plain_tensors_are_local():
    sums = sharded_square_sums([[torch.tensor([3.0, 4.0])], [], [torch.ones(4), torch.ones(5)]])
    assert sums.tolist() == [25.0, 0.0, 9.0]
