"""`ffchat pull ORG/NAME` end to end: the CLI in a subprocess, the real huggingface_hub client, a loopback Hub.

Every failure must be one `error:` line on stderr, a non-zero exit, no
traceback, and nothing in the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_only_error_line, ffchat, ffchat_env
from hub_server import (
    FakeHub,
    add_padding,
    closed_port_url,
    copy_model,
    make_bin_only,
    make_sharded,
    set_model_type,
    truncate,
)

from ffchat.store import Store

REPO = "org/tiny"
SKIPPED = ("README.md", "pytorch_model.bin")  # served next to model.safetensors; pull must not fetch them


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A fresh copy of the tiny Llama to serve (and alter)."""
    return copy_model(tiny_model_dir(), tmp_path / "repo")


@pytest.fixture
def served(hub, model_copy):
    """org/tiny: the tiny Llama plus a README and a stale .bin copy of the weights."""
    (model_copy / "README.md").write_text("# tiny\n")
    (model_copy / "pytorch_model.bin").write_bytes(b"old weights")
    return hub.add(REPO, model_copy)


def pull(hub: FakeHub, *args: str, **env: str) -> subprocess.CompletedProcess:
    return ffchat("pull", *args, HF_ENDPOINT=hub.url, **env)


def snapshot_dir(repo) -> Path:
    folder = "models--" + repo.repo_id.replace("/", "--")
    return Path(os.environ["HF_HOME"]) / "hub" / folder / "snapshots" / repo.sha


def assert_nothing_recorded() -> None:
    store = Store()
    assert store.list() == []
    assert not store.models_dir.exists() or list(store.models_dir.iterdir()) == []


def resolve_gets(hub: FakeHub) -> list[str]:
    return [s.path for s in hub.seen if s.method == "GET" and "/resolve/" in s.path]


def test_pull_fetches_only_needed_files_into_the_hf_cache(hub, served):
    result = pull(hub, REPO)

    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"pulled {REPO} (")
    record = Store().get(REPO)
    assert (record.source, record.repo_id, record.revision, record.commit) == ("hub", REPO, "main", served.sha)
    assert record.weights_format == "safetensors"
    assert Path(record.location) == snapshot_dir(served)
    wanted = {name: data for name, data in served.files.items() if name not in SKIPPED}
    assert {f.name: f.size for f in record.files} == {name: len(data) for name, data in wanted.items()}
    for name, data in wanted.items():
        assert (snapshot_dir(served) / name).read_bytes() == data
    assert not any(hub.gets(name) for name in SKIPPED)
    listed = ffchat("list")
    assert REPO in listed.stdout and f"hub: {REPO}" in listed.stdout


def test_pull_a_tag_records_it_and_its_commit(hub, served):
    assert pull(hub, REPO, "--revision", "v1.0").returncode == 0
    record = Store().get(REPO)
    assert (record.revision, record.commit) == ("v1.0", served.sha)


def test_bin_only_repo(hub, model_copy):
    hub.add(REPO, make_bin_only(model_copy))

    result = pull(hub, REPO)

    assert result.returncode == 0, result.stderr
    record = Store().get(REPO)
    assert record.weights_format == "bin"
    assert "pytorch_model.bin" in {f.name for f in record.files}


def test_dropped_connection_resumes_with_a_range_request(hub, model_copy):
    repo = hub.add(REPO, add_padding(model_copy, mib=12))
    hub.break_next(REPO, "model.safetensors", after=11 * 2**20, then="drop")

    result = pull(hub, REPO)

    assert result.returncode == 0, result.stderr
    first, retry = hub.gets("model.safetensors")
    assert first.range is None
    assert retry.status == 206 and retry.range.startswith("bytes=") and int(retry.range[6:].rstrip("-")) > 0
    assert (snapshot_dir(repo) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_interrupted_pull_fails_cleanly_and_the_next_run_resumes(hub, model_copy):
    hub.add(REPO, make_sharded(model_copy))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    hub.break_next(REPO, shards[1], after=100, then="outage")

    assert_only_error_line(pull(hub, REPO), "run the same command again to resume")
    assert_nothing_recorded()

    hub.restore()
    hub.seen.clear()
    result = pull(hub, REPO)

    assert result.returncode == 0, result.stderr
    assert resolve_gets(hub) == [s.path for s in hub.gets(shards[1])]  # the finished files were kept
    assert {"model.safetensors.index.json", *shards} <= {f.name for f in Store().get(REPO).files}


def test_ctrl_c_records_nothing_and_says_how_to_resume(hub, served):
    hub.break_next(REPO, "model.safetensors", after=1000, then="stall")
    process = subprocess.Popen(
        [sys.executable, "-m", "ffchat", "pull", REPO], env=ffchat_env(HF_ENDPOINT=hub.url),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert hub.stalled.wait(30)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130
    assert stderr.strip() == "interrupted: run the same command again to resume"
    assert_nothing_recorded()
    hub.restore()
    assert pull(hub, REPO).returncode == 0


def test_unknown_repo(hub):
    assert_only_error_line(pull(hub, "org/nope"), "org/nope not found", "check the name")
    assert_nothing_recorded()


def test_unknown_revision(hub, served):
    assert_only_error_line(pull(hub, REPO, "--revision", "nope"), "revision 'nope' not found in org/tiny")
    assert_nothing_recorded()


def test_gated_repo_without_token(hub, model_copy):
    hub.add("org/gated", model_copy, token="hf_letmein")
    assert_only_error_line(pull(hub, "org/gated"), "org/gated is gated", "--token", "HF_TOKEN", "huggingface-cli login")
    assert_nothing_recorded()


@pytest.mark.parametrize("how", ["--token", "HF_TOKEN"])
def test_gated_repo_with_token(hub, model_copy, how):
    hub.add("org/gated", model_copy, token="hf_letmein")
    result = pull(hub, "org/gated", "--token", "hf_letmein") if how == "--token" else pull(hub, "org/gated", HF_TOKEN="hf_letmein")
    assert result.returncode == 0, result.stderr
    assert Store().get("org/gated").source == "hub"


def test_hub_unreachable():
    result = ffchat("pull", REPO, HF_ENDPOINT=closed_port_url())
    assert_only_error_line(result, "cannot reach the Hugging Face Hub", "local folder", "HF_HUB_OFFLINE=1")
    assert_nothing_recorded()


def test_offline_without_the_files_cached(hub, served):
    result = pull(hub, REPO, HF_HUB_OFFLINE="1")
    assert_only_error_line(result, "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert hub.seen == []
    assert_nothing_recorded()


def test_offline_pull_records_from_the_cache(hub, served):
    assert pull(hub, REPO).returncode == 0
    online = Store().get(REPO)
    assert ffchat("rm", REPO, "--yes").returncode == 0

    result = ffchat("pull", REPO, HF_HUB_OFFLINE="1", HF_ENDPOINT=closed_port_url())

    assert result.returncode == 0, result.stderr
    offline = Store().get(REPO)
    assert (offline.commit, offline.location, offline.files) == (online.commit, online.location, online.files)


def test_pull_reuses_files_other_tools_downloaded(hub, served):
    names = [name for name in served.files if name not in SKIPPED]
    script = "import sys; from huggingface_hub import hf_hub_download\nfor f in sys.argv[2:]: hf_hub_download(sys.argv[1], f)"
    subprocess.run([sys.executable, "-c", script, REPO, *names], env=ffchat_env(HF_ENDPOINT=hub.url), check=True)
    hub.seen.clear()

    result = pull(hub, REPO)

    assert result.returncode == 0, result.stderr
    assert resolve_gets(hub) == []


def test_damaged_weights_on_the_hub(hub, model_copy):
    truncate(model_copy / "model.safetensors")
    hub.add(REPO, model_copy)
    assert_only_error_line(pull(hub, REPO), "model.safetensors in org/tiny is damaged or truncated")
    assert_nothing_recorded()


def test_unsupported_architecture_is_refused_before_downloading_weights(hub, model_copy):
    set_model_type(model_copy, "gpt2", ["GPT2LMHeadModel"])
    hub.add(REPO, model_copy)
    assert_only_error_line(pull(hub, REPO), "unsupported architecture 'gpt2'", "llama, mistral, qwen2, qwen3")
    assert hub.gets("model.safetensors") == []
    assert_nothing_recorded()


def test_repo_without_config(hub, tmp_path):
    (tmp_path / "gguf-repo").mkdir()
    (tmp_path / "gguf-repo" / "tiny.Q4_0.gguf").write_bytes(b"GGUF")
    hub.add(REPO, tmp_path / "gguf-repo")
    assert_only_error_line(pull(hub, REPO), "org/tiny has no config.json", ".gguf")
    assert_nothing_recorded()


def test_invalid_repo_id():
    result = ffchat("pull", "not a repo", HF_ENDPOINT=closed_port_url())
    assert_only_error_line(result, "'not a repo' is neither an existing file or folder nor a valid Hub repo id")
    assert_nothing_recorded()


def test_unwritable_store_is_refused_before_downloading(hub, served, tmp_path):
    (tmp_path / "a-file").write_text("")  # a directory can never be made under a file, even by root
    result = pull(hub, REPO, FFCHAT_HOME=str(tmp_path / "a-file" / "store"))
    assert_only_error_line(result, "is not writable", "FFCHAT_HOME")
    assert hub.seen == []
    assert_nothing_recorded()


def test_progress_on_a_terminal(hub, served):
    pexpect = pytest.importorskip("pexpect")  # a dev dependency: runs where it is installed
    child = pexpect.spawn(
        sys.executable, ["-m", "ffchat", "pull", REPO], env=ffchat_env(HF_ENDPOINT=hub.url),
        encoding="utf-8", timeout=60, dimensions=(24, 120),
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    progress, _, done = child.before.rpartition("pulled")
    assert REPO in done
    assert "model.safetensors" in progress and "544.1/544.1 kB" in progress  # its bar, complete
