"""Chat templates rendered the way transformers renders them.

A model's chat template is a Jinja program written against transformers'
environment: sandboxed, ``trim_blocks``/``lstrip_blocks`` on, loop controls,
a ``tojson`` that keeps non-ASCII text, and the globals ``raise_exception``
and ``strftime_now``. A prompt that differs by one newline from what the
model was trained on degrades its answers, so we mirror that environment.
Templates come from model repositories, i.e. untrusted code: the sandbox is
immutable, so a template can neither reach Python internals nor mutate the
caller's messages.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ffchat.errors import FfchatError


def _one_line(text: str) -> str:
    """The CLI prints errors on one line; template messages may span several."""
    return " ".join(str(text).split())


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (bad roles, unsupported content)."""
    raise FfchatError(f"chat template: {_one_line(message)}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Plain json.dumps: Jinja's own tojson escapes <, > and & for HTML, which would change prompts."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Today's local date/time, which Llama-3-style templates put in the system turn."""
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


_ENVIRONMENT = _environment()


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template once; every chat turn renders the same one again."""
    try:
        return _ENVIRONMENT.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise FfchatError(f"chat template has a syntax error on line {exc.lineno}: {_one_line(exc.message)}") from exc


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **context: Any,
) -> str:
    """Render ``messages`` with the template ``source``.

    ``context`` carries the special tokens (bos_token, eos_token, ...) and any
    template switches such as ``enable_thinking``. ``tools`` and ``documents``
    are always defined (None when absent), as transformers passes them. Keys
    whose value is None are dropped from messages: templates test for a
    missing ``content`` or ``tool_calls`` but would print "None".
    """
    template = compile_template(source)
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        return template.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **context)
    except (jinja2.TemplateError, TypeError) as exc:
        raise FfchatError(f"chat template failed on this conversation: {_one_line(exc)}") from exc
