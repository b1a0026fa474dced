"""`ffchat run` end to end in subprocesses on tiny random models: pipes, JSON, errors."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import assert_one_line_error, ffchat


@pytest.fixture
def tiny(tiny_model_dir):
    """Import the tiny llama into the (test-isolated) store under the name `tiny`."""
    result = ffchat("pull", str(tiny_model_dir("llama")), "--name", "tiny")
    assert result.returncode == 0, result.stderr
    return tiny_model_dir("llama")


def transformers_greedy(model_dir, messages, max_new_tokens):
    """What Hugging Face generates greedily for the same chat (cut at the first end token):
    the oracle for the whole pipeline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
        min_new_tokens=max_new_tokens, repetition_penalty=1.0,
    )
    new_tokens = out[0, ids["input_ids"].shape[1]:].tolist()
    eos = set(json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"])
    end = next((i for i, token in enumerate(new_tokens) if token in eos), len(new_tokens))
    return tokenizer.decode(new_tokens[:end], skip_special_tokens=True)


def test_piped_greedy_answer_matches_transformers(tiny):
    result = ffchat("run", "tiny", "--temperature", "0", "--repeat-penalty", "1", "-n", "12",
                    "--device", "cpu", input="Hello there!\n")
    assert result.returncode == 0, result.stderr
    expected = transformers_greedy(tiny, [{"role": "user", "content": "Hello there!"}], 12)
    assert result.stdout == expected + "\n"


def test_system_prompt_reaches_the_model(tiny):
    args = ("run", "tiny", "--temperature", "0", "--repeat-penalty", "1", "-n", "10", "--device", "cpu")
    result = ffchat(*args, "--system", "Answer briefly.", input="Hello there!")
    assert result.returncode == 0, result.stderr
    expected = transformers_greedy(
        tiny, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there!"}], 10
    )
    assert result.stdout == expected + "\n"


def test_json_output_has_counts_and_timing(tiny):
    result = ffchat("run", "tiny", "--json", "-n", "7", "--seed", "1", "--device", "cpu", input="Hi")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["model"], answer["backend"]) == ("tiny", "reference")
    assert answer["completion_tokens"] <= 7
    assert answer["prompt_tokens"] > 0
    assert answer["finish_reason"] in ("stop", "length")
    assert answer["ttft_s"] > 0
    assert isinstance(answer["text"], str)


def test_each_line_answers_every_line(tiny):
    result = ffchat("run", "tiny", "--each-line", "--json", "-n", "3", "--device", "cpu",
                    input="first\n\nsecond\nthird\n")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 3


def test_same_seed_same_answer(tiny):
    runs = [ffchat("run", "tiny", "-n", "16", "--seed", "7", "--temperature", "1.0", "--device", "cpu", input="Hi")
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout


def test_raw_completion_skips_the_template(tiny):
    result = ffchat("run", "tiny", "--raw", "--json", "-n", "4", "--device", "cpu", input="The capital of")
    assert result.returncode == 0, result.stderr
    from ffchat.tokenizer import Tokenizer

    prompt_tokens = len(Tokenizer.from_dir(tiny).encode_raw("The capital of"))
    assert json.loads(result.stdout)["prompt_tokens"] == prompt_tokens


def test_verbose_prints_timing_on_stderr_only(tiny):
    result = ffchat("run", "tiny", "-v", "-n", "4", "--device", "cpu", input="Hi")
    assert result.returncode == 0
    assert "tok/s" in result.stderr
    assert "tok/s" not in result.stdout


def test_prompt_longer_than_context_is_an_error(tiny):
    result = ffchat("run", "tiny", "--ctx", "32", "--device", "cpu", input="word " * 200)
    assert_one_line_error(result, "context")


def test_ctx_beyond_model_maximum_is_an_error(tiny):
    assert_one_line_error(ffchat("run", "tiny", "--ctx", "100000", input="Hi"), "maximum context")


def test_missing_model_suggests_pull():
    assert_one_line_error(ffchat("run", "no-such-model", input="Hi"), "ffchat pull")


def test_empty_stdin_is_an_error(tiny):
    assert_one_line_error(ffchat("run", "tiny", input=""), "no input")


def test_bad_sampling_value_is_an_error(tiny):
    assert_one_line_error(ffchat("run", "tiny", "--top-p", "3", input="Hi"), "top_p")


def test_corrupt_weights_fail_with_one_line(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    assert ffchat("pull", str(broken), "--name", "broken").returncode == 0
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(ffchat("run", "broken", input="Hi"), "model.safetensors")
