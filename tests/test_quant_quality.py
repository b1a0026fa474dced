"""What INT4 costs the real SmolLM2-135M-Instruct (Q4_1 GGUF), through the commands a user types.

The issue's bars with `ffchat quantize`'s defaults: perplexity within +5% of
the original weights over 20k+ tokens of text already on the machine (the
licence texts, never copied into the repository), no worse than RTN, Paris
still the greedy answer, and the INT4 tensors no bigger than the GGUF's own
Q4_1 blocks. (The issue's "at most 0.3x of bf16" cannot hold at group 32,
where layout v1 spends 5 bits per weight, 0.3125x, as Q4_1 does; other sources
get group 128, 0.266x: test_quant_artifact.) One module fixture runs every
command once (about 5 minutes on 2 CPU cores); the tests then check one bar each.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_helpers import ffchat
from safetensors.torch import load_file

from ffchat.store import Store
from ffchat.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
NAME = "smollm2"
LICENSES = Path("/usr/share/common-licenses")
MIN_TOKENS = 20_000
WINDOW = "1024"
# Layout v1 at group 32: 4 bits plus an fp16 scale and zero per 32 weights, over bf16's 16 bits.
# That is exactly Q4_1's 20 bytes per 32 weights: the artifact keeps the GGUF's blocks at their size.
GROUP_32_RATIO = (4 + (16 + 16) / 32) / 16
W4A8_PERPLEXITY_BUDGET = 1.02  # int8 activations may cost at most 2% perplexity over W4A16


def license_text(directory: Path, tokenizer_dir: Path) -> str:
    """The licence files in sorted order, concatenated until the text has MIN_TOKENS tokens."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    text = ""
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        text += path.read_text(encoding="utf-8", errors="replace")
        if len(tokenizer.encode_raw(text)) >= MIN_TOKENS:
            return text
    pytest.skip(f"the files in {directory} hold fewer than {MIN_TOKENS} tokens")


def perplexity(env: dict, text: Path, *options: str) -> tuple[float, int]:
    result = ffchat("ppl", NAME, *options, "--file", str(text), "--window", WINDOW, "--stride", WINDOW,
                    timeout=600, **env)
    assert result.returncode == 0, result.stderr
    tokens = int(re.search(r"scoring ([\d,]+) tokens", result.stderr)[1].replace(",", ""))
    return float(re.search(r"perplexity ([\d.]+)", result.stdout)[1]), tokens


def quantize(env: dict, *options: str) -> str:
    result = ffchat("quantize", NAME, *options, timeout=600, **env)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def measured(smollm2_gguf_path, tmp_path_factory):
    """Every figure the tests check, from one store: fp, default INT4 and RTN INT4 perplexity, answer, sizes."""
    if not LICENSES.is_dir():
        pytest.skip(f"no {LICENSES} on this machine")
    home = tmp_path_factory.mktemp("quality")
    env = {"FFCHAT_HOME": str(home / "ffchat-home"), "HF_HOME": str(home / "hf-home"), "HF_HUB_OFFLINE": "1"}
    assert ffchat("pull", str(smollm2_gguf_path), "--name", NAME, **env).returncode == 0
    record = Store(home / "ffchat-home").get(NAME)
    text = home / "licenses.txt"
    text.write_text(license_text(LICENSES, record.model_dir), encoding="utf-8")

    figures = {"fp": perplexity(env, text, "--fp16")}
    figures["default_output"] = quantize(env)
    figures["default"] = perplexity(env, text, "--int4")
    figures["w4a8"] = perplexity(env, text, "--int4", "--int8-activations")
    artifact = load_file(record.record_dir / "int4" / "model.safetensors")
    figures["answer"] = ffchat("run", NAME, "--temperature", "0", input="What is the capital of France?\n", **env)
    figures["rtn_output"] = quantize(env, "--method", "rtn")
    figures["rtn"] = perplexity(env, text, "--int4")
    figures["artifact"] = artifact
    return figures


def test_text_is_long_enough(measured):
    assert all(measured[kind][1] >= MIN_TOKENS for kind in ("fp", "default", "w4a8", "rtn"))


def test_default_is_within_5_percent_of_the_original(measured):
    fp, default = measured["fp"][0], measured["default"][0]
    assert "group size 32: the GGUF's Q4_1 blocks" in measured["default_output"]
    assert "with wmse" in measured["default_output"] and "LM head int4" in measured["default_output"]
    assert default <= 1.05 * fp, (default, fp)


def test_default_is_no_worse_than_rtn(measured):
    assert "with rtn" in measured["rtn_output"]
    assert measured["default"][0] <= measured["rtn"][0], (measured["default"][0], measured["rtn"][0])


def test_int8_activations_cost_little(measured):
    """The triton-w4a8 mode's rounding (gate/up and LM head inputs to int8 per group of 32), emulated."""
    w4a8, default = measured["w4a8"][0], measured["default"][0]
    print(f"perplexity: fp {measured['fp'][0]:.3f}, INT4 {default:.3f}, INT4 with int8 activations {w4a8:.3f}")
    assert w4a8 != default, "the emulation must change something"
    assert w4a8 <= W4A8_PERPLEXITY_BUDGET * default, (w4a8, default)


def test_paris_after_quantizing(measured):
    answer = measured["answer"]
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout


def test_int4_tensors_are_no_bigger_than_the_gguf_blocks(measured, smollm2_gguf_path):
    """All 211 INT4 tensors (210 linears + the LM head) against the GGUF bytes they come from (Q4_1 linears,
    Q8_0 embeddings) and against bf16."""
    gguf = pytest.importorskip("gguf")
    artifact = measured["artifact"]
    names = [key[: -len(".qweight")] for key in artifact if key.endswith(".qweight")]
    assert len(names) == 211
    int4_bytes = sum(artifact[f"{n}.{p}"].numel() * artifact[f"{n}.{p}"].element_size()
                     for n in names for p in ("qweight", "scales", "zeros"))
    bf16_bytes = sum(artifact[f"{n}.qweight"].numel() * 8 * 2 for n in names)
    sources = gguf.GGUFReader(smollm2_gguf_path).tensors
    gguf_bytes = sum(int(t.n_bytes) for t in sources if t.tensor_type.name in ("Q4_1", "Q8_0"))
    assert int4_bytes <= gguf_bytes
    assert int4_bytes / bf16_bytes == pytest.approx(GROUP_32_RATIO, abs=1e-9)
