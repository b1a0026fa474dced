"""Tokenizer loading, encode/decode against transformers, and streaming detokenization.

Two tokenizer styles cover the supported families: byte-level BPE (Llama 3,
Qwen, SmolLM2; the factory's) and SentencePiece-style BPE with byte fallback
(Llama 2, Mistral, TinyLlama), built and trained here in both of the layouts
tokenizer.json files use for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factory import CHATML_TEMPLATE, CORPUS, build_tokenizer
from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from ffchat.errors import FfchatError
from ffchat.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading, trailing and   inner   runs of spaces  ",
    "Café crème, naïve résumé, über, Zürich, e\u0301 (combining accent)",
    "日本語のテキスト、東京と大阪。中文也可以。",
    "emoji 😀 🦀 👩‍👩‍👧 flags 🇫🇷🇯🇵 and ✨",
    "def add(a, b):\n\treturn a + b  # sum\n",
    "tabs\t\tand\n\n\nnewlines\r\n and \u00a0nbsp \u200bzero width",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n",
    "Numbers 12345, 3.14159 and 1e-9.",
    "",
    " ",
]


def write_config(directory: Path, **fields) -> None:
    """Rewrite tokenizer_config.json with ``fields`` changed (None removes a key)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.fixture
def byte_level_dir(tmp_path):
    build_tokenizer(tmp_path / "tok")
    return tmp_path / "tok"


def build_sentencepiece_style(directory: Path, layout: str) -> Path:
    """SentencePiece-style BPE with byte fallback, trained on ASCII text so that accents, CJK and emoji
    decode from byte tokens. ``layout`` "llama2": normalizer prepends/replaces "▁", Strip decoder;
    "metaspace": Metaspace pre-tokenizer and decoder."""
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator([text for text in CORPUS if text.isascii()] * 4, trainer)
    spec = json.loads(trained.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Backend.from_str(json.dumps(spec))
    if layout == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sentencepiece_dir(request, tmp_path_factory):
    return build_sentencepiece_style(tmp_path_factory.mktemp("sp") / request.param, request.param)


def oracle(directory: Path):
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory)


# --- encode / decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(byte_level_dir, text):
    ours, reference = Tokenizer.from_dir(byte_level_dir), oracle(byte_level_dir)
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_style_matches_transformers(sentencepiece_dir, text):
    ours, reference = Tokenizer.from_dir(sentencepiece_dir), oracle(sentencepiece_dir)
    ids = ours.encode(text, add_special_tokens=True)
    assert ids == reference.encode(text)  # config and post-processor agree on BOS here
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_special_tokens(byte_level_dir):
    tokenizer, reference = Tokenizer.from_dir(byte_level_dir), oracle(byte_level_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.bos_token_id == reference.bos_token_id == 1
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.is_special(tokenizer.bos_token_id) and not tokenizer.is_special(tokenizer.encode("Paris")[0])
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_named_token_outside_added_tokens_becomes_special(tmp_path):
    """A config may name as EOS a token that tokenizer.json keeps as plain vocabulary; like transformers,
    treat it as special so decoding hides it and text never spells it by accident."""
    directory = tmp_path / "tok"
    backend = build_tokenizer(directory)
    eos = next(token for token in sorted(backend.get_vocab()) if token.startswith("Ġ") and len(token) > 3)
    write_config(directory, eos_token=eos)
    ours, reference = Tokenizer.from_dir(directory), oracle(directory)
    eos_id = backend.token_to_id(eos)
    assert ours.is_special(eos_id) and eos_id in ours.eos_token_ids
    ids = [*ours.encode("Hello"), eos_id]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == "Hello"


# --- BOS / EOS -------------------------------------------------------------------------------------


def test_add_bos_token_true(byte_level_dir):
    write_config(byte_level_dir, add_bos_token=True)
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    plain = tokenizer.encode("Hello world")
    assert tokenizer.adds_bos
    assert tokenizer.encode("Hello world", add_special_tokens=True) == [tokenizer.bos_token_id, *plain]
    assert tokenizer.encode_raw("Hello world") == [tokenizer.bos_token_id, *plain]
    # ChatML writes <|im_start|> (this tokenizer's BOS) first: it is not added twice
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))


def test_add_bos_token_false(byte_level_dir):
    tokenizer = Tokenizer.from_dir(byte_level_dir)  # the factory writes add_bos_token: false
    assert not tokenizer.adds_bos
    assert tokenizer.encode("Hello", add_special_tokens=True) == tokenizer.encode_raw("Hello") == tokenizer.encode("Hello")


def llama3_style_dir(directory: Path) -> Path:
    """tokenizer.json adds <|begin_of_text|> through its post-processor; the config names no add_bos_token."""
    backend = build_tokenizer(directory)
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|eot_id|>")])
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)])
    backend.save(str(directory / "tokenizer.json"))
    write_config(directory, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos_token=None)
    return directory


def test_bos_from_post_processor_when_config_is_silent(tmp_path):
    directory = llama3_style_dir(tmp_path / "tok")
    tokenizer, reference = Tokenizer.from_dir(directory), oracle(directory)
    assert tokenizer.adds_bos
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=True) == reference.encode(text)
    assert tokenizer.encode_raw("Hi")[0] == tokenizer.bos_token_id


def test_config_flags_override_post_processor(tmp_path):
    """add_bos_token: false wins over a post-processor that adds BOS; add_eos_token appends EOS
    for encode(add_special_tokens=True) but never to a completion prompt."""
    directory = llama3_style_dir(tmp_path / "tok")
    write_config(directory, add_bos_token=False, add_eos_token=True)
    tokenizer = Tokenizer.from_dir(directory)
    eos_id = tokenizer.encode("<|eot_id|>")[0]
    assert not tokenizer.adds_bos
    assert tokenizer.encode("Hi", add_special_tokens=True) == [*tokenizer.encode("Hi"), eos_id]
    assert tokenizer.encode_raw("Hi") == tokenizer.encode("Hi")


def test_eos_ids_union(byte_level_dir):
    """Llama 3 stops on <|eot_id|> (tokenizer) and <|end_of_text|> (generation_config): take them all."""
    (byte_level_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 300]}))
    (byte_level_dir / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 301}))
    assert Tokenizer.from_dir(byte_level_dir).eos_token_ids == frozenset({2, 0, 300, 301})
    (byte_level_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    (byte_level_dir / "config.json").unlink()
    assert Tokenizer.from_dir(byte_level_dir).eos_token_ids == frozenset({2, 7})


def test_token_dicts_and_special_tokens_map(byte_level_dir):
    """Configs write tokens as AddedToken dicts; special_tokens_map.json fills what tokenizer_config lacks."""
    write_config(byte_level_dir, bos_token={"__type": "AddedToken", "content": "<|endoftext|>"}, eos_token=None)
    (byte_level_dir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": "<|im_start|>"}))
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_ids) == ("<|im_end|>", frozenset({2}))


# --- chat template sources and errors --------------------------------------------------------------


def test_named_chat_templates_pick_default(byte_level_dir):
    write_config(byte_level_dir, chat_template=[{"name": "tool_use", "template": "T"},
                                                {"name": "default", "template": "D"}])
    assert Tokenizer.from_dir(byte_level_dir).chat_template == "D"


def test_chat_template_jinja_wins(byte_level_dir):
    (byte_level_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!\n")
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        oracle(byte_level_dir).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)) == "hi!"


def test_no_chat_template_suggests_raw(byte_level_dir):
    write_config(byte_level_dir, chat_template=None)
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    assert tokenizer.chat_template is None
    with pytest.raises(FfchatError, match="--raw"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json(byte_level_dir):
    (byte_level_dir / "tokenizer.json").unlink()
    with pytest.raises(FfchatError, match="no tokenizer.json"):
        Tokenizer.from_dir(byte_level_dir)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_corrupt_files(byte_level_dir, name):
    (byte_level_dir / name).write_text("{not json")
    with pytest.raises(FfchatError, match="cannot (load|read)"):
        Tokenizer.from_dir(byte_level_dir)


# --- streaming -------------------------------------------------------------------------------------

STREAM_TEXTS = TEXTS + [
    "🦀🦀🦀 crabs",  # 4-byte characters back to back
    "東京タワー and Tōkyō",
    "Hello world, this is a longer sentence with words the tokenizer knows well.",
    "a<|im_end|>b <|endoftext|> c",
]


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def assert_streams_like_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=True)
    for skip in (True, False):
        pieces = stream(tokenizer, ids, skip)
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_byte_level(byte_level_dir, text):
    assert_streams_like_decode(Tokenizer.from_dir(byte_level_dir), text)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_sentencepiece_style(sentencepiece_dir, text):
    assert_streams_like_decode(Tokenizer.from_dir(sentencepiece_dir), text)


def assert_holds_back_split_character(tokenizer: Tokenizer) -> None:
    """A character split over byte tokens prints once, whole, when its last byte arrives."""
    ids = tokenizer.encode("x🦀")
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the test really splits a character
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(token_id) for token_id in ids]
    assert [piece for piece in pieces if piece] == ["x", "🦀"] and pieces[-1] == "🦀"
    assert decoder.flush() == ""


def test_byte_level_holds_back_split_character(byte_level_dir):
    assert_holds_back_split_character(Tokenizer.from_dir(byte_level_dir))


def test_sentencepiece_holds_back_split_character(sentencepiece_dir):
    assert_holds_back_split_character(Tokenizer.from_dir(sentencepiece_dir))


def test_flush_returns_incomplete_tail(byte_level_dir):
    tokenizer = Tokenizer.from_dir(byte_level_dir)
    ids = tokenizer.encode("ok 🦀")
    decoder = StreamDecoder(tokenizer)
    printed = "".join(decoder.push(token_id) for token_id in ids[:-1])
    tail = decoder.flush()
    assert printed.startswith("ok") and "\ufffd" not in printed and tail.endswith("\ufffd")
    assert printed + tail == tokenizer.decode(ids[:-1])


def test_sentencepiece_spaces_survive_streaming(sentencepiece_dir):
    """Decoding SentencePiece ids one at a time loses every word's leading space; the stream must not."""
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    ids = tokenizer.encode("The capital of France is Paris.")
    assert "".join(tokenizer.decode([token_id]) for token_id in ids) != tokenizer.decode(ids)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "The capital of France is Paris."
    assert " Paris" in pieces or any(piece.startswith(" ") for piece in pieces[1:])


def test_sentencepiece_word_after_skipped_special(sentencepiece_dir):
    """A special token dropped from the output must not make the next word lose its space."""
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    ids = [*tokenizer.encode("Hello"), *tokenizer.encode("</s>"), *tokenizer.encode("world")]
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == "Hello world"
