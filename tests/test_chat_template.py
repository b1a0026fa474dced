"""Chat templates: our renderer must produce exactly what transformers produces.

A prompt that differs by one space from the one a model was trained on
degrades its answers, so every family-style template under tests/templates
is rendered by us and by transformers (the reference implementation every
template is written against) and compared text for text and id for id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from factory import CHATML_TEMPLATE, build_tokenizer
from tokenizers import AddedToken, processors

import ffchat.chat_template
from ffchat.chat_template import compile_template, render_chat_template
from ffchat.errors import FfchatError
from ffchat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from transformers.utils import chat_template_utils  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Family:
    """How a family's tokenizer differs from the factory's ChatML one."""

    template: str
    bos: str | None = None
    eos: str = "<|im_end|>"
    special: tuple[str, ...] = ()  # added special tokens
    plain_added: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <tool_call>, <think>)
    bos_post_processor: bool = False  # tokenizer.json itself adds BOS (Llama 3, Mistral)
    config: dict = field(default_factory=dict)


FAMILIES = {
    "chatml": Family(CHATML_TEMPLATE, bos="<|im_start|>", config={"add_bos_token": False}),
    "llama3": Family(
        (TEMPLATES / "llama3_style.jinja").read_text(), bos="<|begin_of_text|>", eos="<|eot_id|>",
        special=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos_post_processor=True,
    ),
    "mistral": Family(
        (TEMPLATES / "mistral_style.jinja").read_text(), bos="<s>", eos="</s>",
        special=("<s>", "</s>", "[INST]", "[/INST]"), bos_post_processor=True, config={"add_bos_token": True},
    ),
    "zephyr": Family((TEMPLATES / "zephyr_style.jinja").read_text(), bos="<s>", eos="</s>", special=("<s>", "</s>")),
    "qwen2.5": Family((TEMPLATES / "qwen25_style.jinja").read_text(), plain_added=("<tool_call>", "</tool_call>")),
    "qwen3": Family(
        (TEMPLATES / "qwen3_style.jinja").read_text(),
        plain_added=("<tool_call>", "</tool_call>", "<think>", "</think>"),
    ),
}


def build_family_dir(directory: Path, family: Family) -> Path:
    """The factory's byte-level tokenizer, given the family's tokens, BOS policy and template."""
    backend = build_tokenizer(directory)
    backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in family.special])
    backend.add_tokens([AddedToken(text, special=False, normalized=False) for text in family.plain_added])
    if family.bos_post_processor:
        bos_id = backend.token_to_id(family.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": family.bos,
        "eos_token": family.eos,
        "pad_token": "<|endoftext|>",
        "chat_template": family.template,
        **family.config,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {name: build_family_dir(tmp_path_factory.mktemp(name), family) for name, family in FAMILIES.items()}


class FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26, 9, 30)


@pytest.fixture
def frozen_date(monkeypatch):
    """Both renderers see the same day, so a test run across midnight cannot fail."""
    monkeypatch.setattr(ffchat.chat_template, "datetime", FrozenDatetime)
    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Température actuelle d'une ville <en °C> & vent",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Nom, p.ex. Zürich ou 東京"}},
            "required": ["city"],
        },
    },
}

SINGLE = [{"role": "user", "content": "Hello there!"}]
WITH_SYSTEM = [
    {"role": "system", "content": "You are terse.\n"},
    {"role": "user", "content": "What is the capital of France?"},
]
MULTI_TURN = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "Capitale de l'Italie ?"},
    {"role": "assistant", "content": "  Rome. 🇮🇹  "},
    {"role": "user", "content": "Et du Japon\u00a0? 日本"},
]
MULTI_TURN_NO_SYSTEM = MULTI_TURN[1:] + [{"role": "assistant", "content": "Tokyo (東京)."}]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
TOOL_USE = [
    {"role": "user", "content": "Weather in Zürich and Bern?"},
    {"role": "assistant", "content": "", "tool_calls": [
        TOOL_CALL, {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "content": "21 °C, sunny"},
    {"role": "tool", "content": "18 °C, rain"},
    {"role": "user", "content": "Thanks! <b>Summary</b> & advice?"},
]
REASONING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\n6"},
    {"role": "user", "content": "Thanks"},
]
REASONING_LAST = REASONING[:-1]  # the final assistant turn follows the last query: it keeps its thinking

CONVERSATIONS = {
    "single": (SINGLE, {}),
    "system": (WITH_SYSTEM, {}),
    "multi_turn": (MULTI_TURN, {}),
    "multi_turn_no_system": (MULTI_TURN_NO_SYSTEM, {}),
    "tools_offered": (WITH_SYSTEM, {"tools": [WEATHER_TOOL]}),
    "tools_used": (TOOL_USE, {"tools": [WEATHER_TOOL]}),
    "reasoning": (REASONING, {}),
    "reasoning_last": (REASONING_LAST, {}),
    "thinking_off": (REASONING, {"enable_thinking": False}),
    "thinking_on": (REASONING, {"enable_thinking": True}),
}
UNSUPPORTED = {  # conversations a family's template does not handle
    "chatml": {"tools_used", "reasoning_last"},
    "mistral": {"tools_used"},
    "zephyr": {"tools_used"},
    "llama3": {"reasoning_last"},
}
CASES = [
    (family, conversation, add_generation_prompt)
    for family in FAMILIES
    for conversation in CONVERSATIONS
    if conversation not in UNSUPPORTED.get(family, ())
    for add_generation_prompt in (True, False)
]


@pytest.mark.parametrize("family,conversation,add_generation_prompt", CASES)
def test_matches_transformers(family_dirs, frozen_date, family, conversation, add_generation_prompt):
    """Same prompt text and same ids as transformers' apply_chat_template."""
    messages, extra = CONVERSATIONS[conversation]
    ours = Tokenizer.from_dir(family_dirs[family])
    oracle = transformers.PreTrainedTokenizerFast.from_pretrained(family_dirs[family])

    text = ours.apply_chat_template(messages, add_generation_prompt, **extra)
    expected_text = oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               tokenize=False, **extra)
    assert text == expected_text
    expected_ids = oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True, return_dict=False, **extra)
    assert ours.encode_chat(messages, add_generation_prompt, **extra) == list(expected_ids)


def test_templates_render_what_they_claim(family_dirs, frozen_date):
    """Guards against a template that renders (nearly) nothing, which the oracle comparison would not notice."""
    llama3 = Tokenizer.from_dir(family_dirs["llama3"])
    text = llama3.apply_chat_template(WITH_SYSTEM, tools=[WEATHER_TOOL])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCurrent date: 26 July 2024\n")
    assert '    "description": "Température actuelle d\'une ville <en °C> & vent"' in text  # indent=4, not escaped
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")

    qwen25 = Tokenizer.from_dir(family_dirs["qwen2.5"]).apply_chat_template(TOOL_USE, tools=[WEATHER_TOOL])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in qwen25
    assert ("<|im_start|>user\n<tool_response>\n21 °C, sunny\n</tool_response>"
            "\n<tool_response>\n18 °C, rain\n</tool_response><|im_end|>\n") in qwen25

    zephyr = Tokenizer.from_dir(family_dirs["zephyr"]).apply_chat_template(WITH_SYSTEM)
    assert zephyr == "<|system|>\nYou are terse.\n</s>\n<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"

    qwen3 = Tokenizer.from_dir(family_dirs["qwen3"])
    assert qwen3.apply_chat_template(REASONING, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    older = qwen3.apply_chat_template(REASONING_LAST, add_generation_prompt=False)
    assert "Add two and two." not in older  # reasoning before the last query is dropped
    assert older.endswith("<|im_start|>assistant\n<think>\nThree plus three.\n</think>\n\n6<|im_end|>\n")


def test_raise_exception_becomes_ffchat_error(family_dirs):
    """Mistral-style templates reject non-alternating roles; the user sees the template's message."""
    mistral = Tokenizer.from_dir(family_dirs["mistral"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(FfchatError, match="roles must alternate user, assistant"):
        mistral.apply_chat_template(bad)
    oracle = transformers.PreTrainedTokenizerFast.from_pretrained(family_dirs["mistral"])
    with pytest.raises(Exception, match="roles must alternate user, assistant"):
        oracle.apply_chat_template(bad, tokenize=False)
    with pytest.raises(FfchatError, match="not tool"):
        mistral.apply_chat_template([*SINGLE, {"role": "tool", "content": "x"}])


def test_bos_written_by_template_is_not_doubled(family_dirs):
    """Llama 3 and Mistral templates write bos_token and their tokenizers add BOS too: one BOS only."""
    for name in ("llama3", "mistral"):
        tokenizer = Tokenizer.from_dir(family_dirs[name])
        assert tokenizer.adds_bos
        ids = tokenizer.encode_chat(SINGLE)
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_bos_prepended_when_template_omits_it(tmp_path):
    """A Zephyr/TinyLlama-style template writes no BOS although its tokenizer adds one; the model was
    fine-tuned on tokenizer(text), i.e. with BOS, so we prepend it. transformers does not (documented gap)."""
    family = Family(FAMILIES["zephyr"].template, bos="<s>", eos="</s>", special=("<s>", "</s>"),
                    bos_post_processor=True, config={"add_bos_token": True})
    directory = build_family_dir(tmp_path / "zephyr", family)
    ours = Tokenizer.from_dir(directory)
    oracle = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    expected = oracle.apply_chat_template(SINGLE, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(SINGLE) == [ours.bos_token_id, *expected]


def test_strftime_now_uses_today():
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = render_chat_template("{{ strftime_now('%Y-%m-%d') }}", [])
    assert rendered in {before, datetime.now().strftime("%Y-%m-%d")}  # a run may cross midnight


def test_tojson_keeps_text_and_key_order():
    """Real templates rely on non-ASCII text, HTML characters and key order surviving tojson."""
    tool = {"z": "é <b>&", "a": [1, 2]}
    assert render_chat_template("{{ tools[0] | tojson }}", [], tools=[tool]) == '{"z": "é <b>&", "a": [1, 2]}'
    assert render_chat_template("{{ tools[0] | tojson(sort_keys=true) }}", [], tools=[tool]) == (
        '{"a": [1, 2], "z": "é <b>&"}')
    assert render_chat_template("{{ tools[0] | tojson(indent=2) }}", [], tools=[{"k": 1}]) == '{\n  "k": 1\n}'


def test_context_variables():
    """tools/documents are defined even when absent (templates test `is not none`); extras pass through."""
    source = "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }} {{ enable_thinking }} {{ bos_token }}"
    assert render_chat_template(source, [], add_generation_prompt=False, enable_thinking=True,
                                bos_token="<s>") == "True True False True <s>"


def test_none_values_are_dropped():
    """OpenAI-style messages carry content=None next to tool_calls; templates expect the key missing."""
    source = "{% for m in messages %}{{ m.content | default('-') }}{% endfor %}"
    assert render_chat_template(source, [{"role": "assistant", "content": None}]) == "-"


def test_trim_and_lstrip_blocks():
    source = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(source, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_syntax_error_is_one_line():
    with pytest.raises(FfchatError) as raised:
        render_chat_template("{% for m in messages %}\n{{ m.content }\n", [])
    assert "syntax error on line 2" in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("source", [
    "{{ messages[0].content + 1 }}",  # TypeError inside the template
    "{{ messages.append(1) }}",  # the sandbox forbids mutating the caller's messages
    "{{ ''.__class__.__mro__ }}",  # ... and reaching Python internals
    "{{ undefined_thing.attr }}",
])
def test_runtime_errors_become_ffchat_errors(source):
    with pytest.raises(FfchatError) as raised:
        render_chat_template(source, [{"role": "user", "content": "a"}])
    assert "\n" not in str(raised.value)


def test_templates_are_compiled_once():
    source = "{{ messages | length }}"
    assert compile_template(source) is compile_template(source)
