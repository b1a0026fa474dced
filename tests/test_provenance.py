"""Which code a benchmark ran: tree ids from the files on disk, checked against commits in a scratch repository."""

from __future__ import annotations

import subprocess

from ffchat.provenance import git_state, source_trees


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def make_repo(tmp_path):
    repo = tmp_path / "repo"
    for folder, text in (("kernels", "a = 1\n"), ("ffchat", "b = 2\n")):
        (repo / folder).mkdir(parents=True)
        (repo / folder / "code.py").write_text(text)
    (repo / ".gitignore").write_text("*.log\n")
    git(repo.parent, "init", "-q", str(repo))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return repo


def test_tree_ids_name_the_commit_whose_files_ran_not_the_stale_head(tmp_path):
    repo = make_repo(tmp_path)
    (repo / "ffchat" / "code.py").write_text("b = 3\n")  # a change HEAD does not know of
    (repo / "ffchat" / "new.py").write_text("c = 4\n")  # nor this untracked file
    (repo / "kernels" / "run.log").write_text("ignored\n")
    state = git_state(repo)
    assert state["commit"] == git(repo, "rev-parse", "HEAD") and state["uncommitted_changes"]
    trees = state["source_trees"]
    assert trees["kernels"] == git(repo, "rev-parse", "HEAD:kernels"), "unchanged, ignored file left out"
    assert trees["ffchat"] != git(repo, "rev-parse", "HEAD:ffchat")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "second")
    assert trees["ffchat"] == git(repo, "rev-parse", "HEAD:ffchat"), "the commit that holds those files"
    assert "quantize" not in trees, "a folder the checkout lacks is left out"


def test_the_checkout_index_is_untouched_and_outside_a_checkout_nothing_is_claimed(tmp_path):
    repo = make_repo(tmp_path)
    (repo / "kernels" / "code.py").write_text("a = 5\n")
    index_before = (repo / ".git" / "index").read_bytes()
    assert source_trees(repo)["kernels"] != git(repo, "rev-parse", "HEAD:kernels")
    assert (repo / ".git" / "index").read_bytes() == index_before
    assert git(repo, "status", "--porcelain") == "M kernels/code.py", "nothing staged"
    nothing = {"commit": None, "uncommitted_changes": None, "source_trees": None}
    assert git_state(tmp_path / "nowhere") == nothing
    assert git_state(repo / "kernels") == nothing, "a folder inside some checkout is not one"
