"""`ffchat list`, `show`, `rm` and the help screens, run as a user runs them; and the store's atomic writes."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_only_error_line, ffchat, ffchat_env
from hub_server import FakeHub, copy_model

from ffchat import __version__
from ffchat.config import ModelConfig
from ffchat.describe import human_count, human_size
from ffchat.profiles import describe_gpu
from ffchat.tuning_cache import tuning_status
from ffchat.pull import pull_model
from ffchat.store import ModelRecord, Store


@pytest.fixture
def folder(tiny_model_dir, tmp_path) -> Path:
    return copy_model(tiny_model_dir(), tmp_path / "tiny-llama")


@pytest.fixture
def imported(folder) -> ModelRecord:
    """The tiny Llama imported as "tiny" (in-process: only the commands under test run as subprocesses)."""
    return pull_model(Store(), str(folder), name="tiny")


def test_help_lists_the_commands():
    result = ffchat("--help")
    assert result.returncode == 0
    for command in ("pull", "list", "show", "rm"):
        assert command in result.stdout


@pytest.mark.parametrize("command, option", [("pull", "--revision"), ("list", "--help"), ("show", "Model name"), ("rm", "--purge")])
def test_each_command_has_help(command, option):
    result = ffchat(command, "--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout and option in result.stdout


def test_version():
    result = ffchat("--version")
    assert (result.returncode, result.stdout) == (0, f"ffchat {__version__}\n")


def test_list_with_no_models():
    result = ffchat("list")
    assert (result.returncode, result.stdout) == (0, "")
    assert "no models yet" in result.stderr


def test_list_shows_name_source_size_and_quantization(imported, folder):
    before = ffchat("list").stdout
    manifest = imported.record_dir / "int4" / "manifest.yaml"
    manifest.parent.mkdir()
    manifest.write_text("method: hqq\ngroup_size: 128\nlayout_version: 1\n")
    after = ffchat("list").stdout

    row = next(line for line in before.splitlines() if line.split()[:1] == ["tiny"])
    assert f"folder: {folder}" in row and human_size(imported.size) in row and row.rstrip().endswith("no")
    assert "int4 hqq g128" in after


def test_show_describes_the_model(imported, folder):
    result = ffchat("show", "tiny")

    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines() if line.strip()}
    config = ModelConfig.from_file(folder / "config.json")
    assert f"folder {folder}" in rows["source"]
    assert "llama (Llama 2/3" in rows["architecture"]
    assert human_count(config.num_parameters) in rows["parameters"]
    assert rows["context length"].split()[-1] == "256"
    assert "4 query / 2 key-value, head_dim 16" in rows["heads"]
    assert rows["chat template"].split()[-1] == "yes"
    assert rows["quantization"].split()[-1] == "no"
    assert describe_gpu() in rows["gpu profile"]  # this machine's, as the subprocess saw it
    assert tuning_status(config, None) in rows["tuning"]  # not quantized: nothing to tune
    for file in imported.files:
        assert file.name in result.stdout


def test_show_unknown_model():
    assert_only_error_line(ffchat("show", "nope"), "model 'nope' not found", "ffchat pull nope")


def test_error_messages_print_brackets_literally():
    assert_only_error_line(ffchat("show", "[red]x[/red]"), "'[red]x[/red]' not found")


def test_rm_without_yes_refuses_when_not_on_a_terminal(imported):
    assert_only_error_line(ffchat("rm", "tiny"), "without confirmation", "--yes")
    assert Store().find("tiny") is not None


def test_rm_yes_removes_the_record_and_keeps_the_folder(imported, folder):
    files = sorted(p.name for p in folder.iterdir())
    result = ffchat("rm", "tiny", "--yes", "--purge")

    assert result.returncode == 0, result.stderr
    assert "nothing to purge" in result.stderr and "removed tiny" in result.stderr
    assert Store().list() == [] and not imported.record_dir.exists()
    assert sorted(p.name for p in folder.iterdir()) == files


@pytest.mark.parametrize("answer, kept", [("n", True), ("y", False)])
def test_rm_asks_on_a_terminal(imported, answer, kept):
    pexpect = pytest.importorskip("pexpect")  # a dev dependency: runs where it is installed
    child = pexpect.spawn(sys.executable, ["-m", "ffchat", "rm", "tiny"], env=ffchat_env(), encoding="utf-8", timeout=30)
    child.expect(r"Remove tiny\? \[y/N\]")
    child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    assert (child.exitstatus == 0) is not kept
    assert (Store().find("tiny") is not None) is kept


def test_rm_purge_deletes_the_hub_snapshot_unless_another_record_uses_it(tiny_model_dir):
    with FakeHub() as hub:
        hub.add("org/tiny", tiny_model_dir())
        assert ffchat("pull", "org/tiny", HF_ENDPOINT=hub.url).returncode == 0
    repo_folder = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny"
    Store().save(dataclasses.replace(Store().get("org/tiny"), name="alias"))

    shared = ffchat("rm", "alias", "--yes", "--purge")
    assert shared.returncode == 0 and "org/tiny uses them too" in shared.stderr
    assert (Path(Store().get("org/tiny").location) / "model.safetensors").is_file()

    purged = ffchat("rm", "org/tiny", "--yes", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert "removed org/tiny and its files in the Hugging Face cache" in purged.stderr
    assert not repo_folder.exists() and Store().list() == []


def test_a_failed_save_leaves_no_record_and_no_stray_directories(monkeypatch, folder):
    def fail(staging, final):
        raise OSError("disk full")

    monkeypatch.setattr("ffchat.store.replace_directory", fail)
    with pytest.raises(OSError, match="disk full"):
        pull_model(Store(), str(folder))
    assert Store().list() == []
    assert list(Store().models_dir.iterdir()) == []


def test_an_interrupted_save_keeps_the_previous_record(monkeypatch, imported):
    def interrupt(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(ModelRecord, "to_yaml", interrupt)
        Store().save(dataclasses.replace(imported, location="/elsewhere"), {"derived/tokenizer.json": b"{}"})
    assert [(r.name, r.location) for r in Store().list()] == [("tiny", imported.location)]
    assert [p.name for p in Store().models_dir.iterdir()] == [imported.record_dir.name]
