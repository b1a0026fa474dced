"""GGUF import, checked against transformers' own GGUF loader and against files written from the format.

The real SmolLM2 GGUF is the end-to-end case: config, tokenizer and every
dequantized (and un-permuted) tensor must equal what transformers derives from
the same file. Small files written with gguf.GGUFWriter cover what that file
does not: every supported tensor type, Qwen2/Qwen3/untied Llama, Llama 3 RoPE
scaling, SentencePiece vocabularies, and each way a file can be wrong.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_fixtures import (  # noqa: E402
    byte_level_tokenizer_metadata,
    hf_model_to_gguf,
    hparams,
    sentencepiece_metadata,
    write_gguf,
)
from tokenizers import Tokenizer  # noqa: E402

from ffchat.config import ModelConfig, UnsupportedArchitecture  # noqa: E402
from ffchat.errors import FfchatError  # noqa: E402
from ffchat.gguf_import import SUPPORTED_TENSOR_TYPES, import_gguf, load_gguf_state_dict, read_metadata  # noqa: E402
from ffchat.gguf_tokenizer import build_tokenizer  # noqa: E402
from ffchat.store import Store  # noqa: E402

SAMPLES = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  two leading spaces, three trailing   ",
    " one leading space",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, \u00fcber, \u00c5ngstr\u00f6m",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\uff0c\ud55c\uad6d\uc5b4",
    "emoji \U0001f600\U0001f389 and a ZWJ sequence \U0001f469\u200d\U0001f4bb",
    "def add(a, b):\n    return a + b  # sum\n",
    "Numbers: 12345, 3.14159, -42, 2024-11-22, 1,000,000",
    "tabs\tand\r\nnewlines\n\n\nend",
    "don't you'll we're I'M",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "",
]


def transformers_gguf_state_dict(path: Path, config) -> dict[str, torch.Tensor]:
    """The tensors transformers loads from a GGUF (what from_pretrained(gguf_file=...) would load).

    from_pretrained itself insists on the accelerate package, which ffchat does
    not need; for these architectures it hands the file to this same function.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    return loaded["tensors"]


def assert_store_empty() -> None:
    """Nothing recorded, and nothing half-written left behind."""
    store = Store()
    assert store.list() == []
    assert not store.models_dir.exists() or list(store.models_dir.iterdir()) == []


# ---- the real model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_record(smollm2_gguf_path, tmp_path_factory):
    return import_gguf(Store(tmp_path_factory.mktemp("store")), smollm2_gguf_path)


@pytest.fixture(scope="module")
def hf_oracle(smollm2_gguf_path):
    """transformers' config and tokenizer read from the same GGUF file."""
    from transformers import AutoConfig, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)
    return AutoConfig.from_pretrained(**where), AutoTokenizer.from_pretrained(**where)


@pytest.mark.slow
def test_import_records_the_file_where_it_is(smollm2_gguf_path, ffchat_home):
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    record = import_gguf(Store(), smollm2_gguf_path, console=console)
    assert "llama, 30 layers, 272 tensors (210 Q4_1, 61 F32, 1 Q8_0)" in console.file.getvalue()
    assert record.name == "SmolLM2-135M-Instruct.Q4_1"
    assert (record.source, record.weights_format) == ("gguf", "gguf")
    assert record.location == str(smollm2_gguf_path.resolve())
    assert [(f.name, f.size) for f in record.files] == [(smollm2_gguf_path.name, smollm2_gguf_path.stat().st_size)]
    assert record.record_dir.parent == ffchat_home / "models"
    found = Store().get("SmolLM2-135M-Instruct.Q4_1")
    assert found == record
    assert {p.name for p in found.model_dir.iterdir()} >= {
        "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert import_gguf(Store(), smollm2_gguf_path, name="smol").name == "smol"


@pytest.mark.slow
def test_config_matches_transformers(smollm2_record, hf_oracle):
    from transformers import AutoConfig

    expected, _ = hf_oracle
    ours = AutoConfig.from_pretrained(smollm2_record.model_dir)
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act"):
        assert getattr(ours, key) == getattr(expected, key), key
    assert ours.rms_norm_eps == pytest.approx(expected.rms_norm_eps, rel=1e-6)
    assert ours.rope_parameters == expected.rope_parameters

    config = ModelConfig.from_file(smollm2_record.model_dir / "config.json")
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and not config.qkv_bias
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2_record, hf_oracle):
    _, expected = hf_oracle
    ours = Tokenizer.from_file(str(smollm2_record.model_dir / "tokenizer.json"))
    for text in SAMPLES:
        ids = ours.encode(text).ids
        assert ids == expected(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert expected.decode(ids) == text
    assert ours.encode("<|im_start|>user<|im_end|>").ids == [1, ours.token_to_id("user"), 2]
    assert ours.get_vocab_size() == 49152


@pytest.mark.slow
def test_tokenizer_config_and_chat_template(smollm2_record):
    import jinja2

    config = json.loads((smollm2_record.model_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    prompt = jinja2.Template(config["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((smollm2_record.model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]


@pytest.mark.slow
def test_state_dict_matches_transformers(smollm2_gguf_path, hf_oracle):
    config, _ = hf_oracle
    ours = load_gguf_state_dict(smollm2_gguf_path)
    expected = transformers_gguf_state_dict(smollm2_gguf_path, config)
    assert sorted(ours) == sorted(expected)
    assert "lm_head.weight" not in ours
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert load_gguf_state_dict(smollm2_gguf_path, dtype=torch.bfloat16)["model.norm.weight"].dtype == torch.bfloat16


# ---- tiny models of each family, converted the way llama.cpp converts them ------------------------------------


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "qwen3"])
def test_tiny_model_round_trip(family, tiny_model_dir, tmp_path):
    """HF model -> GGUF (q/k permuted for Llama, Llama 3 RoPE as rope_freqs) -> ffchat: the same model back."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model_dir = tiny_model_dir(family)
    path = hf_model_to_gguf(model_dir, tmp_path / f"{family}.gguf")
    record = import_gguf(Store(), path)

    assert ModelConfig.from_file(record.model_dir / "config.json") == ModelConfig.from_file(model_dir / "config.json")
    ours = load_gguf_state_dict(path)
    original = load_file(str(model_dir / "model.safetensors"))
    assert sorted(ours) == sorted(original)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)

    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    expected = transformers_gguf_state_dict(path, config)
    for name, tensor in expected.items():  # transformers undoes the permutation for llama only, too
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def test_mistral_is_told_apart_by_name(tiny_model_dir, tmp_path):
    """llama.cpp writes Mistral with the "llama" architecture; general.name is all that tells it apart."""
    path = hf_model_to_gguf(tiny_model_dir("llama"), tmp_path / "m.gguf", name="Mistral 7B Instruct v0.3")
    record = import_gguf(Store(), path)
    assert json.loads((record.model_dir / "config.json").read_text())["model_type"] == "mistral"


# ---- one tensor of each type ----------------------------------------------------------------------------------


def one_tensor_file(path: Path, type_name: str, rows: int = 4, cols: int = 512) -> tuple[Path, np.ndarray, np.ndarray]:
    """A file holding blk.0.ffn_up.weight in ``type_name``: (path, the stored bytes, the values quantized)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    try:
        stored = gguf.quants.quantize(values, qtype)
    except NotImplementedError:  # K- and IQ-quants: gguf can only read them, so write valid random blocks
        stored = _random_blocks(qtype, rows, cols)
        values = None
    tensors = {"blk.0.ffn_up.weight": (stored, None if type_name == "F32" else qtype)}
    return write_gguf(path, "qwen2", hparams("qwen2"), tensors), stored, values


def _random_blocks(qtype, rows: int, cols: int) -> np.ndarray:
    """Random bytes below 0x3C: every float16 scale they spell is finite, so dequantizing stays finite."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    return rng.integers(0, 0x3C, size=(rows, cols // block_size * type_size), dtype=np.uint8)


@pytest.mark.parametrize("type_name", SUPPORTED_TENSOR_TYPES)
def test_every_supported_tensor_type(type_name, tmp_path):
    path, stored, values = one_tensor_file(tmp_path / "one.gguf", type_name)
    loaded = load_gguf_state_dict(path)["model.layers.0.mlp.up_proj.weight"]
    assert loaded.shape == (4, 512) and loaded.dtype == torch.float32
    expected = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[type_name])
    torch.testing.assert_close(loaded, torch.from_numpy(np.asarray(expected, dtype=np.float32)), rtol=0, atol=0)
    assert torch.isfinite(loaded).all() and loaded.abs().sum() > 0
    if values is not None:  # and it means what was quantized, to within the type's precision
        assert np.linalg.norm(loaded.numpy() - values) / np.linalg.norm(values) < 0.12


# ---- files we must refuse, leaving the store untouched --------------------------------------------------------


def test_unsupported_tensor_type_is_named(tmp_path):
    path, _, _ = one_tensor_file(tmp_path / "iq.gguf", "IQ2_XXS")
    for attempt in (lambda: import_gguf(Store(), path), lambda: load_gguf_state_dict(path)):
        with pytest.raises(FfchatError) as error:
            attempt()
        assert "IQ2_XXS" in str(error.value) and "Q4_K" in str(error.value) and "\n" not in str(error.value)
    assert_store_empty()


@pytest.fixture
def tiny_gguf(tiny_model_dir, tmp_path) -> Path:
    return hf_model_to_gguf(tiny_model_dir("qwen2"), tmp_path / "tiny.gguf")


@pytest.mark.parametrize("keep", [0, 3, 10, 200, 4000, "half", -1])
def test_truncated_or_damaged_file(keep, tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = {"half": len(data) // 2, -1: len(data) - 1}.get(keep, keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    for attempt in (lambda: import_gguf(Store(), path), lambda: load_gguf_state_dict(path)):
        with pytest.raises(FfchatError, match=r"^cannot read GGUF file .*cut\.gguf: ") as error:
            attempt()
        assert "\n" not in str(error.value)
    assert_store_empty()


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 20)
    with pytest.raises(FfchatError, match="cannot read GGUF file .*magic"):
        import_gguf(Store(), path)
    with pytest.raises(FfchatError, match="no such GGUF file"):
        import_gguf(Store(), tmp_path / "missing.gguf")
    assert_store_empty()


def test_unsupported_architecture(tmp_path):
    tensors = {"token_embd.weight": np.zeros((8, 64), np.float32)}
    path = write_gguf(tmp_path / "phi.gguf", "phi3", hparams("phi3"), tensors)
    for attempt in (lambda: import_gguf(Store(), path), lambda: load_gguf_state_dict(path)):
        with pytest.raises(UnsupportedArchitecture, match="'phi3'.*llama, qwen2, qwen3"):
            attempt()
    assert_store_empty()


def test_unknown_tensor_is_refused(tmp_path):
    """A Mixtral-style expert tensor has no place in the dense models ffchat runs."""
    tensors = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 8, 64), np.float32)}
    path = write_gguf(tmp_path / "moe.gguf", "llama", hparams("llama"), tensors)
    with pytest.raises(FfchatError, match="blk.0.ffn_gate_exps.weight"):
        import_gguf(Store(), path)
    assert_store_empty()


def test_unsupported_pre_tokenizer_is_refused_before_saving(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")
    metadata = {**hparams("qwen2"), **byte_level_tokenizer_metadata(model_dir, 384, pre="tekken")}
    path = write_gguf(tmp_path / "t.gguf", "qwen2", metadata, {"token_embd.weight": np.zeros((384, 64), np.float32)})
    with pytest.raises(FfchatError, match="pre-tokenizer 'tekken'.*smollm"):
        import_gguf(Store(), path)
    assert_store_empty()


def test_importable_without_the_gguf_package(tmp_path):
    """The GPU machines lack gguf: the module must import there, and name what is missing only when used."""
    path = tmp_path / "any.gguf"
    path.write_bytes(b"GGUF")
    code = (
        "import sys\n"
        "sys.modules['gguf'] = None\n"
        "from ffchat.gguf_import import load_gguf_state_dict\n"
        "from ffchat.errors import FfchatError\n"
        "try:\n"
        "    load_gguf_state_dict(sys.argv[1])\n"
        "except FfchatError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert "needs the gguf package" in result.stdout


# ---- tokenizers from metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pre, expected", [
    ("gpt-2", ["abc", "Ġ12345", "Ġ!!"]),
    ("smollm", ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġ!!"]),
    ("llama-bpe", ["abc", "Ġ", "123", "45", "Ġ!!"]),
    ("qwen2", ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġ!!"]),
])
def test_pre_tokenizers_split_like_the_originals(pre, expected, tiny_model_dir):
    meta = byte_level_tokenizer_metadata(tiny_model_dir("qwen2"), 384, pre=pre)
    tokenizer = build_tokenizer(meta)
    assert [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("abc 12345 !!")] == expected


def test_llama3_whole_words_skip_the_merges(tiny_model_dir):
    """Llama 3 (and llama.cpp for it) emits a word found whole in the vocabulary without merging it."""
    meta = byte_level_tokenizer_metadata(tiny_model_dir("qwen2"), 384, pre="llama-bpe")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["zzqx"]  # reachable by no merge
    tokenizer = build_tokenizer(meta)
    assert tokenizer.encode("zzqx").ids == [383]
    meta["tokenizer.ggml.pre"] = "gpt-2"
    assert build_tokenizer(meta).encode("zzqx").ids != [383]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", "llama", sentencepiece_metadata())


def test_sentencepiece_tokenizer_matches_transformers(sentencepiece_gguf):
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(str(sentencepiece_gguf.parent), gguf_file=sentencepiece_gguf.name)
    ours = build_tokenizer(read_metadata(sentencepiece_gguf))
    for text in ["Hello world", "hello the world", "Hello  world, in an hour!", "caf\u00e9 \U0001f600",
                 "line\nbreak", "Hi", ""]:
        ids = ours.encode(text).ids
        assert ids == expected(text)["input_ids"], text
        assert ids[:1] == [1]  # add_bos_token
        assert ours.decode(ids, skip_special_tokens=True) == text
    assert "<0xF0>" in ours.encode("\U0001f600").tokens  # byte fallback, not <unk>


def test_sentencepiece_spaces_follow_llama_cpp(sentencepiece_gguf):
    """llama.cpp (like Llama 2's own tokenizer) prefixes a space always, and again after every special token.

    transformers' GGUF tokenizer differs here: it adds none after a special
    token, nor before text that already starts with a space.
    """
    ours = build_tokenizer(read_metadata(sentencepiece_gguf))
    assert ours.encode("hello</s>hello").tokens == ["<s>", "\u2581hello", "</s>", "\u2581hello"]
    assert ours.encode(" hello").tokens == ["<s>", "\u2581", "\u2581hello"]
    assert ours.decode(ours.encode(" hello").ids, skip_special_tokens=True) == " hello"
