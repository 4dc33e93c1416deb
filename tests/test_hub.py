"""Model cards and pushes to the Hub, end to end against a local stand-in server (tests/hub_server.py).

The uploads and downloads run in subprocesses: huggingface_hub reads `HF_ENDPOINT` when it is imported.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model
from hub_server import TOKEN, HubServer
from huggingface_hub import ModelCard
from serving_helpers import wait_until_healthy
from test_checkpoint import fine_tuned, logits

from hf_freeze import FreezeConfig
from hf_freeze.checkpoint import read_metadata, save_pretrained, save_suffix
from hf_freeze.hub import (
    PushError,
    card_for_folder,
    describe_policy,
    evaluation_metrics,
    push_folder,
    write_model_card,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub():
    state = HubServer()
    server, thread = state.start()
    yield state
    server.should_exit = True
    thread.join(timeout=10)


def client_env(hub, tmp_path, *, token=TOKEN) -> dict[str, str]:
    """The environment of a process whose huggingface_hub talks to the local server (online: no HF_HUB_OFFLINE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "client_home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    if token:
        env["HF_TOKEN"] = token
    return env


def run_client(hub, tmp_path, code, *, token=TOKEN):
    """Run `code` in a fresh interpreter whose huggingface_hub talks to the local server."""
    env = client_env(hub, tmp_path, token=token)
    prelude = "import torch\ntorch.set_num_threads(1)\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_evaluation_metrics_leave_out_counters_and_runtimes():
    logs = {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_runtime": 2.0, "eval_samples_per_second": 9.0,
            "eval_cache/hits": 4, "eval_cache/bytes": 1e6, "eval_freeze/boundary": 2, "epoch": 1.0, "loss": 0.7}
    assert evaluation_metrics(logs) == {"loss": 0.5, "accuracy": 0.75}


def test_card_tables_and_policy_line(tmp_path):
    model = fine_tuned("bert", "seq")
    save_pretrained(model, tmp_path / "full", base_model="sentence-transformers/all-MiniLM-L6-v2")
    history = [{"loss": 0.9, "step": 2}, {"eval_loss": 0.8, "eval_f1": 0.5, "epoch": 1.0, "step": 4},
               {"loss": 0.7, "step": 6}, {"eval_loss": 0.6, "eval_f1": 0.7, "epoch": 2.0, "step": 8},
               {"eval_loss": 0.6, "eval_f1": 0.7, "epoch": 2.0, "step": 8, "eval_runtime": 1.0}]
    card = card_for_folder(tmp_path / "full", log_history=history, speedup=1.5, task="text-classification",
                           policy=describe_policy(FreezeConfig(policy="schedule")))
    table = card.text[card.text.index("| epoch | step |"):].split("\n\n")[0].splitlines()
    assert table == ["| epoch | step | training loss | loss | f1 |", "|---|---|---|---|---|",
                     "| 1.00 | 4 | 0.9000 | 0.8000 | 0.5000 |", "| 2.00 | 8 | 0.7000 | 0.6000 | 0.7000 |"]
    assert "Speed-up over full fine-tuning: 1.50x" in card.text and "schedule_fraction=0.3333," in card.text
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and card.data.eval_results is None


def test_suffix_pushed_and_loaded_by_repo_id(hub, tmp_path):
    base = tiny_model("llama", "base")
    base.save_pretrained(tmp_path / "base")
    model = fine_tuned("llama", "causal")
    save_suffix(model, tmp_path / "suffix", base_model="user/tiny-llama",
                timeline=[{"step": 4, "epoch": 1.0, "boundary": 2, "reason": "scheduled"}])
    check(run_client(hub, tmp_path, f"""
        from huggingface_hub import HfApi
        from hf_freeze.hub import push_folder
        api = HfApi()
        api.create_repo("user/tiny-llama")
        api.upload_folder(repo_id="user/tiny-llama", folder_path={str(tmp_path / "base")!r})
        print(push_folder({str(tmp_path / "suffix")!r}, "user/tiny-llama-suffix"))
    """))
    repo = hub.repos["user/tiny-llama-suffix"]
    assert set(repo.files) == {p.name for p in (tmp_path / "suffix").iterdir()}  # push_folder added README.md
    assert {"config.json", "suffix.safetensors", "hf_freeze.json", "README.md"} <= set(repo.files)
    assert "suffix.safetensors" in repo.lfs and "config.json" not in repo.lfs  # weights went through LFS
    assert repo.files["suffix.safetensors"] == (tmp_path / "suffix" / "suffix.safetensors").read_bytes()
    assert any(call.endswith(".git/info/lfs/objects/batch") for call in hub.calls)
    card = ModelCard(repo.files["README.md"].decode())
    assert (card.data.base_model, card.data.base_model_relation, card.data.library_name) == (
        "user/tiny-llama", "adapter", "hf-freeze")
    assert 'load_suffix("user/tiny-llama-suffix")' in card.text and "| 4 | 1.00 | the embeddings and blocks 0-1 |" \
        in card.text

    # a fresh process: downloads the suffix AND its base from the server, checks the fingerprint
    out = tmp_path / "logits.pt"
    batch = tiny_batch(model, "causal")
    torch.save({k: v for k, v in batch.items() if k != "labels"}, tmp_path / "batch.pt")
    check(run_client(hub, tmp_path, f"""
        from hf_freeze.checkpoint import load_suffix
        model = load_suffix("user/tiny-llama-suffix")
        with torch.no_grad():
            torch.save(model(**torch.load({str(tmp_path / "batch.pt")!r}))[0], {str(out)!r})
    """))
    assert torch.equal(torch.load(out), logits(model, "causal"))

    # `hf-freeze inspect` on the repo id: downloads it, checks the base's fingerprint
    result = check(run_client(hub, tmp_path, """
        from hf_freeze.cli import main
        main(["inspect", "user/tiny-llama-suffix", "--json"])
    """))
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["metadata"]["suffix_only"] and report["metadata"]["boundary"] == 2
    assert report["base_check"] == {"matches": True, "base": "user/tiny-llama"}
    assert report["layout"]["class"] == "LlamaForCausalLM" and report["layout"]["frozen_boundary"] == 2


def test_freeze_trainer_push_to_hub(hub, tmp_path):
    check(run_client(hub, tmp_path, f"""
        from conftest import tiny_model
        from helpers import PadCollator, token_dataset, training_args
        from hf_freeze import FreezeConfig, FreezeTrainer
        args = training_args({str(tmp_path / "out")!r}, eval_strategy="epoch", hub_model_id="user/tiny-bert")
        trainer = FreezeTrainer(model=tiny_model("bert", "seq"), args=args, train_dataset=token_dataset(size=40),
                                eval_dataset=token_dataset(size=16, seed=1), data_collator=PadCollator(),
                                freeze_config=FreezeConfig(policy="schedule", interval=0.2, max_boundary=3))
        trainer.train()
        trainer.push_to_hub(tasks="text-classification", dataset="tiny-tokens", tags="my-tag")
    """))
    repo = hub.repos["user/tiny-bert"]
    assert {"model.safetensors", "config.json", "hf_freeze.json", "README.md", "freeze_timeline.png"} <= set(repo.files)
    assert not any(path.startswith("checkpoint-") for path in repo.files)
    metadata = json.loads(repo.files["hf_freeze.json"])
    assert metadata["boundary"] == 3 and not metadata["suffix_only"] and metadata["timeline"]
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert {"hf-freeze", "my-tag"} <= set(card.data.tags)
    assert {r.metric_type for r in card.data.eval_results} == {"loss"}
    assert "![Freeze timeline" in card.text and "freeze_timeline.png" in card.text
    assert repo.files["freeze_timeline.png"].startswith(b"\x89PNG")


def test_full_folder_pushed_and_loaded(hub, tmp_path):
    model = fine_tuned("bert", "seq")
    save_pretrained(model, tmp_path / "full")
    # a card rendered before the repo existed loads from the local folder; the push points it at the repo
    write_model_card(card_for_folder(tmp_path / "full", repo_id=str(tmp_path / "full")), tmp_path / "full")
    assert f'from_pretrained("{tmp_path / "full"}")' in (tmp_path / "full" / "README.md").read_text()
    batch = tiny_batch(model, "seq")
    torch.save({k: v for k, v in batch.items() if k != "labels"}, tmp_path / "batch.pt")
    out = tmp_path / "logits.pt"
    check(run_client(hub, tmp_path, f"""
        from hf_freeze.checkpoint import load_suffix
        from hf_freeze.freezing import frozen_boundary
        from hf_freeze.hub import push_folder
        push_folder({str(tmp_path / "full")!r}, "user/tiny-full")
        model = load_suffix("user/tiny-full")
        assert frozen_boundary(model) == 2
        with torch.no_grad():
            torch.save(model(**torch.load({str(tmp_path / "batch.pt")!r}))[0], {str(out)!r})
    """))
    assert torch.equal(torch.load(out), logits(model, "seq"))
    assert read_metadata(tmp_path / "full").boundary == 2
    card = hub.repos["user/tiny-full"].files["README.md"].decode()
    assert 'model = BertForSequenceClassification.from_pretrained("user/tiny-full")' in card
    assert str(tmp_path) not in card


def test_push_without_a_token_or_to_a_repo_that_refuses(hub, tmp_path):
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "suffix")
    result = check(run_client(hub, tmp_path, f"""
        from hf_freeze.hub import PushError, push_folder
        for repo, token in [("user/no-token", None), ("refused/tiny", "{TOKEN}"), ("user/bad-token", "hf_wrong")]:
            try:
                push_folder({str(tmp_path / "suffix")!r}, repo, token=token)
            except PushError as error:
                print("REFUSED", repo, str(error).replace("\\n", " "))
    """, token=None))
    lines = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(lines) == 3
    assert "No Hugging Face token" in lines[0] and "hf auth login" in lines[0]
    assert "HTTP 403" in lines[1] and "write token" in lines[1]
    assert "HTTP 401" in lines[2] and "log in again" in lines[2]
    assert "refused/tiny" not in hub.repos and "user/no-token" not in hub.repos


def test_push_while_offline_names_the_cause(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "suffix")
    with pytest.raises(PushError, match="Could not reach the Hub.*OfflineModeIsEnabled.*unset HF_HUB_OFFLINE"):
        push_folder(tmp_path / "suffix", "user/offline", token="hf_any")


def test_the_push_command(hub, tmp_path):
    save_suffix(fine_tuned("gpt2", "seq"), tmp_path / "suffix", base_model="openai-community/gpt2")
    env_code = f"""
        import sys
        from hf_freeze.cli import main
        sys.exit(main(["push", {str(tmp_path / "suffix")!r}, "user/cli-suffix", "--message", "from the command"]))
    """
    result = check(run_client(hub, tmp_path, env_code))
    assert "pushed" in result.stdout and "user/cli-suffix" in result.stdout
    repo = hub.repos["user/cli-suffix"]
    assert repo.messages == ["from the command"]
    assert repo.files["hf_freeze.json"] == (tmp_path / "suffix" / "hf_freeze.json").read_bytes()
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.base_model == "openai-community/gpt2" and card.data.base_model_relation == "adapter"
    assert "[openai-community/gpt2](https://huggingface.co/openai-community/gpt2)" in card.text
    result = run_client(hub, tmp_path, env_code.replace("user/cli-suffix", "refused/cli"))
    assert result.returncode == 1 and "HTTP 403" in result.stderr and "HTTP 403" not in result.stdout


def test_the_card_says_whose_fingerprint_it_is(tmp_path):
    model = fine_tuned("bert", "seq")
    save_suffix(model, tmp_path / "early", timeline=[{"step": 0, "epoch": 0.0, "boundary": 2}])
    save_suffix(model, tmp_path / "late", timeline=[{"step": 0, "epoch": 0.0, "boundary": 0},
                                                    {"step": 40, "epoch": 1.0, "boundary": 2}])
    early, late = card_for_folder(tmp_path / "early").text, card_for_folder(tmp_path / "late").text
    for text in (early, late):
        assert "of the frozen prefix, as saved" in text and "of the base at this boundary" not in text
    assert "froze before the first optimizer step" in early and "refuses a base whose prefix differs" in early
    assert "trained for up to 40 optimizer steps before it froze, so this is not the base's" in late


def test_a_local_base_gets_base_model_from_base_model_id(tmp_path):
    tiny_model("bert", "base").save_pretrained(tmp_path / "base")
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "suffix", base_model=str(tmp_path / "base"))
    assert card_for_folder(tmp_path / "suffix").data.base_model is None  # a local path is no Hub id
    card = card_for_folder(tmp_path / "suffix", base_model_id="someone/tiny-bert")
    assert (card.data.base_model, card.data.base_model_relation) == ("someone/tiny-bert", "adapter")


def test_push_with_base_model_id_records_the_hub_base(hub, tmp_path):
    tiny_model("gpt2", "base").save_pretrained(tmp_path / "base")
    save_suffix(fine_tuned("gpt2", "seq"), tmp_path / "suffix", base_model=str(tmp_path / "base"))
    result = check(run_client(hub, tmp_path, f"""
        import sys
        from hf_freeze.cli import main
        sys.exit(main(["push", {str(tmp_path / "suffix")!r}, "user/local-base", "--base-model-id", "user/tiny-gpt2"]))
    """))
    assert "pushed" in result.stdout
    repo = hub.repos["user/local-base"]
    card = ModelCard(repo.files["README.md"].decode())
    assert (card.data.base_model, card.data.base_model_relation) == ("user/tiny-gpt2", "adapter")
    metadata = json.loads(repo.files["hf_freeze.json"])
    assert metadata["base_model"] == "user/tiny-gpt2"
    assert metadata["base_model_path"] == str((tmp_path / "base").resolve())


def test_a_corrupt_folder_is_not_pushed(tmp_path):
    from hf_freeze.checkpoint import SUFFIX_WEIGHTS_NAME, CheckpointError

    save_suffix(fine_tuned("bert", "seq"), tmp_path / "suffix")
    weights = tmp_path / "suffix" / SUFFIX_WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="suffix.safetensors is corrupt"):
        push_folder(tmp_path / "suffix", "user/corrupt", token="hf_any", base_model_id="user/base")
    assert read_metadata(tmp_path / "suffix").base_model != "user/base"  # nothing re-recorded


def test_a_suffix_on_the_hub_is_hot_loaded_by_its_id_into_a_running_server(hub, tmp_path):
    """`hf-freeze serve` (its own process, online against the local Hub) loads a pushed suffix by its repo id
    through `POST /admin/models`: it answers like the model's own forward; an id the Hub does not know is a clean
    422 and the server keeps serving."""
    import httpx
    from serving_helpers import perturbed_finetune

    base = tiny_model("bert", "seq").eval()
    base.save_pretrained(tmp_path / "base")
    finetune = perturbed_finetune("bert", "seq", 2, seed=5, base=base)
    save_suffix(finetune, tmp_path / "suffix", base_model=str(tmp_path / "base"))
    check(run_client(hub, tmp_path, f"""
        from hf_freeze.hub import push_folder
        push_folder({str(tmp_path / "suffix")!r}, "user/hot-suffix")
    """))
    assert "suffix.safetensors" in hub.repos["user/hot-suffix"].files

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer admin"}
    process = subprocess.Popen([sys.executable, "-m", "hf_freeze.serving.cli", "serve", "--base",
                                str(tmp_path / "base"), "--port", str(port), "--admin-token", "admin"],
                               env=client_env(hub, tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(process, url)
        loaded = httpx.post(f"{url}/admin/models", json={"name": "hot", "path": "user/hot-suffix"}, headers=auth,
                            timeout=60)
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["boundary"] == 2 and loaded.json()["shares_prefix"]

        def served(ids):
            answer = httpx.post(f"{url}/predict", json={"inputs": ids, "model": "hot", "raw_scores": True})
            assert answer.status_code == 200, answer.text
            return torch.tensor([x["score"] for x in sorted(answer.json(), key=lambda x: x["label"])])

        inputs = ([5, 9, 33, 2], [7, 8])
        with torch.no_grad():
            expected = [finetune(input_ids=torch.tensor([ids])).logits[0] for ids in inputs]
        for ids, want in zip(inputs, expected):
            torch.testing.assert_close(served(ids), want, rtol=1e-5, atol=1e-5)
        unknown = httpx.post(f"{url}/admin/models", json={"name": "nope", "path": "user/not-on-the-hub"},
                             headers=auth, timeout=60)
        assert unknown.status_code == 422, unknown.text
        assert unknown.json()["error_type"] == "bad_model_source"
        assert "user/not-on-the-hub is not on the Hub" in unknown.json()["error"], unknown.text
        torch.testing.assert_close(served(inputs[0]), expected[0], rtol=1e-5, atol=1e-5)  # traffic continues
        assert [m["name"] for m in httpx.get(f"{url}/info").json()["models"]] == ["base", "hot"]
    finally:
        process.terminate()
        process.wait(30)
