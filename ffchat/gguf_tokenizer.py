"""Rebuild a Hugging Face tokenizer from the tokenizer a GGUF file describes.

A GGUF carries no tokenizer.json, only llama.cpp's ``tokenizer.ggml.*`` keys:
the vocabulary, its merges (or SentencePiece scores), each token's type and the
name of the pre-tokenizer. From those we write the tokenizer.json,
tokenizer_config.json and generation_config.json the rest of ffchat reads, so a
GGUF model and a Hub model look the same past the import. This module works on
plain metadata values; reading the file is ffchat.gguf_import's job.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ffchat.errors import FfchatError

# llama.cpp's token types (gguf.TokenType), as stored in tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

SPIECE_SPACE = "\u2581"

# The split patterns of the original tokenizers (their tokenizer.json), by llama.cpp's pre-tokenizer name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_style(tokenizer: Tokenizer) -> None:
    """GPT-2's own split (also llama.cpp's "default" for files that name no pre-tokenizer)."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_style(tokenizer: Tokenizer) -> None:
    """SmolLM/SmolLM2: every digit on its own, then GPT-2's split."""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _split_style(pattern: str):
    def apply(tokenizer: Tokenizer) -> None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    return apply


def _llama3_style(tokenizer: Tokenizer) -> None:
    """Llama 3: numbers in groups of three, and a word found whole in the vocabulary skips the merges."""
    _split_style(_LLAMA3_SPLIT)(tokenizer)
    tokenizer.model.ignore_merges = True


def _qwen2_style(tokenizer: Tokenizer) -> None:
    """Qwen2/2.5/3: single digits; Qwen's own tokenizer.json also NFC-normalizes the text."""
    _split_style(_QWEN2_SPLIT)(tokenizer)
    tokenizer.normalizer = normalizers.NFC()


PRE_TOKENIZERS = {
    "default": _gpt2_style,
    "gpt-2": _gpt2_style,
    "smollm": _smollm_style,
    "llama-bpe": _llama3_style,
    "llama3": _llama3_style,
    "llama-v3": _llama3_style,
    "qwen2": _qwen2_style,
    "deepseek-r1-qwen": _qwen2_style,
}


def tokenizer_files(meta: dict[str, Any], *, context_length: int) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and generation_config.json for a GGUF's metadata."""
    tokenizer = build_tokenizer(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": None if (i := special_token_id(meta, key)) is None else tokens[i]
           for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))},
        "add_bos_token": add_bos_token(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    generation = {"bos_token_id": special_token_id(meta, "bos"), "eos_token_id": list(eos_token_ids(meta))}
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False).encode(),
        "tokenizer_config.json": _json(config),
        "generation_config.json": _json(generation),
    }


def eos_token_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    """End-of-sequence ids: the EOS token, then end-of-turn and end-of-message tokens when the file names them."""
    ids = (special_token_id(meta, key) for key in ("eos", "eot", "eom"))
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def add_bos_token(meta: dict[str, Any]) -> bool:
    """Whether to start every text with BOS; llama.cpp assumes so for SentencePiece files that do not say."""
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a GGUF file: byte-level BPE ("gpt2") or SentencePiece BPE ("llama")."""
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise FfchatError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in meta and len(meta[key]) != len(meta["tokenizer.ggml.tokens"]):
            raise FfchatError(f"the GGUF's tokenizer is damaged: {key} does not match the vocabulary")
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta)
    else:
        raise FfchatError(f"unsupported GGUF tokenizer model {kind!r}; ffchat supports gpt2 (byte-level BPE) and llama")
    _add_special_tokens(tokenizer, meta)
    tokenizer.post_processor = _post_processor(meta)
    return tokenizer


def _byte_level_bpe(meta: dict[str, Any]) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise FfchatError(
            f"unsupported GGUF pre-tokenizer {pre!r}; ffchat supports: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    vocab = _vocab(meta["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", [])]
    if any(len(merge) != 2 for merge in merges):
        raise FfchatError("the GGUF's tokenizer is damaged: a merge is not two tokens")
    tokenizer = Tokenizer(_bpe(vocab=vocab, merges=merges))
    PRE_TOKENIZERS[pre](tokenizer)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE as Llama 2 and TinyLlama use it: "\u2581" for spaces, byte fallback.

    The file has scores instead of merges. SentencePiece merges the adjacent pair
    whose joined piece scores highest, so every split of a piece into two
    pieces becomes a merge, ranked by the joined piece's score.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise FfchatError("the GGUF's SentencePiece tokenizer has no scores (tokenizer.ggml.scores)")
    unk_id = special_token_id(meta, "unknown")
    tokenizer = Tokenizer(_bpe(
        vocab=_vocab(tokens), merges=_merges_from_scores(tokens, types, scores),
        unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True, byte_fallback=True,
    ))
    # llama.cpp puts a space before the text and again after every special token, as this normalizer does.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    ids = {token: i for i, token in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe(**kwargs) -> models.BPE:
    """tokenizers' BPE model; merges that do not fit the vocabulary mean a damaged file."""
    try:
        return models.BPE(**kwargs)
    except Exception as exc:  # tokenizers raises a bare Exception for this
        raise FfchatError(f"the GGUF's tokenizer is damaged: {str(exc).splitlines()[0]}") from exc


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise FfchatError("the GGUF's vocabulary lists the same token twice; ffchat cannot rebuild its tokenizer")
    return vocab


def _add_special_tokens(tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Control tokens (<|im_start|>, <s>) become special tokens, user-defined ones plain added tokens.

    Either way they are matched whole in the text, before any splitting, as llama.cpp does.
    """
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(types) if kind in (CONTROL, UNKNOWN)]
    plain = [AddedToken(tokens[i], special=False, normalized=False)
             for i, kind in enumerate(types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _post_processor(meta: dict[str, Any]) -> processors.TemplateProcessing | None:
    """Add BOS/EOS on encode when the file asks for it, as the model's own tokenizer.json would."""
    tokens = meta["tokenizer.ggml.tokens"]
    bos = special_token_id(meta, "bos") if add_bos_token(meta) else None
    eos = special_token_id(meta, "eos") if meta.get("tokenizer.ggml.add_eos_token", False) else None
    if bos is None and eos is None:
        return None
    first = [] if bos is None else [tokens[bos]]
    last = [] if eos is None else [tokens[eos]]
    ends = {tokens[i]: i for i in (bos, eos) if i is not None}
    return processors.TemplateProcessing(single=first + ["$A"] + last, special_tokens=list(ends.items()))


def special_token_id(meta: dict[str, Any], key: str) -> int | None:
    """The id stored under tokenizer.ggml.{key}_token_id, if there is one and it is in the vocabulary."""
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    in_vocabulary = token_id is not None and 0 <= token_id < len(meta.get("tokenizer.ggml.tokens", ()))
    return token_id if in_vocabulary else None


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
