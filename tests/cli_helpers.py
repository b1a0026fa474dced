"""Running the installed `ffchat` the way a user does: in a subprocess, with its own env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ffchat_env(**extra: str) -> dict[str, str]:
    """The current (test-isolated) environment plus the repo on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("FORCE_COLOR", None)
    env.update(extra)
    return env


def ffchat(*args: str, input: str | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m ffchat ARGS` and capture its output (stdin is a pipe, never a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "ffchat", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ffchat_env(**env),
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: non-zero exit, one `error:` line on stderr, no traceback."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def assert_only_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """assert_one_line_error, and nothing else on stderr: no warning, no progress, no second line."""
    assert_one_line_error(result, *fragments)
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
