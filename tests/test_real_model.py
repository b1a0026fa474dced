"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) end to end: import, answer, chat.

These are the product's acceptance tests on the CPU: the model must actually
answer, through the same commands a user types.
"""

from __future__ import annotations

import json
import sys

import pytest

from cli_helpers import REPO, ffchat, ffchat_env

pytestmark = pytest.mark.slow
NAME = "smollm2"


@pytest.fixture
def smollm2(smollm2_gguf_path):
    result = ffchat("pull", str(smollm2_gguf_path), "--name", NAME)
    assert result.returncode == 0, result.stderr
    return NAME


def test_capital_of_france_piped(smollm2):
    result = ffchat("run", smollm2, "--temperature", "0", input="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.count("\n") >= 1


def test_json_answer_parses(smollm2):
    result = ffchat("run", smollm2, "--temperature", "0", "--json", "-p", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "Paris" in answer["text"]
    assert answer["finish_reason"] == "stop"
    assert answer["decode_tokens_per_s"] > 0


def test_interactive_chat_in_a_terminal(smollm2):
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the chat in a pseudo-terminal")
    child = pexpect.spawn(
        sys.executable, ["-m", "ffchat", "run", smollm2, "--temperature", "0", "--device", "cpu"],
        env=ffchat_env(), cwd=str(REPO), encoding="utf-8", timeout=120, dimensions=(40, 200),
    )
    try:
        child.expect_exact(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect_exact(">>> ")
        child.sendline("/set temperature 0.5")
        child.expect_exact("temperature = 0.5")
        child.expect_exact(">>> ")
        child.sendline("/show")
        child.expect_exact("temperature")
        child.expect_exact(">>> ")
        child.sendline("/set temperature 0")  # greedy again: a sampled answer may miss Rome (CI saw it once)
        child.expect_exact("temperature = 0")
        child.expect_exact(">>> ")
        child.sendline("And of Italy?")  # second turn: the history makes "of Italy" meaningful
        child.expect("Rome")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect("tok/s")
        child.expect_exact(">>> ")
        child.sendline("/clear")
        child.expect_exact("conversation cleared")
        child.expect_exact(">>> ")
        child.sendline("/set max_tokens 2000")
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect_exact("knight.")  # the terminal's echo of the message
        child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
