"""A model's tokenizer, chat prompts, and streaming detokenization.

``Tokenizer.from_dir`` reads the files a Hugging Face repository ships
(tokenizer.json, tokenizer_config.json, chat_template.jinja,
special_tokens_map.json, generation_config.json, config.json) so that the rest
of ffchat never parses them. Encoding and decoding run in the ``tokenizers``
library; transformers is only a test oracle.

``StreamDecoder`` turns generated ids into text one id at a time without ever
printing half a UTF-8 character or losing a SentencePiece word space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from ffchat.chat_template import render_chat_template
from ffchat.errors import FfchatError

# Token roles a tokenizer config may name; templates see them as variables.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

_PROBE_TEXT = "a"  # any text with at least one ordinary token


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FfchatError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise FfchatError(f"{path} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    """An ``eos_token_id`` as configs write it: absent, one int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values]


def _chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config (as in transformers); of named templates, "default"."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _special_token_texts(tokenizer_config: Mapping[str, Any], special_map: Mapping[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad texts: tokenizer_config.json first, special_tokens_map.json for the keys it lacks."""
    texts = {}
    for name in NAMED_TOKENS:
        source = tokenizer_config if name in tokenizer_config else special_map
        text = _token_text(source.get(name))
        if text is not None:
            texts[name] = text
    return texts


def _register_named_tokens(backend: Backend, texts: Iterable[str]) -> None:
    """Make named tokens that tokenizer.json keeps as plain vocabulary special, as transformers does,
    so that decoding skips them and encoding never splits them."""
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [text for text in texts if text not in added and backend.token_to_id(text) is not None]
    if missing:
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])


def _post_processor_affixes(backend: Backend) -> tuple[list[int], list[int]]:
    """The ids tokenizer.json's post-processor puts before and after a text (e.g. Llama 3's BOS)."""
    encoding = backend.encode(_PROBE_TEXT, add_special_tokens=True)
    content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    start, end = (content[0], content[-1] + 1) if content else (len(encoding.ids), len(encoding.ids))
    return encoding.ids[:start], encoding.ids[end:]


class Tokenizer:
    """Encode, decode and render chats for one model.

    BOS/EOS for ``encode(add_special_tokens=True)``: when tokenizer_config
    sets add_bos_token/add_eos_token, those flags decide (as in llama.cpp and
    transformers 4's Llama tokenizers); otherwise what tokenizer.json's
    post-processor adds. transformers 5 ignores the flags whenever
    tokenizer.json exists, so the two differ only for a config whose flags
    contradict its own post-processor.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        eos_token_ids: Iterable[int] = (),
    ):
        backend.no_truncation()  # some tokenizer.json files carry a max_length meant for training
        backend.no_padding()
        _register_named_tokens(backend, (special_tokens or {}).values())
        self._backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # templates see these texts
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        own_eos = self._id_of(self.eos_token)
        self.eos_token_ids = frozenset([*eos_token_ids, *([] if own_eos is None else [own_eos])])
        self._special_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )
        if add_bos_token is None and add_eos_token is None:
            self._prefix, self._suffix = _post_processor_affixes(backend)
        else:
            self._prefix = [self.bos_token_id] if add_bos_token and self.bos_token_id is not None else []
            self._suffix = [own_eos] if add_eos_token and own_eos is not None else []

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load the tokenizer of a model directory (see the module docstring for the files read)."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FfchatError(f"no tokenizer.json in {model_dir}",
                              hint="ffchat needs the fast tokenizer file that Hugging Face repositories ship")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
            raise FfchatError(f"cannot load {tokenizer_file}: {exc}") from exc
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")
        return cls(
            backend,
            special_tokens=_special_token_texts(config, _read_json(model_dir / "special_tokens_map.json")),
            chat_template=_chat_template(model_dir, config),
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            eos_token_ids=_id_list(generation.get("eos_token_id")) + _id_list(model_config.get("eos_token_id")),
        )

    def _id_of(self, text: str | None) -> int | None:
        return None if text is None else self._backend.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode(add_special_tokens=True)`` starts with BOS."""
        return self.bos_token_id is not None and self._prefix[:1] == [self.bos_token_id]

    def is_special(self, token_id: int) -> bool:
        """A special token: decoding with skip_special_tokens drops it."""
        return token_id in self._special_ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it are parsed as such."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [*self._prefix, *ids, *self._suffix] if add_special_tokens else ids

    def encode_raw(self, text: str) -> list[int]:
        """A plain-completion prompt: BOS when the tokenizer adds one, never EOS."""
        return ([self.bos_token_id] if self.adds_bos else []) + self.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text for ``messages``; ``extra`` reaches the template (tools, enable_thinking, ...)."""
        if self.chat_template is None:
            raise FfchatError("this model has no chat template", hint="use --raw for plain text completion")
        context = {**self.special_tokens, **extra}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **context)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        """Prompt ids for ``messages``.

        Templates of BOS-using models usually write ``bos_token`` themselves; when
        one does not, the model still saw BOS in training (its tokenizer added it),
        so we prepend it, once. transformers' apply_chat_template(tokenize=True)
        never adds it; the two agree whenever the template writes BOS.
        """
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra))
        if self.adds_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


class StreamDecoder:
    """Printable text for generated ids, one id at a time.

    Decoding ids one by one breaks text: a character may span several byte
    tokens, and SentencePiece decoders drop the space in front of a sequence's
    first word. So we keep a short window, the ids of the text printed last
    plus the ids not printed yet, decode it whole, and print what extends
    beyond the printed part. Text is held back while it ends in U+FFFD (an
    incomplete character); the window then restarts where the printed text
    ends, a character boundary.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._window: list[int] = []
        self._printed = 0  # ids at the start of the window whose text is already printed

    def push(self, token_id: int) -> str:
        """Text that ``token_id`` completes; "" while a character is still incomplete."""
        # The decoder would drop a skipped special token anyway; keeping it out of the
        # window keeps a SentencePiece word after it from looking like a sequence start.
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        self._window.append(token_id)
        text = self._pending_text()
        if text.endswith("\ufffd"):
            return ""
        self._advance()
        return text

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (as decode() would show them)."""
        text = self._pending_text()
        self._advance()
        return text

    def _pending_text(self) -> str:
        printed = self._tokenizer.decode(self._window[: self._printed], self._skip_special)
        whole = self._tokenizer.decode(self._window, self._skip_special)
        return whole[len(printed):]

    def _advance(self) -> None:
        self._window = self._window[self._printed:]
        self._printed = len(self._window)
