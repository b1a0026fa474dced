"""Which code a benchmark ran: the checkout's commit, and the git tree ids of the source folders as they were.

A commit alone can mislead: the device machine that runs benchmarks gets a copy of the working tree
with the git metadata of an earlier moment, so its HEAD can name a commit older than the code
(BENCHMARKS.md, stops 24-29). The tree ids are computed from the files themselves, through a
temporary index (the checkout's own index is not touched), so ``git rev-parse COMMIT:kernels``
equal to the recorded ``kernels`` id shows which commit's kernels ran, whatever HEAD said.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("ffchat", "kernels", "quantize", "profiles")


def _git(repo: Path, *args: str, env: dict | None = None) -> str | None:
    """git's stdout, or None where git is missing or fails (outside a checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=False, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_trees(repo: Path = REPO, folders: tuple[str, ...] = SOURCE_FOLDERS) -> dict[str, str] | None:
    """The git tree id of each folder as it is on disk (ignored files left out); None outside a checkout."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(scratch) / "index")}
        present = [folder for folder in folders if (repo / folder).is_dir()]
        if _git(repo, "add", "--all", "--", *present, env=env) is None:
            return None
        trees = {folder: _git(repo, "write-tree", f"--prefix={folder}/", env=env) for folder in present}
    return trees if all(trees.values()) else None


def git_state(repo: Path = REPO) -> dict:
    """The checkout's commit, whether its tree differs from it, and ``source_trees``; None values where ``repo`` is
    not the top of a checkout (an installed ffchat whose site-packages lies inside some other project's)."""
    top = _git(repo, "rev-parse", "--show-toplevel")
    commit = _git(repo, "rev-parse", "HEAD") if top and Path(top).resolve() == repo.resolve() else None
    status = _git(repo, "status", "--porcelain") if commit else None
    return {"commit": commit, "uncommitted_changes": None if status is None else bool(status),
            "source_trees": source_trees(repo) if commit else None}
