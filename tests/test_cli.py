"""The `hf-freeze` command: `--help` everywhere, `inspect` on models and saved folders, `train`'s hand-off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model
from test_checkpoint import fine_tuned

from hf_freeze.checkpoint import SUFFIX_WEIGHTS_NAME, save_suffix
from hf_freeze.cli import build_parser, main
from hf_freeze.layout import find_layout

ROOT = Path(__file__).resolve().parent.parent


def subcommands():
    parser = build_parser()
    return sorted(next(a for a in parser._actions if a.dest == "command").choices)


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: hf-freeze {command or ''}".rstrip())


def test_the_module_runs_as_a_command():
    result = subprocess.run([sys.executable, "-m", "hf_freeze.cli", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "inspect" in result.stdout and "push" in result.stdout


def test_inspect_a_model_folder(tmp_path, capsys):
    model = tiny_model("llama", "causal")
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layout = find_layout(model)
    assert report["layout"]["class"] == "LlamaForCausalLM" and report["layout"]["blocks"]["count"] == 4
    assert report["layout"]["blocks"]["path"] == layout.blocks_path
    assert report["layout"]["blocks"]["parameters_per_block"] == [sum(p.numel() for p in b.parameters())
                                                                  for b in layout.blocks]
    assert "metadata" not in report


def test_inspect_a_suffix_checks_its_base(tmp_path, capsys):
    tiny_model("bert", "base").save_pretrained(tmp_path / "base")
    tiny_model("bert", "base", seed=5).save_pretrained(tmp_path / "other")
    save_suffix(fine_tuned("bert", "seq"), tmp_path / "suffix", base_model=str(tmp_path / "base"))
    assert main(["inspect", str(tmp_path / "suffix")]) == 0
    text = capsys.readouterr().out
    assert "suffix-only checkpoint" in text and f"base:       {tmp_path / 'base'}" in text
    assert "boundary:   2 of 4 blocks" in text and "prefix fingerprint matches" in text and "frozen:     2" in text
    assert main(["inspect", str(tmp_path / "suffix"), "--base", str(tmp_path / "other")]) == 2
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "suffix"), "--no-check"]) == 0
    assert "base check: skipped" in capsys.readouterr().out


def test_inspect_a_suffix_whose_base_is_unknown_or_unreachable(tmp_path, capsys):
    model = fine_tuned("bert", "seq")
    model.config._name_or_path = ""
    save_suffix(model, tmp_path / "no_base")
    save_suffix(model, tmp_path / "gone", base_model=str(tmp_path / "deleted"))
    assert main(["inspect", str(tmp_path / "no_base")]) == 1
    assert "base check: not done, could not load the base: The checkpoint does not name its base" in \
        capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "gone")]) == 1
    assert "base check: not done" in capsys.readouterr().out
    metadata = tmp_path / "gone" / "hf_freeze.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "format_version": 99}))
    assert main(["inspect", str(tmp_path / "gone")]) == 1
    assert "format version 99" in capsys.readouterr().err


def test_train_hands_its_flags_to_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "text-classification", "--help"])
    assert exit_.value.code == 0
    assert "--policy" in capsys.readouterr().out  # FreezeConfig's flags: the recipe's parser answered


# ---- failures: one line on stderr, a non-zero exit, no traceback (the real command, in a subprocess) ----

MISSING = "/no/such/folder"
UNREACHABLE = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9


def failure_cases(command, folders):
    """`{case: (argv, extra environment, a phrase the error line must hold)}` for one subcommand."""
    good, corrupt = str(folders["good"]), str(folders["corrupt"])

    def model(value):  # where each subcommand takes the model it loads
        return {"inspect": ["inspect", value], "push": ["push", value, "user/x", "--token", "hf_x"],
                "train": ["train", "text-classification", "--model_name_or_path", value, "--output_dir",
                          str(folders["out"])],
                "serve": ["serve", "--base", value]}[command]

    cases = {
        "missing path": (model(MISSING), {}, "not a folder" if command == "push" else "does not exist"),
        "corrupt folder": (model(corrupt), {}, "is corrupt: its sha256"),
    }
    if command == "push":  # the folder is local; the Hub id is the target repo
        cases.update({
            "bad Hub id": (["push", good, "not a repo id!"], {}, "not a valid Hub repo id"),
            "offline": (["push", good, "user/x", "--token", "hf_x"], {}, "unset HF_HUB_OFFLINE"),
            "unreachable Hub": (["push", good, "user/x", "--token", "hf_x"], UNREACHABLE, "reach the Hub"),
        })
    else:
        cases.update({
            "bad Hub id": (model("not a repo id!"), {}, "nor a valid Hub id"),
            "offline": (model("someone/never-downloaded"), {}, "the Hub is offline (HF_HUB_OFFLINE=1)"),
            "unreachable Hub": (model("someone/never-downloaded"), UNREACHABLE, "could not reach the Hub"),
        })
    return cases


@pytest.fixture
def cli_folders(tmp_path):
    tiny_model("bert", "base").save_pretrained(tmp_path / "base")
    for name in ("good", "corrupt"):
        save_suffix(fine_tuned("bert", "seq"), tmp_path / name, base_model=str(tmp_path / "base"))
    weights = tmp_path / "corrupt" / SUFFIX_WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes: only the recorded sha256 tells
    weights.write_bytes(bytes(data))
    return {"good": tmp_path / "good", "corrupt": tmp_path / "corrupt", "out": tmp_path / "out"}


def test_a_folder_with_an_unreadable_config_is_refused_before_loading(tmp_path):
    from hf_freeze.commands.errors import CommandError, check_model_source

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CommandError, match=r"config\.json is unreadable .*the folder is corrupt; save or download"):
        check_model_source(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CommandError, match="has no config.json"):
        check_model_source(str(tmp_path))


def run_concurrently(commands):
    """Start every `(argv, extra environment)` at once (each pays the imports), then wait for all."""
    processes = []
    for argv, extra in commands:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
        processes.append(subprocess.Popen([sys.executable, "-m", "hf_freeze.cli", *argv], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append((process.returncode, out, err))
    return results


@pytest.mark.parametrize("command", ["inspect", "push", "train", "serve"])
def test_every_failure_is_one_line_on_stderr(command, cli_folders):
    cases = failure_cases(command, cli_folders)
    results = run_concurrently([(argv, extra) for argv, extra, _ in cases.values()])
    for (case, (_, _, phrase)), (code, out, err) in zip(cases.items(), results):
        lines = err.strip().splitlines()
        assert code != 0, (case, out, err)
        assert "Traceback" not in err, (case, err)
        assert len(lines) == 1, (case, err)
        assert lines[0].startswith(f"hf-freeze {command}: error: "), (case, err)
        assert phrase in lines[0], (case, lines[0])


def test_debug_shows_the_traceback(cli_folders):
    [(code, _, err)] = run_concurrently([(["--debug", "inspect", MISSING], {})])
    assert code != 0 and "Traceback" in err and "CommandError" in err
